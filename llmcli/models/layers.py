"""Building blocks shared by the decoders: RMSNorm, RoPE variants, SwiGLU, attention masks, caches.

Nothing here reads files or prints: modules take tensors (and a cache) and return tensors.
"""

from __future__ import annotations

import math
import os
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


FEW_ROWS = 8  # the most sequences a compiled decode step takes (beyond that, products are not weight-bound)


def one_row(x: torch.Tensor) -> bool:
    """A compiled decode step of one sequence. With several rows inductor's multiply-and-sum loop reads
    the weight once per row (0.5B shape, batch 4: 26.6 tok/s against 51.6 through torch's product)."""
    return torch.compiler.is_compiling() and x.numel() == x.shape[-1]


# CUDA, bfloat16/float32 linears in a compiled one-row step: inductor's multiply-and-sum ("sum", 729 tok/s for
# the 0.5B shape on an H200) or cuBLAS through F.linear ("linear", 593): benchmarks/cuda_suite.sh runs both.
CUDA_GEMV = os.environ.get("LLMCLI_CUDA_GEMV", "sum")
CUDA_SUM_MAX_ROWS = 65536  # an H200 ran a vocabulary-sized head at 296 GB/s as a sum, 3476 through cuBLAS


class Linear(nn.Linear):
    """nn.Linear that, inside a compiled decode step of one sequence, runs as `one_row_linear`."""

    def sums_one_row(self, cuda: bool) -> bool:
        """Does a compiled one-row step run this layer as `one_row_linear` (else F.linear)?"""
        return not cuda or (CUDA_GEMV == "sum" and self.out_features < CUDA_SUM_MAX_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if one_row(x) and self.sums_one_row(x.is_cuda):
            return one_row_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def fuse_linears(parent: nn.Module, names: list[str], fused_name: str) -> list[int] | None:
    """Replace the nn.Linear children `names` of `parent`, which all read the same input, by one
    linear `fused_name` whose output is their concatenation. Decoding is a string of one-row
    products, each bound by streaming its weight: one larger product streams better than several
    small ones and saves calls. Returns the output sizes to split by (None if nothing was fused)."""
    parts = [getattr(parent, name, None) for name in names]
    if not all(type(p) in (nn.Linear, Linear) for p in parts):
        return None
    weight = torch.cat([p.weight.detach() for p in parts])
    fused = Linear(parts[0].in_features, weight.shape[0], bias=any(p.bias is not None for p in parts),
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
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)
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
    """Computed on the CPU even while a model is built on the meta device: meta arithmetic goes through
    torch._dynamo, whose import alone costs ~75 MiB of resident memory."""
    with torch.device("cpu"):
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
    the common cases use scaled_dot_product_attention's fast paths. A tensor `start` is the compiled
    decode step (one query over the whole static cache): always a mask, built without Python ints."""
    if isinstance(start, torch.Tensor):
        key = torch.arange(total, device=device)[None, :]
        allowed = key <= start
        if window is not None:
            allowed &= key > start - window
        return allowed, False
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


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                        scale: float | None) -> torch.Tensor:
    """Attention of one query per head (q [B, H, 1, D]) over a whole static cache (k, v [B, KV, L, D],
    H a multiple of KV) where `allowed` [1, L] marks the visible keys. Written as products and sums in
    float32 so that the compiled decode step fuses it into a few loops: SDPA's CPU kernel costs ~200 us
    per call for a single query."""
    b, h, _, d = q.shape
    kv_heads = k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    q = q.float().view(b, kv_heads, h // kv_heads, 1, d)
    scores = (q * k.float()[:, :, None]).sum(-1) * scale  # [B, KV, G, L]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    out = (probs[..., None] * v.float()[:, :, None]).sum(-2)  # [B, KV, G, D]
    return out.view(b, h, 1, -1).to(v.dtype)


def one_query_attention_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
                              scale: float | None) -> torch.Tensor:
    """`one_query_attention` for eager CPU decode steps, as two float32 matmuls (no [.., L, D] temporary);
    `allowed` None means every key. SDPA's CPU kernel took 150 us a call for one query: 3.6 ms of a
    45 ms step of the 0.5B shape."""
    b, h, _, d = q.shape
    kv_heads = k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    scores = torch.matmul(q.float().view(b, kv_heads, h // kv_heads, d), k.float().transpose(-1, -2)) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.matmul(scores.softmax(dim=-1), v.float())  # [B, KV, G, D]
    return out.view(b, h, 1, d).to(v.dtype)


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
        self._prefix: Cache | None = None  # the last prefix_view

    def reset(self) -> None:
        self.length = 0
        self.state.clear()

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` tokens (chat reuses a common prefix)."""
        self.length = min(self.length, length)

    def prefix_view(self, length: int) -> Cache:
        """The same storage cut to its first `length` positions: the compiled step attends to every
        position it is given (masked past the current one), so a shorter view is less to read."""
        view = self._prefix
        if view is None or view.max_len != length:  # kept: the next steps mostly ask for the same rows
            view = self._prefix = Cache([layer.prefix_view(length) for layer in self.layers], length)
        view.length, view.state = self.length, self.state
        return view

    def tensors(self) -> list[torch.Tensor]:
        """Every storage tensor of every layer, each sequence-major ([max_len, ...]): the compiled step
        writes them in place."""
        return [t for layer in self.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]

    def bytes_per_token(self) -> int:
        """Bytes stored per token, summed over layers."""
        return sum(layer.bytes_per_token() for layer in self.layers)


class KVLayerCache:
    """Keys and values of one attention layer, stored sequence-major: [max_len, B, kv_heads, head_dim]
    each, so that the first n positions are one contiguous block whatever max_len is (the compiled
    step reads such prefixes). Callers see [B, kv_heads, n, head_dim] views."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, k_dim: int, v_dim: int, dtype, device):
        self.k = torch.zeros(max_len, batch, kv_heads, k_dim, dtype=dtype, device=device)
        self.v = torch.zeros(max_len, batch, kv_heads, v_dim, dtype=dtype, device=device)

    def prefix_view(self, length: int) -> KVLayerCache:
        view = object.__new__(KVLayerCache)
        view.k, view.v = self.k[:length], self.v[:length]
        return view

    def update(self, start, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, kv_heads, T, dim] at start..; return the keys/values attended to. A tensor
        `start` is the compiled decode step: one token written in place, every row returned (the mask
        hides the unwritten ones)."""
        if isinstance(start, torch.Tensor):
            self.k.index_copy_(0, start.view(1), k.permute(2, 0, 1, 3))
            self.v.index_copy_(0, start.view(1), v.permute(2, 0, 1, 3))
            return self.k.permute(1, 2, 0, 3), self.v.permute(1, 2, 0, 3)
        end = start + k.shape[2]
        self.k[start:end] = k.permute(2, 0, 1, 3)
        self.v[start:end] = v.permute(2, 0, 1, 3)
        return self.k[:end].permute(1, 2, 0, 3), self.v[:end].permute(1, 2, 0, 3)

    def bytes_per_token(self) -> int:
        return (self.k[0, 0].numel() + self.v[0, 0].numel()) * self.k.element_size()
