"""The bfloat16 CPU kernel: products for any number of rows from weights stored in 64-output panels,
from `kernels/bf16_gemm.cpp` (built with the int8 kernel, see cpu_kernels.py).

Decoding and prompts want different things from a weight layout. torch's one-row product on a plain
weight streams it at about 16 GB/s here; oneDNN's prepacked layout reaches 22-33 GB/s for one row and
~430 GFLOP/s for prompts, but it is an opaque tensor that a compiled step cannot read, so --compile kept
plain weights and lost ~10% on prompts. One layout read by one kernel serves both, eager and compiled:
measured (benchmarks/bf16_gemm.py) 29-42 GB/s for one row (the memory's limit at the time) and 420-450
GFLOP/s for 128-512 rows.

It is built for what the CPU has: AVX512-BF16 (dot products of bf16 pairs into float32 sums, e.g. AMD
Zen 4, Intel Cooper Lake / Sapphire Rapids and later), else AVX2 + FMA (a bf16 value is the top half of a
float: widened in registers for one row, panel slices widened in L2 for many rows). Without either llmcli
keeps oneDNN and torch's own paths.
"""

from __future__ import annotations

import torch

from llmcli.backends import cpu_kernels

PANEL = 64  # outputs per panel (kPanel in the C++ source)


FAST_ISAS = {"avx512_bf16": "AVX512-BF16", "avx2": "AVX2"}  # the builds faster than torch's paths


def available(wait: bool = True) -> tuple[bool, str]:
    """(runs on this CPU, a note for the user, empty if none). The portable loops are slower than oneDNN.
    `wait`: for a first build of the kernels (else it runs in the background, for later runs)."""
    loaded, note = cpu_kernels.load_once() if wait else cpu_kernels.load_if_built()
    return loaded and cpu_kernels.bf16_isa() in FAST_ISAS, note


def label() -> str:
    """How bench and show name the kernel's products here, e.g. "bf16 kernel (AVX2)"."""
    isa = cpu_kernels.bf16_isa()
    return f"bf16 kernel ({FAST_ISAS.get(isa, isa)})"


def fits(shape: torch.Size | tuple[int, ...]) -> bool:
    """Can an [out, in] weight be stored in panels? (Outputs are padded to whole panels.)"""
    return len(shape) == 2 and shape[1] % 2 == 0 and shape[1] > 0 and shape[0] > 0


def suits(weight: torch.Tensor) -> bool:
    """Is this a CPU bfloat16 weight the kernel can hold?"""
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and fits(weight.shape)


def to_blocks(weight: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """[out, in] -> [ceil(out/64), in/2, 64, 2]: each panel of 64 outputs stored pair of inputs by pair; the
    last panel padded with zero rows (products then give zeros there, cut off by `linear`'s callers).
    A panel occupies the same bytes as its 64 rows, so with `in_place` (and no padding) `weight` itself
    is rearranged, 16 panels at a time: a 151936-row head then costs 2 MiB of extra memory, not 272."""
    out, inputs = weight.shape
    panels = -(-out // PANEL)
    if in_place and panels * PANEL == out and weight.is_contiguous():
        step = 16 * PANEL
        for begin in range(0, out, step):
            rows = weight[begin: begin + step]
            rows.view(-1).copy_(to_blocks(rows).view(-1))
        return weight.view(panels, inputs // 2, PANEL, 2)
    if panels * PANEL != out:
        weight = torch.cat([weight, weight.new_zeros(panels * PANEL - out, inputs)])
    return weight.reshape(panels, PANEL, inputs // 2, 2).permute(0, 2, 1, 3).contiguous()


def from_blocks(blocks: torch.Tensor, out: int | None = None) -> torch.Tensor:
    """The inverse of `to_blocks`: the weight as [out, in] (a copy). Each pair of inputs moved as one 32-bit word:
    a 4864 x 896 weight in 1.5 ms, against 5.4 ms moving bfloat16 values (2-core Zen 4)."""
    panels, pairs = blocks.shape[:2]
    words = blocks.contiguous().view(torch.int32).view(panels, pairs, PANEL)
    return words.transpose(1, 2).contiguous().view(torch.bfloat16).view(panels * PANEL, pairs * 2)[:out]


def rows_of(blocks: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the weight, [*ids.shape, in], gathered from the panels (an embedding lookup on a
    head tied to the embedding)."""
    rows = blocks[ids // PANEL, :, ids % PANEL, :]  # [*ids.shape, in/2, 2]
    return rows.reshape(*ids.shape, blocks.shape[1] * 2)


def linear(x: torch.Tensor, blocks: torch.Tensor, bias: torch.Tensor | None = None,
           experts: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T + bias for x [..., in] in bfloat16, with the outputs of padding rows (zeros) at the end.
    `blocks` is one matrix [out/64, in/2, 64, 2], or a stack [E, ...] with `experts` naming each row's
    matrix. `bias` covers the padded outputs too."""
    if blocks.dim() == 4:
        blocks = blocks.unsqueeze(0)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.ops.llmcli.bf16_linear(rows, blocks, bias, experts)
    return out.reshape(*x.shape[:-1], out.shape[-1])
