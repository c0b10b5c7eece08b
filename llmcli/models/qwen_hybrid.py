"""Qwen3-Next, Qwen3.5 and Qwen3.5-MoE: hybrid decoders whose layers mix tokens with either a Gated DeltaNet
(`models.deltanet`, most layers) or gated full attention (`models.gated_attention`, every 4th in the
released models), by `config.layer_types`. Qwen3.5 has a SwiGLU MLP in every layer, Qwen3-Next and
Qwen3.5-MoE the Qwen sparse MoE block (`models.qwen_moe`). Every RMSNorm outside the DeltaNet scales by
(1 + w).

Checkpoints as the hub ships them load directly: Qwen3.5's vision-language wrappers keep the decoder under
`model.language_model.*` (renamed to `model.*`); their `model.visual.*` tensors and every model's
multi-token-prediction head (`mtp.*`) are skipped without being read. Qwen3-Next's grouped DeltaNet
projections are regrouped into Qwen3.5's flat ones, and experts saved fused are split per expert.
"""

from __future__ import annotations

import torch
from torch import nn

from llmcli.config import ModelConfig
from llmcli.models.base import CausalLM
from llmcli.models.cache import Cache, KVLayerCache, Span
from llmcli.models.deltanet import GatedDeltaNet, regroup_ba, regroup_qkvz
from llmcli.models.gated_attention import GatedAttention, ZeroCentredRMSNorm
from llmcli.models.hooks import record_residuals
from llmcli.models.hybrid_cache import HybridCache, RecurrentLayerCache
from llmcli.models.layers import SwiGLU
from llmcli.models.qwen_moe import SparseMoeBlock, split_fused_experts
from llmcli.models.rope import rope_cos_sin, rope_inv_freq

WRAPPER_PREFIX = "model.language_model."
SKIPPED = {"model.visual.": "vision encoder", "mtp.": "multi-token-prediction"}


class HybridDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.linear = cfg.layer_types[index] == "linear_attention"  # else "full_attention"
        self.input_layernorm = ZeroCentredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if self.linear:
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            self.self_attn = GatedAttention(cfg)
        self.post_attention_layernorm = ZeroCentredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(index)
        self.mlp = SparseMoeBlock(cfg) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, cache, span: Span, recorder=None) -> torch.Tensor:
        h = self.input_layernorm(x)
        layer_cache = cache.layers[self.index]
        if self.linear:
            attn = self.linear_attn(h, layer_cache, self.index, recorder)
        else:
            attn = self.self_attn(h, cos, sin, layer_cache, span, self.index, recorder)
        mid = x + attn
        h = self.post_attention_layernorm(mid)
        mlp = self.mlp(h, self.index, recorder) if self.is_moe else self.mlp(h)
        out = mid + mlp
        record_residuals(recorder, self.index, x, attn, mid, mlp, out)
        return out


class HybridBody(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(HybridDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = ZeroCentredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class QwenHybridForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = HybridBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.skipped = dict.fromkeys(SKIPPED.values(), 0)
        self.init_buffers()

    def init_buffers(self, device=None) -> None:
        cfg = self.config
        inv_freq, self.rope_scale = rope_inv_freq(cfg.rotary_dim or cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # -- loading ---------------------------------------------------------------------------------

    def checkpoint_tensors(self, name: str, load):
        for prefix, what in SKIPPED.items():
            if name.startswith(prefix):  # never read: a wrapper's vision tower may be anything
                self.skipped[what] += 1
                return None
        if name.startswith(WRAPPER_PREFIX):
            name = "model." + name[len(WRAPPER_PREFIX):]
        stem, _, kind = name.rpartition(".")
        if stem.endswith(".linear_attn.in_proj_qkvz"):  # Qwen3-Next's grouped packing
            qkv, z = regroup_qkvz(load(), self.config)
            base = stem.rpartition(".")[0]
            return [(f"{base}.in_proj_qkv.{kind}", qkv), (f"{base}.in_proj_z.{kind}", z)]
        if stem.endswith(".linear_attn.in_proj_ba"):
            b, a = regroup_ba(load(), self.config)
            base = stem.rpartition(".")[0]
            return [(f"{base}.in_proj_b.{kind}", b), (f"{base}.in_proj_a.{kind}", a)]
        return split_fused_experts(name, load) or [(name, load())]

    def load_notes(self) -> list[str]:
        return [f"skipped {count} {what} tensors: not used for text generation"
                for what, count in self.skipped.items() if count]

    # -- running ---------------------------------------------------------------------------------

    def make_cache(self, batch: int, max_len: int, dtype=None, device=None) -> Cache:
        cfg = self.config
        dtype = dtype or self.model.embed_tokens.weight.dtype
        device = device or self.model.embed_tokens.weight.device
        channels = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + \
            cfg.linear_num_value_heads * cfg.linear_value_head_dim
        layers = [
            RecurrentLayerCache(batch, channels, cfg.linear_conv_kernel_dim, cfg.linear_num_value_heads,
                                cfg.linear_key_head_dim, cfg.linear_value_head_dim, dtype, device)
            if layer.linear else
            KVLayerCache(batch, cfg.num_kv_heads, max_len, cfg.head_dim, cfg.head_dim, dtype, device)
            for layer in self.model.layers
        ]
        return HybridCache(layers, max_len)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache, recorder=None,
                last_only: bool = False) -> torch.Tensor:
        t = input_ids.shape[1]
        span = self.span(positions, cache)
        if not span.static:
            cache.begin()
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.rope_scale, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, span, recorder)
        return self.logits(x, t, cache, recorder, last_only)

    # -- facts -----------------------------------------------------------------------------------

    def attention_info(self, index: int, cache: Cache | None = None) -> dict:
        cfg = self.config
        element = self.model.embed_tokens.weight.element_size()
        if self.model.layers[index].linear:
            channels = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + \
                cfg.linear_num_value_heads * cfg.linear_value_head_dim
            state = cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
            return {
                "type": "linear", "window": None, "heads": cfg.linear_num_value_heads,
                "kv_heads": cfg.linear_num_key_heads, "head_dim": cfg.linear_key_head_dim,
                "value_head_dim": cfg.linear_value_head_dim, "conv_kernel": cfg.linear_conv_kernel_dim,
                "rope_base": None, "yarn_factor": None, "rope_scale": None, "logn_scale": None,
                "ntk_alpha": None, "cache_bytes_per_token": 0,
                "state_bytes_per_sequence": channels * (cfg.linear_conv_kernel_dim - 1) * element + state,
            }
        return {
            "type": "full", "window": None, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim, "rotary_dim": cfg.rotary_dim, "output_gate": True,
            "rope_base": cfg.rope_theta,
            "yarn_factor": cfg.rope_scaling.factor if cfg.rope_scaling.type == "yarn" else None,
            "rope_scale": self.rope_scale, "logn_scale": None, "ntk_alpha": None,
            "cache_bytes_per_token": 2 * cfg.num_kv_heads * cfg.head_dim * element,
        }
