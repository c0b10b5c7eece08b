"""The int8 decode kernel: weight-only int8 products for a few rows, on CPU, from `kernels/int8_gemv.cpp`.

A decode step reads every weight once, so int8 should be twice as fast as bf16. torch's own one-row
paths read int8 weights at about half the memory bandwidth here (benchmarks/int8_gemv.py: 12-20 GB/s
for inductor's loop, 15 GB/s for `_weight_int8pack_mm`), which left int8 only 1.14x faster than
bf16 with --compile. This kernel reads weights stored in blocks of 8 rows x 16 inputs, in the order it
uses them, at about 30 GB/s.

It is built with llmcli's other CPU kernels (cpu_kernels.py). Where it cannot be built, int8 layers
keep their row-major weights and torch's kernels: slower, same results up to rounding.
"""

from __future__ import annotations

import torch

from llmcli.backends import cpu_kernels

ROWS, CHUNK = 8, 16  # the kernel's block: output rows x inputs (kRows, kChunk in the C++ source)


def available(wait: bool = True) -> tuple[bool, str]:
    """Build (or load the cached build of) the kernel: (usable, a note for the user, empty if none). `wait`: for
    a first build (else it runs in the background, for later runs)."""
    return cpu_kernels.load_once() if wait else cpu_kernels.load_if_built()


def gemm_available() -> bool:
    """Is `int8_gemm` (bfloat16 activations, several rows) built with AVX512-BF16?"""
    return cpu_kernels.has_avx512_bf16()


def fits(shape: torch.Size | tuple[int, ...]) -> bool:
    """Can a [out, in] weight be stored in the kernel's blocks?"""
    return len(shape) == 2 and shape[0] % ROWS == 0 and shape[1] % CHUNK == 0


def suits(weight: torch.Tensor) -> bool:
    """Is this a CPU weight whose shape fits the kernel's blocks?"""
    return weight.device.type == "cpu" and fits(weight.shape)


def to_blocks(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] int8 -> [out/8, in/16, 8, 16]: each block of 8 rows stored in the order the kernel reads it."""
    out, inputs = weight.shape
    return weight.reshape(out // ROWS, ROWS, inputs // CHUNK, CHUNK).permute(0, 2, 1, 3).contiguous()


def from_blocks(blocks: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The inverse of `to_blocks`: a row-major copy (converted to `dtype` in the same pass), for products
    over many rows. The kernel's loop is 2.2x faster than torch's strided copy (1.2 ms for 9728x896)."""
    return torch.ops.llmcli.int8_unblock(blocks, dtype or blocks.dtype)


def gemv(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
         experts: torch.Tensor | None = None) -> torch.Tensor:
    """(x @ w.T) * scales for x [..., in] with few rows. `blocks` is one matrix [out/8, in/16, 8, 16] with
    scales [out], or a stack [E, ...] with scales [E, out] and `experts` naming each row's matrix."""
    if blocks.dim() == 4:
        blocks, scales = blocks.unsqueeze(0), scales.unsqueeze(0)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.ops.llmcli.int8_gemv(rows, blocks, scales.to(x.dtype), experts)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def gemm(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(x @ w.T) * scales + bias for bfloat16 x [..., in] with several rows: each block of 8 weight rows is
    converted to bfloat16 once per call and reused by every row (`gemm_available()` first)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.ops.llmcli.int8_gemm(rows, blocks, scales.to(x.dtype), bias)
    return out.reshape(*x.shape[:-1], out.shape[-1])
