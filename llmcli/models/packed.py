"""Linear layers with their weights reordered once, at load, for fast CPU products.

Measured with benchmarks/cpu_gemv.py on this project's 2-core x86 machine: a bfloat16 F.linear with
one input row streams weights at a fraction of the memory bandwidth. Where llmcli's bfloat16 kernel
runs (AVX512-BF16, see bf16_kernel.py), each bfloat16 linear stores its weight in the kernel's panels
(`BlockedLinear`), for eager and compiled runs alike. Elsewhere, eager runs reorder it into oneDNN's
blocked layout (`PackedLinear`: several times faster for one row, bit-identical results); compiled runs
keep plain weights, which inductor's loops read well. The original weight is released either way, so
memory does not grow.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

from llmcli import bf16_kernel


@functools.cache
def prepacking_available() -> bool:
    """oneDNN exists on x86 and some ARM builds of torch only: probe the two ops once."""
    if os.environ.get("LLMCLI_PREPACK", "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ones(8, 16, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 16, dtype=torch.bfloat16), packed, None, "none", [], "")
        return bool((out.float() == 16).all())
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


class PackedLinear(nn.Module):
    """nn.Linear with its weight in oneDNN's blocked layout (inference only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


class BlockedLinear(nn.Module):
    """nn.Linear with its bfloat16 weight in the bfloat16 kernel's panels (`weight`: [out/64, in/2, 64, 2],
    outputs padded to whole panels). With `consume`, `linear`'s weight is rearranged in place where it can
    be (and `linear` must not be used again)."""

    def __init__(self, linear: nn.Linear, consume: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", bf16_kernel.to_blocks(linear.weight.detach(), in_place=consume))
        self.padding = self.weight.shape[0] * bf16_kernel.PANEL - self.out_features
        bias = linear.bias
        if bias is not None and self.padding:
            bias = nn.Parameter(torch.cat([bias.detach(), bias.new_zeros(self.padding)]), requires_grad=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = bf16_kernel.linear(x, self.weight, self.bias)
        return out[..., :self.out_features] if self.padding else out


class BlockedEmbedding(nn.Module):
    """The input embedding of a model whose head is tied to it: rows read from the head's panels, so the
    head gets the kernel (a 0.5B model's head is 29% of its weights) and the weight is stored once."""

    def __init__(self, head: BlockedLinear):
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.register_buffer("weight", head.weight)  # the same tensor

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return bf16_kernel.rows_of(self.weight, ids)


def block_tied_head(model: nn.Module) -> bool:
    """A bfloat16 head that shares its weight with the input embedding (and nothing else) becomes a
    BlockedLinear and the embedding a BlockedEmbedding on the same panels. Returns whether it did."""
    holders = [(parent, name, module) for _, parent in model.named_modules()
               for name, module in parent.named_children() if isinstance(module, (nn.Embedding, nn.Linear))]
    embeddings = {id(m.weight): (p, n, m) for p, n, m in holders if isinstance(m, nn.Embedding)}
    for parent, name, module in holders:
        tied = embeddings.get(id(module.weight)) if isinstance(module, nn.Linear) else None
        if tied is None or module.bias is not None or not bf16_kernel.usable(module.weight):
            continue
        if sum(t is module.weight for _, t in model.named_parameters(remove_duplicate=False)) != 2:
            continue  # a third holder would keep reading the plain weight
        head = BlockedLinear(module, consume=True)
        setattr(parent, name, head)
        setattr(tied[0], tied[1], BlockedEmbedding(head))
        return True
    return False


def pack_linears(model: nn.Module, keep=lambda name: False, compiled: bool = False) -> int:
    """Swap each CPU bfloat16 nn.Linear for a BlockedLinear where the kernel runs, else (not `compiled`)
    a PackedLinear, one at a time. Layers whose weight other code reads directly (`keep(name)` true) stay
    as they are, and so do those that share their weight, unless it is a head tied to the embedding and
    the kernel runs (`block_tied_head`). Returns the number of layers swapped."""
    count = int(block_tied_head(model))
    shared = _shared_weights(model)
    for name, module in parents_of_linears(model):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if (not isinstance(child, nn.Linear) or child.weight.dtype != torch.bfloat16
                    or child.weight.device.type != "cpu" or id(child.weight) in shared or keep(full)):
                continue
            if bf16_kernel.usable(child.weight):
                setattr(module, child_name, BlockedLinear(child, consume=True))
            elif not compiled and prepacking_available():
                setattr(module, child_name, PackedLinear(child))
            else:
                continue
            count += 1
    return count


def parents_of_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules with nn.Linear children. Collect parents only: a list holding the children themselves
    would keep every replaced weight alive until the end, doubling peak memory."""
    return [(name, module) for name, module in model.named_modules()
            if any(isinstance(child, nn.Linear) for child in module.children())]


def _shared_weights(model: nn.Module) -> set[int]:
    seen, shared = set(), set()
    for _, param in model.named_parameters(remove_duplicate=False):
        (shared if id(param) in seen else seen).add(id(param))
    return shared
