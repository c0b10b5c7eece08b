"""Positions: every RoPE variant the families use, and original Qwen's LogN query scaling.

- default RoPE: inv_freq[i] = base^(-2i/d);
- YaRN (Qwen2.5 long context, DeepSeek V2/V3): low frequencies interpolated by `factor`, high ones kept,
  blended by a linear ramp over the dims; cos/sin scaled by an attention factor; DeepSeek's MLA softmax
  scale also grows by mscale^2;
- dynamic NTK (original Qwen): the base grows with the prompt length, chosen once per prefill;
- partial rotary (original Qwen's rotary_pct < 1): only the first rotary dims rotate (the model slices);
- layouts: rotate-half (Qwen: pairs (x_i, x_{i+d/2})) or interleaved pairs (DeepSeek's checkpoints);
- LogN (original Qwen): the query at 0-based position p is scaled by ln(p+1)/ln(S) once p+1 > S.
Worked values for each are in tests/test_rope.py.
"""

from __future__ import annotations

import math

import torch

from llmcli.config_fields import RopeScaling

# -- frequencies ---------------------------------------------------------------------------------


def default_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(scale) + 1 (1 without scaling)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(dim: int, base: float, s: RopeScaling) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate the low frequencies, keep the high ones, blend with a linear ramp over the
    dimensions between the beta_fast and beta_slow rotation counts. Returns (inv_freq, cos/sin scale)."""
    factor = s.factor
    if s.attention_factor is not None:
        attention = float(s.attention_factor)
    elif s.mscale and s.mscale_all_dim:
        attention = yarn_mscale(factor, s.mscale) / yarn_mscale(factor, s.mscale_all_dim)
    else:
        attention = yarn_mscale(factor)
    original = s.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 - ramp  # 1 where the frequency is kept as is
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention


def rope_inv_freq(dim: int, base: float, scaling: RopeScaling) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim/2], cos/sin scale). Computed on the CPU even while a model is built on the meta
    device: meta arithmetic goes through torch._dynamo, whose import alone costs ~75 MiB of resident memory."""
    with torch.device("cpu"):
        if scaling.type == "yarn":
            return yarn_inv_freq(dim, base, scaling)
        return default_inv_freq(dim, base), 1.0


def yarn_softmax_scale(head_dim: int, scaling: RopeScaling) -> float:
    """MLA's softmax scale: head_dim^-0.5, times mscale^2 under YaRN (the longer context sharpens the softmax)."""
    scale = head_dim ** -0.5
    if scaling.type == "yarn" and scaling.mscale_all_dim:
        m = yarn_mscale(scaling.factor, float(scaling.mscale_all_dim))
        scale *= m * m
    return scale


# -- dynamic NTK (original Qwen) -------------------------------------------------------------------


def ntk_alpha(length: int, seq_length: int) -> int:
    """Dynamic-NTK alpha for a prefill of `length` tokens: 2^ceil(log2(L/S) + 1) - 1, at least 1.
    math.log(x, 2) as in the reference: at exact powers of two its rounding decides the ceiling."""
    return max(2 ** math.ceil(math.log(length / seq_length, 2) + 1) - 1, 1)


def ntk_base(base: float, alpha: float, dim: int) -> float:
    """RoPE base after NTK-aware scaling by alpha over `dim` rotary dims: base * alpha^(d/(d-2))."""
    return base * alpha ** (dim / (dim - 2))


# -- LogN (original Qwen) --------------------------------------------------------------------------


def logn_factor(position: int, seq_length: int) -> float:
    """The LogN factor of the query at 0-based `position`: ln(p+1)/ln(S) beyond S, else 1."""
    return max(1.0, math.log(position + 1) / math.log(seq_length))


def logn_scale(start: int, length: int, seq_length: int) -> torch.Tensor:
    """LogN factors [length, 1] for queries at positions start..start+length-1 (float64, like the
    reference's Python table)."""
    p1 = torch.arange(start + 1, start + length + 1, dtype=torch.float64)
    return torch.where(p1 > seq_length, p1.log() / math.log(seq_length), 1.0)[:, None]


def logn_scale_at(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """`logn_scale` for a positions tensor (a compiled step, where no position is a Python number): [T, 1],
    or [B, 1, T, 1] for per-row positions [B, T]."""
    p1 = positions.to(torch.float64)[..., None] + 1
    scale = (p1.log() / math.log(seq_length)).clamp(min=1.0)
    return scale[:, None] if positions.dim() == 2 else scale


# -- rotation --------------------------------------------------------------------------------------


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [T, dim] in the rotate-half layout, computed in float32 then cast ([B, 1, T, dim] for
    per-row positions [B, T], to broadcast over heads)."""
    freqs = per_row(positions.float()[..., None] * inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def pair_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, dim/2], one per rotated pair (`rotate_pairs`), computed in float32 then cast ([B, 1, T,
    dim/2] for per-row positions [B, T])."""
    freqs = per_row(positions.float()[..., None] * inv_freq)
    return (freqs.cos() * scale).to(dtype), (freqs.sin() * scale).to(dtype)


def per_row(freqs: torch.Tensor) -> torch.Tensor:
    """[T, d] stays; [B, T, d] (per-row positions) becomes [B, 1, T, d], to broadcast over the heads axis."""
    return freqs[:, None] if freqs.dim() == 3 else freqs


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: [B, H, T, D]; cos/sin: [T, D]."""
    return x * cos + rotate_half(x) * sin


def fold_sign(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: rotate_half's minus sign moved onto sin, once per forward call, so
    that `rotate` needs no negation and no concatenation in every layer."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, folded_sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` with sin from `fold_sign`, in 4 ops instead of 7: rotate_half(x) * sin is the halves of x
    swapped times the folded sin, and negating a factor of a product is exact, so the result is bit for bit
    apply_rope's."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * folded_sin


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """RoPE on the last dim of x with cos/sin [T, d/2]. Pairs are (x0, x1), (x2, x3)... when interleaved
    (DeepSeek's checkpoint layout), else (x_i, x_{i+d/2}). The result is written half-split either way:
    queries and keys share the layout, so their dot products are those of the checkpoint's layout."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
