"""Qwen2 / Qwen2.5 / Qwen3 dense decoder.

Module attribute names equal the checkpoint tensor names (`model.layers.3.self_attn.q_proj.weight`),
so loading is a rename-free state dict. The cache is an object passed in; an optional recorder
observes named points (`resid_pre`, `attn_out`, ...) without changing any result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.config import ModelConfig
from llmcli.models.layers import (
    Cache,
    KVLayerCache,
    RMSNorm,
    SwiGLU,
    apply_rope,
    attention_mask,
    rope_cos_sin,
    rope_inv_freq,
)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.window = window
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, layer_cache: KVLayerCache, start: int) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = layer_cache.update(start, k, v)
        mask, causal = attention_mask(start, t, k.shape[2], self.window, x.device)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, cfg.layer_windows[index] if cfg.layer_windows else None)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, cache: Cache, start: int, recorder=None) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), cos, sin, cache.layers[self.index], start)
        mid = x + attn
        mlp = self.mlp(self.post_attention_layernorm(mid))
        out = mid + mlp
        if recorder is not None:
            for name, value in (("resid_pre", x), ("attn_out", attn), ("resid_mid", mid),
                                ("mlp_out", mlp), ("resid_post", out)):
                recorder.record(self.index, name, value)
        return out


class QwenBody(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class QwenForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = QwenBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.init_buffers()

    def init_buffers(self, device=None) -> None:
        """(Re)compute the non-checkpoint tensors, e.g. after materialising from the meta device."""
        cfg = self.config
        inv_freq, self.rope_scale = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def tied_parameters(self) -> set[str]:
        return {"lm_head.weight"} if self.config.tie_word_embeddings else set()

    def make_cache(self, batch: int, max_len: int, dtype=None, device=None) -> Cache:
        cfg = self.config
        dtype = dtype or self.model.embed_tokens.weight.dtype
        device = device or self.model.embed_tokens.weight.device
        layers = [
            KVLayerCache(batch, cfg.num_kv_heads, max_len, cfg.head_dim, cfg.head_dim, dtype, device)
            for _ in range(cfg.num_layers)
        ]
        return Cache(layers, max_len)

    def attention_info(self, index: int, cache: Cache | None = None) -> dict:
        """Facts about layer `index`'s attention for `trace` (no computation involved)."""
        cfg = self.config
        window = self.model.layers[index].self_attn.window
        return {
            "type": "sliding" if window else "full",
            "window": window,
            "heads": cfg.num_heads,
            "kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "rope_base": cfg.rope_theta,
            "yarn_factor": cfg.rope_scaling.factor if cfg.rope_scaling.type == "yarn" else None,
            "rope_scale": self.rope_scale,
            "logn_scale": None,
            "ntk_alpha": None,
            "cache_bytes_per_token": 2 * cfg.num_kv_heads * cfg.head_dim * self.lm_head.weight.element_size(),
        }

    def forward(self, input_ids: torch.Tensor, cache: Cache, recorder=None, last_only: bool = False):
        """input_ids [B, T] continue the sequence held in `cache`; returns logits [B, T or 1, vocab]."""
        start, t = cache.length, input_ids.shape[1]
        if start + t > cache.max_len:
            raise ValueError(f"sequence of {start + t} tokens exceeds the cache ({cache.max_len})")
        x = self.model.embed_tokens(input_ids)
        positions = torch.arange(start, start + t, device=input_ids.device)
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.rope_scale, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, start, recorder)
        cache.length = start + t
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        if recorder is not None:
            recorder.record(None, "final_norm", x)
        return self.lm_head(x)
