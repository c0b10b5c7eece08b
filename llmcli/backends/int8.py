"""Weight-only int8 quantisation with one scale per output channel.

Decoding reads every active weight once per token, so halving the bytes of bf16 weights nearly
halves the time of a memory-bound decode step. Activations stay in the model's dtype; only the
weights are stored as int8 and rescaled after the matrix product.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.backends import int8_kernel, int_dot
from llmcli.backends.cpu_kernels import cpu_model
from llmcli.backends.int8_kernel import CHUNK, ROWS, to_blocks
from llmcli.backends.linear import NEVER, Product, one_row, one_row_linear

INT8PACK_ROWS = 16  # the most rows `_weight_int8pack_mm` gets; more go through a converted weight
# The most rows the int8 kernel gets: beyond ~20 it is compute-bound and a GEMM on the converted weight
# wins (benchmarks/int8_gemv.py --rows; 9728x896: 1.77 vs 1.82 ms at 16 rows, 2.41 vs 2.16 ms at 24).
KERNEL_ROWS = 16
# From this many bfloat16 rows, `int8_kernel.gemm` beats the row-by-row kernel where it runs (9728x896:
# 0.68 vs 0.56 ms at 4 rows, 1.82 vs 1.21 at 16; 3 rows: 0.34 vs 0.54).
GEMM_ROWS = 4
# Up to this many rows the integer kernel (x quantised to int8; AVX2 CPUs) beats a float32 GEMM on
# the converted weight: Qwen2.5-0.5B shapes on a 2-core Zen 1, ms for four layers' products, integer vs GEMM:
# 37 vs 154 at 16 rows, 141 vs 244 at 64, 288 vs 357 at 128, 601 vs 627 at 256 (prompts come in chunks).
INTEGER_ROWS = 256


def quantize_weight(weight: torch.Tensor, blocked: bool = False,
                    chunk_elements: int = 1 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w ≈ q * scale[:, None], |q| <= 127; with `blocked`, q comes in the int8
    kernel's blocks (`int8_kernel.to_blocks`). Rows are converted a few MiB at a time, straight into
    the result: whole-matrix temporaries of a 151936-row head cost 2 GiB of peak memory. A mebi-element at a time,
    not four: an int8 load of the Qwen2.5-0.5B shape then peaked at 1.16-1.20x its weights, not 1.22-1.41x (the
    tied head's conversion), and loaded no slower (4.8-4.9 s against 5.7-7.0)."""
    rows, columns = weight.shape
    shape = (rows // ROWS, columns // CHUNK, ROWS, CHUNK) if blocked else (rows, columns)
    q = torch.empty(shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(rows, dtype=torch.float32, device=weight.device)
    step = max(ROWS, chunk_elements // max(1, columns) // ROWS * ROWS)  # whole blocks of rows
    for begin in range(0, rows, step):
        w = weight[begin: begin + step].float()
        s = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        chunk = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
        if blocked:
            q[begin // ROWS: (begin + step) // ROWS] = to_blocks(chunk)
        else:
            q[begin: begin + step] = chunk
        scale[begin: begin + step] = s
    return q, scale


@functools.cache
def packed_kernel_works(device_type: str, dtype: torch.dtype) -> bool:
    """torch's int8 weight-only kernel exists for some devices and dtypes only: probe once."""
    op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    if op is None:
        return False
    try:
        x = torch.ones(1, 64, dtype=dtype, device=device_type)
        w = torch.ones(64, 64, dtype=torch.int8, device=device_type)
        out = torch._weight_int8pack_mm(x, w, torch.ones(64, dtype=dtype, device=device_type))
        return bool(torch.allclose(out.float(), torch.full_like(out.float(), 64.0)))
    except (RuntimeError, NotImplementedError):
        return False


class Int8Linear(Product, nn.Module):
    """A drop-in replacement for nn.Linear holding int8 weights and per-output-channel scales.

    With `kernel` (the int8 CPU kernel is built) and a CPU weight whose shape fits its blocks, `weight` is
    stored in the kernel's blocked layout (see int8_kernel.py); `int8_weight()` gives it back as [out, in].
    `gemm`: the kernel's many-row product runs here (AVX512-BF16). `integer`: products of up to INTEGER_ROWS rows
    quantise the activations to int8 and use integer dot products (int_dot.py; AVX2 CPUs). `compiled`: a compiled decode
    step runs it (what `label` says). Products of more than `kernel_rows` rows take a GEMM on the converted weight
    (this CPU's figure: crossover.py)."""

    kernel_rows = INTEGER_ROWS

    def __init__(self, linear: nn.Linear, kernel: bool = False, gemm: bool = False, compiled: bool = False,
                 integer: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.blocked = kernel and int8_kernel.suits(linear.weight)
        q, scale = quantize_weight(linear.weight.detach(), blocked=self.blocked)
        dtype = linear.weight.dtype
        self.register_buffer("weight", q)
        self.register_buffer("scales", scale.to(dtype))
        self.bias = linear.bias
        self.packed = packed_kernel_works(q.device.type, dtype)
        self.gemm = self.blocked and gemm  # decided here: a compiled step cannot ask
        self.integer = self.blocked and integer and int_dot.int8_fits(linear.weight.shape)
        self.compiled = compiled
        if self.gemm:
            self.kernel_rows = NEVER

    @property
    def label(self) -> str:
        if self.integer:
            return f"int8 kernel (x int8 activations, {int_dot.isa_label()})"
        if self.blocked:
            return "int8 kernel"
        return "torch int8" + (", compiled one-row steps multiply-and-sum" if self.compiled else "")

    def int8_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as [out, in], int8 or converted to `dtype` (a copy when stored in blocks)."""
        if self.blocked:
            return int8_kernel.from_blocks(self.weight, dtype)
        return self.weight if dtype is None else self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.gemm and GEMM_ROWS <= rows <= self.kernel_rows and x.dtype == torch.bfloat16:
            return int8_kernel.gemm(x, self.weight, self.scales, self.bias)  # prompts, batches
        if self.integer and rows <= self.kernel_rows and (self.bias is None or self.bias.dtype == x.dtype):
            # One op call, bias included: Python around each decode product costs more than the small ones
            # take (Qwen2.5-0.5B shape: 40 us of wrapping around a 90 us product).
            return torch.ops.llmcli.int8_dot.default(x, self.weight, self.scales, None, self.bias)
        if self.blocked and rows <= min(KERNEL_ROWS, self.kernel_rows):  # decoding (and short prompts): the int8 kernel
            # int8_kernel.gemv inlined. The [1, ...] views are made per call: StackedExperts swaps an expert's
            # tensors for views of its stacks.
            flat, blocks, scales = x.reshape(-1, self.in_features).contiguous(), self.weight[None], self.scales[None]
            if self.integer:
                out = torch.ops.llmcli.int8_dot.default(flat, blocks, scales, None)
            else:
                out = torch.ops.llmcli.int8_gemv.default(flat, blocks, scales.to(x.dtype), None)
            out = out.view(*x.shape[:-1], out.shape[-1])
            return out if self.bias is None else out + self.bias
        if one_row(x):  # compiled decode step without the kernel: one fused loop reading the int8 rows
            return one_row_linear(x, self.weight, self.bias, self.scales)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        # torch's int8 kernel is compute-bound: beyond a few rows, a GEMM on the weight converted to the
        # activations' dtype (int8 values are exact in bf16) is 2-2.6x faster (128 and 512 rows, 0.5B shapes).
        if not self.blocked and self.packed and rows <= INT8PACK_ROWS and x2.dtype == self.scales.dtype:
            out = torch._weight_int8pack_mm(x2.contiguous(), self.int8_weight(), self.scales)
        elif x2.dtype == torch.bfloat16 and x2.is_cpu and not bf16_matmul_is_fast():
            # CPUs without AVX512-BF16 multiply bfloat16 slowly (Zen 3, 128 rows: 8 GFLOP/s, float32 28): the
            # int8 values are exact in float32 too, and the product is summed in float32 either way.
            out = (F.linear(x2.float(), self.int8_weight(torch.float32)) * self.scales.float()).to(x2.dtype)
        else:
            out = F.linear(x2, self.int8_weight(x2.dtype)) * self.scales.to(x2.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)


@functools.cache
def bf16_matmul_is_fast() -> bool:
    """Does this CPU multiply bfloat16 natively (AVX512-BF16 or AMX), so that torch's bfloat16 GEMM beats float32?"""
    flags = cpu_model().split()  # the /proc/cpuinfo flags line
    return "avx512_bf16" in flags or "amx_bf16" in flags


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the memory that parameters and buffers hold: memory that several tensors view (a tied head, experts
    viewing into a stack, every weight in the weight arena's one storage) is counted once, by the byte ranges the
    tensors cover."""
    ranges, opaque = [], 0
    for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values():
        try:
            start = t.data_ptr()
        except (RuntimeError, NotImplementedError):  # opaque layouts (oneDNN-prepacked): no data pointer, never shared
            opaque += t.numel() * t.element_size()
            continue
        if t.numel():  # the elements' span: a strided view covers its first to its last element
            last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
            ranges.append((start, start + (last + 1) * t.element_size()))
    total, reached = opaque, 0
    for start, end in sorted(ranges):
        total += max(0, end - max(start, reached))
        reached = max(reached, end)
    return total
