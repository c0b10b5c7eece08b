"""Qwen (original), Qwen2 / Qwen2.5 and Qwen3 decoders: dense, and MoE (Qwen1.5/2-MoE, Qwen3-MoE) with
the sparse block of `models.qwen_moe` in place of the MLP.

Module attribute names equal the Qwen2 checkpoint tensor names (`model.layers.3.self_attn.q_proj.weight`),
so loading Qwen2/3 is a rename-free state dict; original Qwen checkpoints (`transformer.h.3.attn.c_attn`)
are renamed and split on the way in (`qwen1_checkpoint_tensors`). The cache is an object passed in; an
optional recorder observes named points (`models.hooks`) without changing any result.

Original Qwen adds two long-context tricks relative to its training length S = seq_length (`models.rope`):
- LogN: the query at 0-based position p is scaled by ln(p+1)/ln(S) once p+1 > S (keys never are);
- dynamic NTK: the RoPE base grows with the prompt length L, chosen once at prefill and kept in the cache
  because every cached key was rotated with it.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.config import ModelConfig
from llmcli.errors import LlmcliError
from llmcli.models.base import CausalLM, FusesProjections
from llmcli.models.cache import Cache, KVLayerCache, Span
from llmcli.models.hooks import ATTN_PROBS, AttentionWeights, asks, record_residuals
from llmcli.models.layers import (
    RMSNorm,
    SwiGLU,
    attention_mask,
    fuse_linears,
    head_probs,
    one_query_attention,
    one_query_attention_eager,
)
from llmcli.models.qwen_moe import SparseMoeBlock, split_fused_experts
from llmcli.models.rope import (
    default_inv_freq,
    fold_sign,
    logn_factor,
    logn_scale,
    logn_scale_at,
    ntk_alpha,
    ntk_base,
    rope_cos_sin,
    rope_inv_freq,
    rotate,
)

# The reference code's LogN table and the Qwen README's NTK claim cover 32K positions.
QWEN1_NTK_CONTEXT = 32768


class Attention(FusesProjections, nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None, index: int = 0):
        super().__init__()
        self.index = index  # the layer's, for what is recorded
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.window = window
        # Partial rotary (original Qwen's rotary_pct < 1): only the first rotary_dim dims are rotated.
        self.rotary_dim = cfg.rotary_dim if cfg.rotary_dim and cfg.rotary_dim < cfg.head_dim else None
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.qkv_sizes: list[int] | None = None

    def fuse_projections(self) -> None:
        """After loading: q, k and v become one product (`qkv_proj`). With q/k norms (Qwen3), their weights
        are also stacked per head, [H + KV, 1, D], so that one product scales the normalised q and k of the
        fused output (the norms share eps, rms_norm_eps). A plain attribute, not a buffer: derived, a few KiB,
        and made where the loaded weights already are."""
        self.qkv_sizes = fuse_linears(self, ["q_proj", "k_proj", "v_proj"], "qkv_proj")
        if self.qkv_sizes is not None and self.q_norm is not None:
            h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
            stacked = torch.cat((self.q_norm.weight.detach().expand(h, d), self.k_norm.weight.detach().expand(kv, d)))
            self.qk_norm_weight = stacked[:, None]

    def _rope(self, x, cos, sin):
        """RoPE with `sin` sign-folded (`rope.fold_sign`)."""
        if self.rotary_dim is None and cos.dtype == x.dtype:
            return rotate(x, cos, sin)  # Qwen2/3: in the model's dtype
        # Original Qwen rotates in float32 and casts back, possibly only the first rotary_dim dims.
        y = x.to(cos.dtype)
        if self.rotary_dim is None:
            y = rotate(y, cos, sin)
        else:
            y = torch.cat((rotate(y[..., :self.rotary_dim], cos, sin), y[..., self.rotary_dim:]), dim=-1)
        return y.to(x.dtype)

    def _heads(self, x, cos, sin):
        """q, k, v [B, heads, T, D]: projected, normalised (Qwen3) and rotated. From the fused product,
        q and k are one view of its output and rotate together."""
        b, t, _ = x.shape
        h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_sizes is None:
            q, k, v = (p(x).view(b, t, -1, d).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        else:
            qkv = self.qkv_proj(x).view(b, t, h + 2 * kv, d).transpose(1, 2)
            qk = qkv[:, :h + kv]
            if self.q_norm is not None:  # Qwen3: q and k normalised together, then each norm's weight
                qk = self.qk_norm_weight * self.q_norm.normalized(qk)
            qk = self._rope(qk, cos, sin)
            return qk[:, :h], qk[:, h:], qkv[:, h + kv:]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self._rope(q, cos, sin), self._rope(k, cos, sin), v

    def attend_one_query(self, q, k, v, mask, scale) -> torch.Tensor:
        """An eager CPU decode step's attention over the cache's keys (`mask`: None, or this layer's window); the
        backends may run it as one op."""
        return one_query_attention_eager(q, k, v, mask, scale)

    def attend_static(self, q, k, v, mask, scale, positions) -> torch.Tensor:
        """A static step's attention over every cache row, `mask` built from `positions` ([T], or [B, T] per row)
        and this layer's window; the backends may run an eager CPU step as one op."""
        return one_query_attention(q, k, v, mask, scale)

    def forward(self, x, cos, sin, layer_cache: KVLayerCache, span: Span, q_scale=None, recorder=None
                ) -> torch.Tensor:
        """`sin` sign-folded (`rope.fold_sign`); `q_scale` (LogN): a float for one eager query (folded into
        the softmax scale), else [T, 1]."""
        b, t, _ = x.shape
        q, k, v = self._heads(x, cos, sin)
        scale = None
        if isinstance(q_scale, float):
            scale = q_scale / self.head_dim ** 0.5
        elif q_scale is not None:
            q = q * q_scale
        k, v = layer_cache.update(span, k, v)
        if asks(recorder, ATTN_PROBS) and not span.static:  # beside the kernel below, which stays as it is
            probs = head_probs(q, k, scale, span.start, self.window)
            recorder.record(self.index, ATTN_PROBS, AttentionWeights(probs, span.start))
        mask, causal = attention_mask(span, t, k.shape[2], self.window, x.device)
        if span.static:  # a decode step over the whole static cache (compiled, or a batch of rows at their positions)
            out = self.attend_static(q, k, v, mask, scale, span.positions)
        elif t == 1 and x.device.type == "cpu":  # an eager decode step: [B, H, 1, D] is [B, 1, H * D]
            return self.o_proj(self.attend_one_query(q, k, v, mask, scale).view(b, 1, -1))
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                                 enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, cfg.layer_windows[index] if cfg.layer_windows else None, index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(index)  # Qwen2-MoE / Qwen3-MoE
        self.mlp = SparseMoeBlock(cfg) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, cache, span: Span, recorder=None, q_scale=None) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), cos, sin, cache.layers[self.index], span, q_scale, recorder)
        mid = x + attn
        h = self.post_attention_layernorm(mid)
        mlp = self.mlp(h, self.index, recorder) if self.is_moe else self.mlp(h)
        out = mid + mlp
        record_residuals(recorder, self.index, x, attn, mid, mlp, out)
        return out


class QwenBody(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# Original Qwen tensor names -> ours (the fused c_attn is handled separately).
_QWEN1_NAMES = [
    (re.compile(r"transformer\.wte\.weight"), "model.embed_tokens.weight"),
    (re.compile(r"transformer\.ln_f\.weight"), "model.norm.weight"),
    (re.compile(r"lm_head\.weight"), "lm_head.weight"),
    (re.compile(r"transformer\.h\.(\d+)\.ln_1\.weight"), r"model.layers.\1.input_layernorm.weight"),
    (re.compile(r"transformer\.h\.(\d+)\.ln_2\.weight"), r"model.layers.\1.post_attention_layernorm.weight"),
    (re.compile(r"transformer\.h\.(\d+)\.attn\.c_proj\.weight"), r"model.layers.\1.self_attn.o_proj.weight"),
    # MLP = c_proj(w1(x) * silu(w2(x))): w2 is the gate, w1 the up projection.
    (re.compile(r"transformer\.h\.(\d+)\.mlp\.w2\.weight"), r"model.layers.\1.mlp.gate_proj.weight"),
    (re.compile(r"transformer\.h\.(\d+)\.mlp\.w1\.weight"), r"model.layers.\1.mlp.up_proj.weight"),
    (re.compile(r"transformer\.h\.(\d+)\.mlp\.c_proj\.weight"), r"model.layers.\1.mlp.down_proj.weight"),
]
_QWEN1_C_ATTN = re.compile(r"transformer\.h\.(\d+)\.attn\.c_attn\.(weight|bias)")
# Buffers some exports saved: recomputed here, never loaded.
_QWEN1_SKIP = re.compile(r".*(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)")


def qwen1_checkpoint_tensors(name: str, load) -> list[tuple[str, torch.Tensor]] | None:
    """Map one original-Qwen tensor to ours; c_attn rows are Q|K|V (each head-major) and split three ways."""
    if _QWEN1_SKIP.fullmatch(name):
        return None
    fused = _QWEN1_C_ATTN.fullmatch(name)
    if fused:
        layer, kind = fused.groups()
        tensor = load()
        if tensor.shape[0] % 3:
            raise LlmcliError(f"{name} has {tensor.shape[0]} rows; a fused Q|K|V needs a multiple of 3")
        q, k, v = tensor.chunk(3, dim=0)
        prefix = f"model.layers.{layer}.self_attn"
        return [(f"{prefix}.q_proj.{kind}", q), (f"{prefix}.k_proj.{kind}", k), (f"{prefix}.v_proj.{kind}", v)]
    for pattern, target in _QWEN1_NAMES:
        if pattern.fullmatch(name):
            return [(pattern.sub(target, name), load())]
    return [(name, load())]  # unknown: the loader names it as unexpected


class QwenForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = QwenBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope_dtype = torch.float32 if cfg.family == "qwen" else None  # None: the activations' dtype
        self.set_attention_options()
        self.init_buffers()

    def init_buffers(self, device=None) -> None:
        cfg = self.config
        inv_freq, self.rope_scale = rope_inv_freq(self.rope_dim, cfg.rope_theta, cfg.rope_scaling)
        if cfg.rope_freq_factors is not None:  # llama3 scaling from a GGUF's rope_freqs
            inv_freq = inv_freq / torch.tensor(cfg.rope_freq_factors, dtype=inv_freq.dtype, device=inv_freq.device)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def checkpoint_tensors(self, name: str, load):
        # Only original Qwen needs renaming; Qwen2/3 tensors load under their own names, MoE experts saved
        # fused ([E, 2I, H]) are split into the per-expert tensors the hub ships.
        if self.config.family == "qwen":
            return qwen1_checkpoint_tensors(name, load)
        return (self.config.is_moe and split_fused_experts(name, load)) or [(name, load())]

    def derived_tensors(self) -> list[torch.Tensor]:
        """Qwen3's stacked q/k norm weights (`Attention.fuse_projections`)."""
        return [t for layer in self.model.layers if (t := getattr(layer.self_attn, "qk_norm_weight", None)) is not None]

    @property
    def rope_dim(self) -> int:
        return self.config.rotary_dim or self.config.head_dim

    def set_attention_options(self, use_logn_attn: bool | None = None, use_dynamic_ntk: bool | None = None,
                              windows: list[int | None] | None = None) -> None:
        """Switch LogN / dynamic NTK (original Qwen only) and set per-layer windows (None = full attention).
        The config is updated too, so that it keeps describing what the model does."""
        cfg = self.config
        if use_logn_attn is not None:
            cfg.use_logn_attn = use_logn_attn
        if use_dynamic_ntk is not None:
            cfg.use_dynamic_ntk = use_dynamic_ntk
        if windows is not None:
            if len(windows) != cfg.num_layers:
                raise LlmcliError(f"{len(windows)} attention windows given for {cfg.num_layers} layers")
            cfg.layer_windows = list(windows)
            for layer, window in zip(self.model.layers, windows, strict=True):
                layer.self_attn.window = window
        # Plain attributes: forward reads these without touching the config.
        qwen1 = cfg.family == "qwen" and bool(cfg.seq_length)
        self.seq_length = cfg.seq_length
        self.use_logn = qwen1 and cfg.use_logn_attn
        self.dynamic_ntk = qwen1 and cfg.use_dynamic_ntk

    @property
    def context_limit(self) -> int:
        """max_position_embeddings, or 32K for original Qwen with dynamic NTK."""
        limit = self.config.max_position_embeddings
        return max(limit, QWEN1_NTK_CONTEXT) if self.dynamic_ntk else limit

    def reuses_cache(self, cache: Cache, total_length: int) -> bool:
        """Dynamic NTK picks its RoPE base once, from the length of a prefill that starts at position 0, and
        the cached keys were rotated with it: a conversation grown into another alpha is recomputed."""
        if not self.dynamic_ntk or "ntk_alpha" not in cache.state:
            return True
        return ntk_alpha(total_length, self.seq_length) == cache.state["ntk_alpha"]

    def make_cache(self, batch: int, max_len: int, dtype=None, device=None) -> Cache:
        cfg = self.config
        dtype = dtype or self.model.embed_tokens.weight.dtype
        device = device or self.model.embed_tokens.weight.device
        layers = [KVLayerCache(batch, cfg.num_kv_heads, max_len, cfg.head_dim, cfg.head_dim, dtype, device)
                  for _ in range(cfg.num_layers)]
        return Cache(layers, max_len)

    def _inv_freq(self, cache, span: Span, length: int) -> torch.Tensor:
        """Dynamic NTK: a prefill from position 0 chooses alpha from its length; later calls reuse it (cached
        keys were rotated with it)."""
        if not self.dynamic_ntk:
            return self.inv_freq
        if span.start == 0:
            alpha = ntk_alpha(length, self.seq_length)
            inv_freq = self.inv_freq
            if alpha > 1:
                base = ntk_base(self.config.rope_theta, alpha, self.rope_dim)
                inv_freq = default_inv_freq(self.rope_dim, base).to(self.inv_freq.device)
            cache.state["ntk_alpha"], cache.state["inv_freq"] = alpha, inv_freq
            return inv_freq
        return cache.state.get("inv_freq", self.inv_freq)

    def _q_scale(self, span: Span, length: int, dtype, device):
        """LogN factors for the span's queries, or None where every factor is 1."""
        if not self.use_logn:
            return None
        if span.static:  # no Python position: factors from the positions tensor (1 up to seq_length)
            return logn_scale_at(span.positions, self.seq_length).to(dtype)
        if span.start + length <= self.seq_length:
            return None
        if length == 1:  # an eager step: one Python float, no tensor work
            return logn_factor(span.start, self.seq_length)
        return logn_scale(span.start, length, self.seq_length).to(device=device, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache, recorder=None,
                last_only: bool = False) -> torch.Tensor:
        t = input_ids.shape[1]
        span = self.span(positions, cache)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self._inv_freq(cache, span, t), self.rope_scale, self.rope_dtype or x.dtype)
        sin = fold_sign(sin)  # once here rather than in every layer
        q_scale = self._q_scale(span, t, x.dtype, x.device)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, span, recorder, q_scale)
        return self.logits(x, t, cache, recorder, last_only)

    def attention_info(self, index: int, cache: Cache | None = None) -> dict:
        cfg = self.config
        window = self.model.layers[index].self_attn.window
        length = cache.length if cache is not None else 0
        rope_base, alpha, logn = cfg.rope_theta, None, None
        element = self.model.embed_tokens.weight.element_size()
        if self.dynamic_ntk:
            alpha = cache.state.get("ntk_alpha", 1) if cache is not None and length else 1
            rope_base = ntk_base(cfg.rope_theta, alpha, self.rope_dim)
        if self.use_logn:  # range of the factors applied to the queries held in the cache
            logn = (1.0, logn_factor(length - 1, self.seq_length) if length else 1.0)
        return {
            "type": "sliding" if window else "full",
            "window": window,
            "heads": cfg.num_heads,
            "kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "rope_base": rope_base,
            "yarn_factor": cfg.rope_scaling.factor if cfg.rope_scaling.type == "yarn" else None,
            "rope_scale": self.rope_scale,
            "logn_scale": logn,
            "ntk_alpha": alpha,
            "cache_bytes_per_token": 2 * cfg.num_kv_heads * cfg.head_dim * element,
        }
