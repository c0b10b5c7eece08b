"""oneDNN-prepacked linear layers for CPU decoding.

Measured with benchmarks/cpu_gemv.py on this project's 2-core x86 machine: a bfloat16 F.linear with
one input row streams weights at a fraction of the memory bandwidth, while the same product on a
weight reordered once into oneDNN's blocked layout is several times faster and gives bit-identical
results. Decoding is one-row products all the way down, so llmcli packs every bfloat16 linear
layer of a CPU model at load (the original weight is released, so memory does not grow).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn


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

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.packed_weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def pack_linears(model: nn.Module, keep=lambda name: False) -> int:
    """Swap each CPU bfloat16 nn.Linear for a PackedLinear, one at a time. Layers whose weight other
    code reads directly (`keep(name)` true) or that share their weight (tied heads) stay as they are.
    Returns the number of layers packed."""
    if not prepacking_available():
        return 0
    shared = _shared_weights(model)
    count = 0
    for name, module in parents_of_linears(model):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if (isinstance(child, nn.Linear) and child.weight.dtype == torch.bfloat16
                    and child.weight.device.type == "cpu" and id(child.weight) not in shared and not keep(full)):
                setattr(module, child_name, PackedLinear(child))
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
