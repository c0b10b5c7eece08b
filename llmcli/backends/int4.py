"""Weight-only int4: 4-bit weights with a scale and a zero point per group of GROUP inputs, on llmcli's integer
kernel where the CPU has AVX2 (int_dot.py), else on torch's own int4 product for CPU
(`_weight_int4pack_mm_for_cpu`, vectorised by ATen for AVX2 and AVX-512).

A decode step reads every active weight once per token: a quarter of bf16's bytes (plus 4 bytes per group
of scales) makes it the cheapest format that keeps the model's answers (quality figures in README). The
grouping is asymmetric: w ≈ (q - 8) * scale + zero with q in 0..15, which expresses GGUF's Q4_0
(zero = 0, groups of 32) and Q4_1 (zero = min + 8 * scale) exactly, so those files need no re-quantising.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from llmcli.backends import int_dot
from llmcli.backends.int8 import bf16_matmul_is_fast
from llmcli.backends.linear import Product
from llmcli.models.layers import joined_bias

GROUP = 32  # inputs per scale; measured against 64 and 128 (README: quality and decode speed)
# Up to this many rows the integer kernel (rows in lanes, 4 or 8 rows per pass over each unpacked block) beats
# converting the weight for a float GEMM. Qwen2.5-0.5B's MLP shapes, 2-core Zen 4 (bfloat16 GEMM, the weight
# unblocked 8 codes a step): kernel time over unblock + GEMM 0.61-0.75 (int4, Q8_0) at 128 rows, 0.81-0.83 at 384,
# 0.84-1.19 at 512, 0.9-1.3 at 768. (Before rows in lanes, Zen 3 with AVX2: 1.1-3x at 16-128 rows, even at 256,
# behind at 512.)
INTEGER_PROMPT_ROWS = 384
MULTIPLE_OF_OUTPUTS = 16  # torch's packing takes whole groups of 16 output rows


def fits(shape: torch.Size | tuple[int, ...], group: int = GROUP) -> bool:
    return len(shape) == 2 and shape[0] % MULTIPLE_OF_OUTPUTS == 0 and shape[1] % group == 0 and shape[1] > 0


@functools.cache
def available(device_type: str = "cpu") -> bool:
    """torch's CPU int4 product exists in this build (torch >= 2.5 on x86 and ARM): probe once."""
    if device_type != "cpu":
        return False
    try:
        q = torch.zeros(16, 32, dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        scales = torch.ones(1, 16, 2, dtype=torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.ones(1, 32, dtype=torch.bfloat16), packed, 32, scales)
        return bool((out.float() == 32 * (0 - 8 + 1)).all())  # (q - 8) * scale + zero = -7 per input
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def quantize_min_max(weight: torch.Tensor, top: int, group: int = GROUP,
                     chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] -> (q [N, K] int32 in 0..top, scale [N, K/group], low [N, K/group]) in float32, with
    w ≈ q * scale + low: each group's minimum and maximum map to 0 and top. A few thousand rows at a
    time: whole-matrix float copies of a vocabulary-sized head cost gigabytes."""
    rows, columns = weight.shape
    q = torch.empty(rows, columns, dtype=torch.int32)
    scale = torch.empty(rows, columns // group)
    lows = torch.empty(rows, columns // group)
    for begin in range(0, rows, chunk_rows):
        w = weight[begin: begin + chunk_rows].float().reshape(-1, columns // group, group)
        low, high = w.amin(-1), w.amax(-1)
        s = ((high - low) / top).clamp(min=1e-12)
        q[begin: begin + chunk_rows] = torch.round((w - low[..., None]) / s[..., None]).clamp(0, top) \
            .to(torch.int32).reshape(-1, columns)
        scale[begin: begin + chunk_rows], lows[begin: begin + chunk_rows] = s, low
    return q, scale, lows


QUANTIZE_PART_VALUES = 1 << 20  # weights quantised and packed at a time (whole blocks of 8 rows): a whole matrix's
# float copies and codes at once raised a Qwen2.5-0.5B layer's conversion 130 MiB above the loaded model


def quantized_in_parts(weight: torch.Tensor, quantize, pack, part_rows: int | None = None,
                       trim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] quantised by `quantize` (codes and scales per group, row by row) and packed by `pack`, `part_rows` rows
    (by default about QUANTIZE_PART_VALUES weights) at a time into one storage; `trim` as blocks_in_parts takes it."""
    rows = weight.shape[0]
    step = part_rows or int_dot.rows_per_part(weight.shape[1], QUANTIZE_PART_VALUES)
    parts = (quantize(weight[begin: begin + step]) for begin in range(0, rows, step))
    return int_dot.blocks_in_parts(parts, rows, pack, trim=trim)


def zero_form_blocks(q: torch.Tensor, scale: torch.Tensor,
                     zero: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 codes in Int4Linear's form (w = (q - 8) * scale + zero; zero None for Q4_0) -> the integer kernel's int4
    blocks, which hold w = q * scale + min."""
    return int_dot.int4_blocks(q, scale, None if zero is None else zero - 8 * scale)


def quantize_int4(weight: torch.Tensor, group: int = GROUP,
                  chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] -> (q [N, K] int32 in 0..15, scale [N, K/group], zero [N, K/group]) in float32, with
    w ≈ (q - 8) * scale + zero: each group's minimum and maximum map to 0 and 15."""
    q, scale, low = quantize_min_max(weight, 15, group, chunk_rows)
    return q, scale, low + 8 * scale


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    group = q.shape[1] // scale.shape[1]
    return (q.float() - 8) * scale.repeat_interleave(group, 1) + zero.repeat_interleave(group, 1)


class Int4Linear(Product, nn.Module):
    """A drop-in replacement for nn.Linear holding int4 weights (two per byte, in torch's packed layout) and
    a scale and zero point per group of inputs, in the activations' dtype.

    With `integer` (the integer dot-product kernel runs here, AVX2; groups of 32 and a fitting shape), the
    weights are stored in that kernel's blocks with float16 scales and minimums instead (int_dot.py): few
    rows (decoding, and prompts up to `kernel_rows`) go through it with the activations quantised to int8,
    longer prompts through a GEMM on the weight converted to float32 (or the activations' dtype where bfloat16
    products are fast)."""

    kernel_rows = INTEGER_PROMPT_ROWS  # more rows take the float GEMM (this CPU's figure: crossover.py)

    def __init__(self, linear: nn.Linear, group: int = GROUP, quantized=None, integer: bool = False):
        """`quantized`: (q, scale, zero) from a file already in this format (GGUF Q4_0/Q4_1/Q4_K), else computed;
        zero None where every zero is 0 (Q4_0): the integer kernel's blocks then hold scales alone."""
        super().__init__()
        self.in_features, self.out_features, self.group = linear.in_features, linear.out_features, group
        dtype = linear.weight.dtype if linear.weight.dtype.is_floating_point else torch.bfloat16
        if quantized is None and integer and group == int_dot.GROUP and int_dot.int4_fits(tuple(linear.weight.shape)):
            self._hold_blocks(linear, *quantized_in_parts(linear.weight.detach(), quantize_int4, zero_form_blocks))
            return
        q, scale, zero = quantized if quantized is not None else quantize_int4(linear.weight.detach(), group)
        self.integer = integer and group == int_dot.GROUP and int_dot.int4_fits(tuple(q.shape))
        if self.integer:
            packed, sm = zero_form_blocks(q, scale, zero)
            self.register_buffer("packed", packed)
            self.register_buffer("scales_and_mins", sm)
        else:
            zero = torch.zeros_like(scale) if zero is None else zero
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
            self.register_buffer("scales_and_zeros", torch.stack([scale.t(), zero.t()], -1).to(dtype).contiguous())
        self.dtype = dtype
        self.bias = linear.bias

    def _hold_blocks(self, linear: nn.Linear, packed: torch.Tensor, sm: torch.Tensor) -> None:
        """Become `linear` (its sizes, dtype and bias) with the weight in the integer kernel's blocks."""
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.group = linear.in_features, linear.out_features, GROUP
        self.dtype = linear.weight.dtype if linear.weight.dtype.is_floating_point else torch.bfloat16
        self.integer = True
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_mins", sm)
        self.bias = linear.bias

    @classmethod
    def holding(cls, linear: nn.Linear, packed: torch.Tensor, sm: torch.Tensor) -> Int4Linear:
        """`linear` with its weight already in the integer kernel's blocks of this class's layout (a file's codes,
        packed a part at a time: int_dot.blocks_in_parts)."""
        module = cls.__new__(cls)
        module._hold_blocks(linear, packed, sm)
        return module

    @classmethod
    def joined(cls, parts: list[Int4Linear]) -> Int4Linear | None:
        """One module whose outputs are the parts' in order (a file's stored 4-bit q, k and v, or gate and up, as
        one product), where all are in the integer kernel's blocks with the same inputs: their blocks are whole
        groups of 8 output rows, so they concatenate (int4 parts among int5 ones take int5's layout, the same
        weights). None otherwise (torch's packing is left as it is)."""
        first = parts[0]
        if not all(p.integer and p.in_features == first.in_features and p.group == first.group for p in parts):
            return None
        blocks = [(p.packed, p.scales_and_mins, int_dot.bits_of(p.packed)) for p in parts]
        kinds = {bits for _, _, bits in blocks}
        if kinds & {6, 8} and len(kinds) > 1:  # a scale per 16, or int8 per 32, joins its own kind only
            return None
        if len(kinds) > 1:
            blocks = [(*int_dot.int5_from_int4(w, sm), 5) if bits == 4 else (w, sm, bits) for w, sm, bits in blocks]
        if len({sm.shape[-2] for _, sm, _ in blocks}) > 1:  # Q4_0/Q5_0 parts (scales alone) with others' minimums
            blocks = [(w, int_dot.int4_with_mins(sm, bits), bits) for w, sm, bits in blocks]
        kind = {5: Int5Linear, 6: Int6Per16Linear, 8: Int8GroupLinear}.get(blocks[0][2], cls)
        fused = kind.__new__(kind)
        nn.Module.__init__(fused)
        fused.in_features, fused.out_features = first.in_features, sum(p.out_features for p in parts)
        fused.group, fused.integer, fused.dtype = first.group, True, first.dtype
        fused.register_buffer("packed", torch.cat([w for w, _, _ in blocks]))
        fused.register_buffer("scales_and_mins", torch.cat([sm for _, sm, _ in blocks]))
        fused.bias = joined_bias(parts, first.dtype, first.packed.device)
        return fused

    @property
    def label(self) -> str:
        if self.integer:
            return f"int4 kernel (x int8 activations, {int_dot.isa_label()}, groups of {self.group})"
        return f"torch int4 (groups of {self.group})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.integer:
            return self._integer(x)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype).contiguous()
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scales_and_zeros)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _integer(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= self.kernel_rows * self.in_features:  # one op call, bias included: less Python
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return torch.ops.llmcli.int4_dot.default(x, self.packed, self.scales_and_mins, None, bias)
        # long prompts: a float GEMM on the converted weight
        dtype = x.dtype if x.dtype == torch.float32 or bf16_matmul_is_fast() else torch.float32
        weight = int_dot.int4_unblock(self.packed, self.scales_and_mins, dtype)
        out = torch.nn.functional.linear(x.to(dtype), weight).to(x.dtype)
        return out if self.bias is None else out + self.bias.to(out.dtype)


class Int5Linear(Int4Linear):
    """Weight-only int5: q in 0..31 with a float16 scale and minimum per 32 inputs (w = q * scale + min), 6 bits a
    weight against int8's 8.5, on the integer kernel only (int_dot.py; its int4 op takes both layouts): GGUF's
    Q5_0, Q5_1 and Q5_K codes as the file stores them, or `--quantize int5`. Without that kernel, int5 runs int8."""

    def __init__(self, linear: nn.Linear, quantized=None):
        """`quantized`: (q, scale, low) from a file (low None for Q5_0: w = (q - 16) * scale), else computed."""
        if quantized is None:
            five_bits = functools.partial(quantize_min_max, top=31)
            self._hold_blocks(linear, *quantized_in_parts(linear.weight.detach(), five_bits, int_dot.int5_blocks))
            return
        self._hold_blocks(linear, *int_dot.int5_blocks(*quantized))

    @property
    def label(self) -> str:
        return f"int5 kernel (x int8 activations, {int_dot.isa_label()}, groups of {self.group})"


class Int8GroupLinear(Int4Linear):
    """int8 codes with a float16 scale per 32 inputs (w = q * scale, 8.5 bits a weight): GGUF's Q8_0 as the file
    stores it, on the integer kernel (int_dot.py; its int4 op takes this layout too, so the fused layer, MLP and
    expert ops run it). llmcli's own int8 (Int8Linear) has a scale per output row: re-quantising a Q8_0 file onto
    it rounds every weight a second time, where this multiplies by exactly the file's matrix."""

    def __init__(self, linear: nn.Linear, quantized):
        """`quantized`: (q [N, K] in -128..127, scale [N, K/32], None) from the file."""
        q, scale, _ = quantized
        self._hold_blocks(linear, *int_dot.int8_group_blocks(q, scale))

    @property
    def label(self) -> str:
        return f"int8 kernel, a scale per {self.group} inputs (x int8 activations, {int_dot.isa_label()})"


class Int6Per16Linear(Int4Linear):
    """GGUF's Q6_K as the file stores it: 6-bit codes, an int8 sub-scale per 16 inputs and a float16 d per 256
    (w = (q - 32) * d * sub, 6.5625 bits a weight), on the integer kernel (int_dot.py), in int8 runs of Q6_K files
    and as the head of low-bit runs: fewer bytes than int8's 8 and the file's own matrix instead of a second
    rounding."""

    # Its two scales per group keep its unpacking and sums dearer than int4's: one 4864 x 896 or 896 x 4864 matrix,
    # 2 threads, Zen 4, kernel time over unblock + bfloat16 GEMM 0.84-1.09 at 96 rows, 0.92-1.34 at 128, 1.06-1.29
    # at 160-192.
    kernel_rows = 128

    def __init__(self, linear: nn.Linear, quantized):
        """`quantized`: (q [N, K] in 0..63, sub [N, K/16] int8, d [N, K/256]) from the file."""
        self._hold_blocks(linear, *int_dot.q6_k_blocks(*quantized))

    @property
    def label(self) -> str:
        return f"6-bit kernel, a scale per 16 inputs (x int8 activations, {int_dot.isa_label()})"
