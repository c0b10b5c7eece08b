"""The full-attention layers of Qwen3-Next and Qwen3.5 (one layer in four), and their zero-centred norm.

Differences from Qwen3's attention: `q_proj` yields twice the query width, per head [query (hd) | gate (hd)],
and the attention output is multiplied by sigmoid(gate) before `o_proj`; RoPE turns only the first
`rotary_dim` dims of each head (partial_rotary_factor 0.25); q_norm / k_norm, like every RMSNorm of these
models except the DeltaNet's gated one, scale by (1 + w) with w stored around zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.config import ModelConfig
from llmcli.models.base import FusesProjections
from llmcli.models.cache import KVLayerCache, Span
from llmcli.models.hooks import ATTN_GATE
from llmcli.models.layers import attention_mask, fuse_linears, one_query_attention, one_query_attention_eager
from llmcli.models.rope import apply_rope


class ZeroCentredRMSNorm(nn.Module):
    """y = x_hat * (1 + w), both in float32, cast back (Gemma style): the checkpoint stores w around 0."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


class GatedAttention(FusesProjections, nn.Module):
    """GQA softmax attention with a sigmoid output gate per head (`self_attn.*` in the checkpoints)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.rotary_dim = cfg.rotary_dim or cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, 2 * cfg.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = ZeroCentredRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = ZeroCentredRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qkv_sizes: list[int] | None = None

    def fuse_projections(self) -> None:
        """After loading: q (with its gate), k and v become one product (`qkv_proj`)."""
        self.qkv_sizes = fuse_linears(self, ["q_proj", "k_proj", "v_proj"], "qkv_proj")

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rotary_dim == self.head_dim:
            return apply_rope(x, cos, sin)
        turned, kept = x.split([self.rotary_dim, self.head_dim - self.rotary_dim], dim=-1)
        return torch.cat((apply_rope(turned, cos, sin), kept), dim=-1)

    def attend_one_query(self, q, k, v, mask) -> torch.Tensor:
        """An eager CPU decode step's attention over every cached key (`mask` None); the backends may run it as
        one op."""
        return one_query_attention_eager(q, k, v, mask, None)

    def attend_static(self, q, k, v, mask, positions) -> torch.Tensor:
        """A static step's attention over every cache row, `mask` built from `positions` ([T], or [B, T] per row);
        the backends may run an eager CPU step as one op."""
        return one_query_attention(q, k, v, mask, None)

    def _attend(self, q, k, v, span: Span, t: int) -> torch.Tensor:
        mask, causal = attention_mask(span, t, k.shape[2], None, q.device)
        if span.static:  # a decode step over the whole static cache (compiled, or a batch of rows at their positions)
            return self.attend_static(q, k, v, mask, span.positions)
        if t == 1 and q.device.type == "cpu":  # an eager decode step
            return self.attend_one_query(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              enable_gqa=self.num_kv_heads != self.num_heads)

    def forward(self, x, cos, sin, layer_cache: KVLayerCache, span: Span, index: int = 0,
                recorder=None) -> torch.Tensor:
        b, t, _ = x.shape
        if self.qkv_sizes is not None:
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, gate = q.view(b, t, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = self.q_norm(q).transpose(1, 2)
        k = self.k_norm(k.view(b, t, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        k, v = layer_cache.update(span, k, v)
        out = self._attend(q, k, v, span, t).transpose(1, 2)  # [B, T, heads, hd]
        gate = torch.sigmoid(gate)
        if recorder is not None:
            recorder.record(index, ATTN_GATE, gate.float().mean(-1))  # [B, T, heads]
        return self.o_proj((out * gate).reshape(b, t, -1))
