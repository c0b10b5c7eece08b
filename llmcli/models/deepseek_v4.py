"""DeepSeek-V4 (V4-Flash, V4-Pro): compressed attention (`models.compressed_attention`), a residual of several
streams mixed by hyper-connections (`models.hyper_connections`), and DeepSeekMoE with a sqrt(softplus)
router, hash routing in the first layers (a token id decides its experts: `tid2eid`) and a clamped SwiGLU.

Module names are transformers' in-memory ones, so its checkpoints load as saved; the reference/hub
naming (`layers.N.attn.wq_a`, `ffn.experts.E.w1`, `hc_attn_fn`, ...) is renamed on load (`v4_name`), and
transformers' fused experts are split per expert. The multi-token-prediction layers are skipped unread.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.config import ModelConfig
from llmcli.config_deepseek_v4 import HASH, V4Settings, v4_settings
from llmcli.config_fields import RopeScaling
from llmcli.errors import LlmcliError
from llmcli.models.base import CausalLM
from llmcli.models.cache import Cache
from llmcli.models.compressed_attention import CompressedAttention, Compressor, Rope
from llmcli.models.hooks import ROUTED_OUT, ROUTER, SHARED_OUT, RouterChoice, record_residuals
from llmcli.models.hyper_connections import FloatRMSNorm, HyperConnection, HyperHead
from llmcli.models.layers import Experts, SwiGLU
from llmcli.models.qwen_moe import split_fused_experts
from llmcli.models.rope import rope_inv_freq
from llmcli.models.v4_cache import V4Cache, V4LayerCache
from llmcli.models.v4_hooks import HC_MIXING, MixingRecord

# Reference (hub) names -> transformers' in-memory names, applied in this order after dropping "model.".
RENAMES = [(re.compile(pattern), target) for pattern, target in (
    (r"\.attn\.", ".self_attn."), (r"\.ffn\.", ".mlp."), (r"\.indexer\.compressor\.", ".compressor.indexer."),
    (r"^embed\.weight", "embed_tokens.weight"), (r"^head\.weight", "lm_head.weight"),
    (r"^hc_head_(fn|base|scale)$", r"hc_head.hc_\1"), (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."), (r"\.hc_(attn|ffn)_(fn|base|scale)$", r".\1_hc.\2"),
    (r"\.attn_sink$", ".sinks"), (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
    (r"\.indexer\.wq_b\.", ".compressor.indexer.q_b_proj."), (r"\.norm\.", ".kv_norm."),
    (r"\.ape$", ".position_bias"), (r"\.wq_a\.", ".q_a_proj."), (r"\.self_attn\.wq_b\.", ".self_attn.q_b_proj."),
    (r"\.wkv\.", ".kv_proj."), (r"\.wgate\.", ".gate_proj."), (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."), (r"\.q_norm\.", ".q_a_norm."), (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
    (r"\.(shared_experts|experts\.\d+)\.w1\.", r".\1.gate_proj."), (r"\.(shared_experts|experts\.\d+)\.w2\.",
                                                                    r".\1.down_proj."),
    (r"\.(shared_experts|experts\.\d+)\.w3\.", r".\1.up_proj."),
)]
_LAYER = re.compile(r"layers\.(\d+)\.")
SCORES = {"sqrtsoftplus": lambda logits: F.softplus(logits).sqrt(), "sigmoid": torch.sigmoid}


def v4_name(name: str) -> str:
    """A checkpoint name in either naming -> the model's parameter name."""
    name = name.removeprefix("model.")
    for pattern, target in RENAMES:
        name = pattern.sub(target, name)
    return name if name.startswith("lm_head.") else "model." + name


class ClampedSwiGLU(SwiGLU):
    """down(silu(min(gate, L)) * clamp(up, -L, L)): V4's experts and shared expert."""

    def __init__(self, hidden: int, intermediate: int, limit: float):
        super().__init__(hidden, intermediate)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate.clamp(max=self.limit)) * up.clamp(-self.limit, self.limit))


class ClampedExperts(Experts):
    """Routed experts with the clamp (a subclass: backends stack only plain `Experts`, which would lose it)."""

    def __init__(self, count: int, hidden: int, intermediate: int, limit: float):
        nn.ModuleList.__init__(self, (ClampedSwiGLU(hidden, intermediate, limit) for _ in range(count)))


class V4Router(nn.Module):
    """Scores s = score_fn(x . W) for every expert; `hashed`: the token id's row of tid2eid picks the
    experts, else the top-k of s + e_score_correction_bias. Weights: the picked s, renormalised, scaled."""

    def __init__(self, cfg: ModelConfig, hashed: bool):
        super().__init__()
        self.top_k, self.hashed, self.scaling = cfg.num_experts_per_tok, hashed, cfg.routed_scaling_factor
        self.score = SCORES[cfg.scoring_func]
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, self.top_k, dtype=torch.long))
        else:
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> RouterChoice:
        """x [N, hidden], ids [N] -> the choice for each token."""
        scores = self.score(F.linear(x.float(), self.weight.float()))
        if self.hashed:
            experts = self.tid2eid[ids].long()
        else:
            experts = (scores + self.e_score_correction_bias.float()).topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * self.scaling
        return RouterChoice(experts=experts, weights=weights, scores=scores)


class V4MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, settings: V4Settings, index: int):
        super().__init__()
        self.gate = V4Router(cfg, settings.mlp_layer_types[index] == HASH)
        width, limit = cfg.moe_intermediate_size, settings.swiglu_limit
        self.experts = ClampedExperts(cfg.n_routed_experts, cfg.hidden_size, width, limit)
        self.shared_experts = ClampedSwiGLU(cfg.hidden_size, width, limit)  # one, whatever n_shared_experts says

    def forward(self, x: torch.Tensor, ids: torch.Tensor, index: int, recorder=None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        choice = self.gate(flat, ids.reshape(-1))
        routed = self.experts(flat, choice).view(x.shape)
        shared = self.shared_experts(x)
        if recorder is not None:
            recorder.record(index, ROUTER, choice)
            recorder.record(index, ROUTED_OUT, routed)
            recorder.record(index, SHARED_OUT, shared)
        return routed + shared


class V4DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, settings: V4Settings, index: int):
        super().__init__()
        self.index = index
        args = (cfg.hidden_size, settings.hc_mult, settings.hc_sinkhorn_iters, settings.hc_eps, cfg.rms_norm_eps)
        self.attn_hc, self.ffn_hc = HyperConnection(*args), HyperConnection(*args)
        self.input_layernorm = FloatRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = CompressedAttention(cfg, settings, index)
        self.post_attention_layernorm = FloatRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = V4MoE(cfg, settings, index)

    def forward(self, streams, ids, rope: Rope, positions, cache: Cache, recorder=None) -> torch.Tensor:
        mix = self.attn_hc.mixing(streams)
        attn = self.self_attn(self.input_layernorm(self.attn_hc.collapse(streams, mix)), rope, positions,
                              cache.layers[self.index], recorder)
        mid = HyperConnection.expand(streams, attn, mix)
        mix_ffn = self.ffn_hc.mixing(mid)
        h = self.post_attention_layernorm(self.ffn_hc.collapse(mid, mix_ffn))
        mlp = self.mlp(h, ids, self.index, recorder)
        out = HyperConnection.expand(mid, mlp, mix_ffn)
        if recorder is not None:  # the residual points as the mean of the streams
            rms = out.float().pow(2).mean(-1).sqrt()
            recorder.record(self.index, HC_MIXING, MixingRecord(mix.comb, mix_ffn.comb, mix.pre, mix.post, rms))
            record_residuals(recorder, self.index, streams.mean(2), attn, mid.mean(2), mlp, out.mean(2))
        return out


class V4Body(nn.Module):
    def __init__(self, cfg: ModelConfig, settings: V4Settings):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(V4DecoderLayer(cfg, settings, i) for i in range(cfg.num_layers))
        self.norm = FloatRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hc_head = HyperHead(cfg.hidden_size, settings.hc_mult, settings.hc_eps, cfg.rms_norm_eps)


FLOAT32_PARTS = (FloatRMSNorm, HyperConnection, HyperHead)  # transformers keeps these in float32


class DeepseekV4ForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.settings = v4_settings(cfg)
        self.model = V4Body(cfg, self.settings)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.skipped = 0
        self.init_buffers()

    def init_buffers(self, device=None) -> None:
        cfg, s = self.config, self.settings
        main, _ = rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, RopeScaling())
        compress, _ = rope_inv_freq(cfg.qk_rope_head_dim, s.compress_rope_theta, cfg.rope_scaling)
        self.register_buffer("main_inv_freq", main.to(device), persistent=False)
        self.register_buffer("compress_inv_freq", compress.to(device), persistent=False)
        for module in self.modules():
            names = []
            if isinstance(module, FLOAT32_PARTS):
                names = list(module._parameters)
            elif isinstance(module, CompressedAttention):
                names = ["sinks"]
            elif isinstance(module, Compressor):
                names = ["position_bias"]
            for name in names:
                param = module._parameters[name]
                if param.dtype != torch.float32:
                    setattr(module, name, nn.Parameter(param.detach().float(), requires_grad=False))
            bias = getattr(module, "e_score_correction_bias", None) if isinstance(module, V4Router) else None
            if bias is not None and bias.dtype != torch.float32:
                module.e_score_correction_bias = bias.float()
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # -- loading ---------------------------------------------------------------------------------

    def checkpoint_tensors(self, name: str, load):
        """Either naming; MTP layers (`mtp.*`, layers past the decoder's) are skipped unread."""
        layer = _LAYER.match(name.removeprefix("model."))
        if name.startswith("mtp.") or (layer and int(layer.group(1)) >= self.config.num_layers):
            self.skipped += 1
            return None
        target = v4_name(name)
        if target.endswith(".tid2eid"):  # expert ids index the experts directly: a bad one must stop here
            table = load()
            if table.numel() and (table.min() < 0 or table.max() >= self.config.n_routed_experts):
                raise LlmcliError(f"{name}: hash routing names experts outside 0..{self.config.n_routed_experts - 1}")
            return [(target, table)]
        return split_fused_experts(target, load) or [(target, load())]

    def load_notes(self) -> list[str]:
        return [f"skipped {self.skipped} multi-token-prediction tensors: not used for generation"] \
            if self.skipped else []

    def keeps_weight(self, module_name: str) -> bool:
        """The grouped output projection reads o_a_proj's weight per group."""
        return module_name.endswith("o_a_proj")

    # -- running ---------------------------------------------------------------------------------

    def make_cache(self, batch: int, max_len: int, dtype=None, device=None) -> Cache:
        s = self.settings

        def layers():
            return [V4LayerCache(s.sliding_window, ("kv", "index") if kind == "compressed_sparse_attention"
                                 else ("kv",) if s.rate(i) else ()) for i, kind in enumerate(s.layer_types)]

        return V4Cache(layers, max_len)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache, recorder=None,
                last_only: bool = False) -> torch.Tensor:
        if positions.dim() != 1:
            raise ValueError("DeepSeek-V4 runs one sequence position range at a time")
        t = input_ids.shape[1]
        x = self.model.embed_tokens(input_ids)
        dtype = x.dtype
        main, compress = Rope(self.main_inv_freq, dtype), Rope(self.compress_inv_freq, dtype)
        streams = x.unsqueeze(2).expand(-1, -1, self.settings.hc_mult, -1).contiguous()
        for layer in self.model.layers:
            rope = compress if layer.self_attn.compressor is not None else main
            streams = layer(streams, input_ids, rope, positions, cache, recorder)
        return self.logits(self.model.hc_head(streams), t, cache, recorder, last_only)

    # -- facts -----------------------------------------------------------------------------------

    def attention_info(self, index: int, cache: Cache | None = None) -> dict:
        """Facts of layer `index` for `trace`: its kind, window, compression and what its cache grows by."""
        cfg, s = self.config, self.settings
        kind, rate = s.layer_types[index], s.rate(index)
        element = self.model.embed_tokens.weight.element_size()
        grows = (cfg.head_dim + (s.index_head_dim if kind == "compressed_sparse_attention" else 0)) / rate \
            if rate else 0
        info = {
            "type": {"sliding_attention": "sliding", "compressed_sparse_attention": "csa"}.get(kind, "hca"),
            "window": s.sliding_window, "heads": cfg.num_heads, "kv_heads": 1, "head_dim": cfg.head_dim,
            "rope_base": s.compress_rope_theta if rate else cfg.rope_theta,
            "yarn_factor": cfg.rope_scaling.factor if rate and cfg.rope_scaling.type == "yarn" else None,
            "rope_scale": 1.0, "logn_scale": None, "ntk_alpha": None, "compress_rate": rate or None,
            "index_topk": s.index_topk if kind == "compressed_sparse_attention" else None,
            "cache_bytes_per_token": grows * element, "window_bytes_per_token": cfg.head_dim * element,
            "index_bytes_per_entry": s.index_head_dim * element if kind == "compressed_sparse_attention" else None,
            "sinks": True, "o_groups": s.o_groups,
            "routing": "hash" if s.mlp_layer_types[index] == HASH else "learned",  # the layer's MoE
        }
        if cache is not None and rate:
            entries = cache.layers[index].states["kv"].count
            info["compressed_entries"] = entries
            info["attended_entries"] = min(entries, s.index_topk) if info["index_topk"] else entries
        return info
