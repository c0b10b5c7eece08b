"""Building blocks shared by the decoders: RMSNorm, RoPE variants, SwiGLU, attention masks, caches.

Nothing here reads files or prints: modules take tensors (and a cache) and return tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.config import RopeScaling


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 like the reference implementations, then scale in the input dtype.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def fuse_linears(parent: nn.Module, names: list[str], fused_name: str) -> list[int] | None:
    """Replace the nn.Linear children `names` of `parent`, which all read the same input, by one
    linear `fused_name` whose output is their concatenation. Decoding is a string of one-row
    products, each bound by streaming its weight: one larger product streams better than several
    small ones and saves calls. Returns the output sizes to split by (None if nothing was fused)."""
    parts = [getattr(parent, name, None) for name in names]
    if not all(type(p) is nn.Linear for p in parts):
        return None
    weight = torch.cat([p.weight.detach() for p in parts])
    fused = nn.Linear(parts[0].in_features, weight.shape[0], bias=any(p.bias is not None for p in parts),
                      device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if fused.bias is not None:  # a part without bias contributes zeros
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() if p.bias is not None else weight.new_zeros(
            p.out_features) for p in parts]), requires_grad=False)
    for name in names:
        delattr(parent, name)
    setattr(parent, fused_name, fused)
    return [p.out_features for p in parts]


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); attribute names follow the Llama-style checkpoints."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.fused = False

    def fuse_projections(self) -> None:
        """After loading: gate and up become one product (`gate_up_proj`)."""
        self.fused = fuse_linears(self, ["gate_proj", "up_proj"], "gate_up_proj") is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# -- RoPE ----------------------------------------------------------------------------------------


def default_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
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
    if scaling.type == "yarn":
        return yarn_inv_freq(dim, base, scaling)
    return default_inv_freq(dim, base), 1.0


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, scale: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [T, dim] in the rotate-half layout, computed in float32 then cast."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [T, D]."""
    return x * cos + rotate_half(x) * sin


# -- masks ---------------------------------------------------------------------------------------


def attention_mask(
    start: int, length: int, total: int, window: int | None, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """Mask for queries at positions start..start+length-1 over keys 0..total-1: key j is visible to
    query i when i - window < j <= i. Returns (boolean mask [length, total] or None, is_causal) so that
    the common cases use scaled_dot_product_attention's fast paths."""
    unwindowed = window is None or window >= total
    if unwindowed and length == 1:
        return None, False  # a single new query sees every cached key
    if unwindowed and start == 0:
        return None, True
    query = torch.arange(start, start + length, device=device)[:, None]
    key = torch.arange(total, device=device)[None, :]
    allowed = key <= query
    if window is not None:
        allowed &= key > query - window
    return allowed, False


# -- observation ---------------------------------------------------------------------------------


@dataclass
class RouterChoice:
    """What a MoE router decided for each token, recorded for `trace` (nothing is recomputed)."""

    experts: torch.Tensor  # [T, k] expert ids, highest weight first
    weights: torch.Tensor  # [T, k] the weights the expert outputs are mixed with
    scores: torch.Tensor  # [T, E] router probabilities (softmax or sigmoid), before any choice bias
    groups: torch.Tensor | None = None  # [T, topk_group] groups kept by group-limited routing


def record_residuals(recorder, index: int, resid_pre, attn_out, resid_mid, mlp_out, resid_post) -> None:
    """Hand a decoder layer's named points to the recorder (`trace`); a no-op without one."""
    if recorder is not None:
        for name, value in (("resid_pre", resid_pre), ("attn_out", attn_out), ("resid_mid", resid_mid),
                            ("mlp_out", mlp_out), ("resid_post", resid_post)):
            recorder.record(index, name, value)


# -- caches --------------------------------------------------------------------------------------


class Cache:
    """State carried between forward calls: per-layer tensors plus the number of tokens seen.

    Storage is pre-allocated for `max_len` tokens so the decode step works on fixed shapes.
    `state` holds per-sequence values that must persist across steps (e.g. the NTK alpha)."""

    def __init__(self, layers: list, max_len: int):
        self.layers = layers
        self.max_len = max_len
        self.length = 0
        self.state: dict = {}

    def reset(self) -> None:
        self.length = 0
        self.state.clear()

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` tokens (chat reuses a common prefix)."""
        self.length = min(self.length, length)

    def bytes_per_token(self) -> int:
        """Bytes stored per token, summed over layers."""
        return sum(layer.bytes_per_token() for layer in self.layers)


class KVLayerCache:
    """Keys and values of one attention layer: [B, kv_heads, max_len, head_dim] each."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, k_dim: int, v_dim: int, dtype, device):
        self.k = torch.zeros(batch, kv_heads, max_len, k_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, kv_heads, max_len, v_dim, dtype=dtype, device=device)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def bytes_per_token(self) -> int:
        return (self.k[0, :, 0].numel() + self.v[0, :, 0].numel()) * self.k.element_size()
