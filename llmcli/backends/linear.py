"""The linear modules a backend swaps in for a model's nn.Linear after loading; each says what it runs
(`label`), which `bench`, `show` and `--help` report.

Measured with benchmarks/cpu_gemv.py on this project's 2-core x86 machine: a bfloat16 F.linear with one
input row streams weights at a fraction of the memory bandwidth. Where llmcli's bfloat16 kernel runs
(AVX512-BF16 or AVX2 + FMA, see bf16_kernel.py), each bfloat16 linear stores its weight in the kernel's panels
(`BlockedLinear`), for eager and compiled runs alike. Elsewhere, eager runs reorder it into oneDNN's
blocked layout (`PackedLinear`: several times faster for one row, bit-identical results); compiled runs
keep plain weights, which inductor's loops read well (`SummingLinear`). The original weight is released
either way, so memory does not grow.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.backends import bf16_kernel

NEVER = 1 << 40  # a row count no product reaches: `kernel_rows` for "the kernel at every size"
FEW_ROWS = 8  # the most sequences a compiled decode step takes (beyond that, products are not weight-bound)
FLOAT32_PROMPT_ROWS = 16  # Float32PromptLinear: above this many rows, converting the weight pays for itself
CUDA_SUM_MAX_ROWS = 65536  # an H200 ran a vocabulary-sized head at 296 GB/s as a sum, 3476 through cuBLAS


def one_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   scales: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) written as a multiply and a float32 sum over the input dim, for the compiled
    decode step: inductor turns this into one streaming loop over the weight (any dtype, int8 included,
    with `scales` per output row), while its matmul path calls the slow unpacked one-row GEMM."""
    out = (x.float().unsqueeze(-2) * weight.float()).sum(-1)
    if scales is not None:
        out = out.to(x.dtype) * scales.to(x.dtype)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(x.dtype)


def one_row(x: torch.Tensor) -> bool:
    """A compiled decode step of one sequence. With several rows inductor's multiply-and-sum loop reads
    the weight once per row (0.5B shape, batch 4: 26.6 tok/s against 51.6 through torch's product)."""
    return torch.compiler.is_compiling() and x.numel() == x.shape[-1]


class Product:
    """A linear module of a backend's: `label` says how it runs its product."""

    label: str = ""


def label_of(module: nn.Module) -> str | None:
    """What a linear module runs, or None for modules that are not linear layers."""
    if isinstance(module, Product):
        return module.label
    return "F.linear" if isinstance(module, nn.Linear) else None


class SummingLinear(Product, nn.Linear):
    """nn.Linear that, inside a compiled decode step of one sequence, runs as `one_row_linear` (on CUDA only
    up to CUDA_SUM_MAX_ROWS outputs, and not with LLMCLI_CUDA_GEMV=linear: cuBLAS then)."""

    def __init__(self, linear: nn.Linear, cuda_sum: bool = True):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias
        self.sums_on_cuda = cuda_sum and linear.out_features < CUDA_SUM_MAX_ROWS

    @property
    def label(self) -> str:
        sums = not self.weight.is_cuda or self.sums_on_cuda
        return "F.linear, compiled one-row steps multiply-and-sum" if sums else "F.linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if one_row(x) and (not x.is_cuda or self.sums_on_cuda):
            return one_row_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


@functools.cache
def prepacking_available() -> bool:
    """oneDNN exists on x86 and some ARM builds of torch only: probe the two ops once."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ones(8, 16, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 16, dtype=torch.bfloat16), packed, None, "none", [], "")
        return bool((out.float() == 16).all())
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


class Float32PromptLinear(Product, nn.Linear):
    """A bfloat16 nn.Linear on a CPU without native bfloat16 products where neither llmcli's kernel (not built
    yet, or no compiler) nor oneDNN's prepacking runs: prompts multiply in float32, where torch's bfloat16 GEMM
    was 4x slower (37 rows, SmolLM2's 576 x 1536, Zen 3); few rows keep the bfloat16 product, which reads half
    the bytes. Rounded once to bfloat16 either way: equal up to summation order."""

    label = "F.linear (prompts in float32)"

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] <= FLOAT32_PROMPT_ROWS:
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)


class PackedLinear(Product, nn.Module):
    """nn.Linear with its weight in oneDNN's blocked layout (inference only)."""

    label = "oneDNN prepacked"

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


class BlockedLinear(Product, nn.Module):
    """nn.Linear with its bfloat16 weight in the bfloat16 kernel's panels (`weight`: [out/64, in/2, 64, 2],
    outputs padded to whole panels). With `consume`, `linear`'s weight is rearranged in place where it can
    be (and `linear` must not be used again). Products of more than `kernel_rows` rows run torch's F.linear on the
    weight converted back to rows (crossover.py measures where that pays; on the CPUs measured so far it never did,
    where oneDNN uses AMX tiles it may)."""

    kernel_rows = NEVER

    def __init__(self, linear: nn.Linear, consume: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", bf16_kernel.to_blocks(linear.weight.detach(), in_place=consume))
        self.padding = self.weight.shape[0] * bf16_kernel.PANEL - self.out_features
        bias = linear.bias
        if bias is not None and self.padding:
            bias = nn.Parameter(torch.cat([bias.detach(), bias.new_zeros(self.padding)]), requires_grad=False)
        self.bias = bias

    @property
    def label(self) -> str:
        return bf16_kernel.label()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # `bf16_kernel.linear` inlined: a decode step makes ~100 of these calls, and the Python and view ops
        # around each cost as much as a small product (0.5B shape: ~20 us a call of ~45).
        if x.numel() > self.kernel_rows * self.in_features:
            return self._converted(x)
        rows = x.reshape(-1, self.in_features).contiguous()
        panels = self.weight.unsqueeze(0)  # per call: StackedExperts swaps an expert's weight for a view
        out = torch.ops.llmcli.bf16_linear.default(rows, panels, self.bias, None)
        out = out.view(*x.shape[:-1], out.shape[-1])  # not -1: a call may have no rows
        return out[..., :self.out_features] if self.padding else out

    def _converted(self, x: torch.Tensor) -> torch.Tensor:
        """The product as torch's GEMM on the weight as rows, in x's dtype (float32 rows: float32 sums, as the
        kernel gives them)."""
        weight = bf16_kernel.from_blocks(self.weight, self.out_features).to(x.dtype)
        bias = None if self.bias is None else self.bias[:self.out_features].to(x.dtype)
        return F.linear(x, weight, bias)


class BlockedEmbedding(nn.Module):
    """The input embedding of a model whose head is tied to it: rows read from the head's panels, so the
    head gets the kernel (a 0.5B model's head is 29% of its weights) and the weight is stored once."""

    def __init__(self, head: BlockedLinear):
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.register_buffer("weight", head.weight)  # the same tensor

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return bf16_kernel.rows_of(self.weight, ids)
