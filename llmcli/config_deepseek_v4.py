"""config.json of DeepSeek-V4 (`deepseek_v4`: V4-Flash, V4-Pro) -> ModelConfig plus `V4Settings`.

Two spellings reach us: transformers' (`layer_types`, `mlp_layer_types`, `compress_rates`, nested
`rope_parameters` {"main", "compress"}, `partial_rotary_factor`) and the reference/hub one (`compress_ratios`
0/4/128 per layer, `num_hash_layers`, `qk_rope_head_dim`, `rope_scaling` for the compressed branches,
`compress_rate_csa/hca`). Both become the same settings. The layer schedule is kept in `V4Settings`, not in
`ModelConfig.layer_types`, which means Qwen's hybrid layers elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from llmcli.config_deepseek import _fp8_block
from llmcli.config_fields import (
    MAX_LAYERS,
    ModelConfig,
    _as_id_list,
    _count,
    _dtype_name,
    _finite,
    _require,
    _token_id,
    parse_rope_scaling,
)
from llmcli.errors import LlmcliError

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
RATIO_TYPES = {0: SLIDING, 4: CSA, 128: HCA}  # the reference's compress_ratios
HASH, LEARNED = "hash_moe", "moe"
SCORING = ("sqrtsoftplus", "sigmoid")  # transformers' V4 also names softmax, but cannot build it
EXPERT_DTYPES = (None, "fp8", "fp4", "bf16")


@dataclass(frozen=True)
class V4Settings:
    """What only V4 has: the per-layer attention and routing schedules, the compressed branches' rates and
    RoPE base, the indexer, the hyper-connections (mHC), the grouped output projection and the clamp."""

    layer_types: tuple[str, ...]
    mlp_layer_types: tuple[str, ...]
    csa_rate: int
    hca_rate: int
    compress_rope_theta: float
    sliding_window: int
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    o_groups: int
    o_lora_rank: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    swiglu_limit: float
    expert_dtype: str | None

    def rate(self, index: int) -> int:
        """The compression rate of layer `index` (0: sliding window only)."""
        kind = self.layer_types[index]
        return self.csa_rate if kind == CSA else self.hca_rate if kind == HCA else 0


def _positive(raw: dict, key: str, default) -> int:
    value = raw.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LlmcliError(f"config.json (deepseek_v4): {key} must be a positive integer, got {value!r}")
    return value


def _schedules(raw: dict, layers: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    types = raw.get("layer_types")
    if types is None and raw.get("compress_ratios") is not None:
        ratios = raw["compress_ratios"]
        if not isinstance(ratios, list) or any(r not in RATIO_TYPES for r in ratios):
            raise LlmcliError(f"config.json (deepseek_v4): compress_ratios must list 0, 4 or 128, got {ratios!r}")
        types = [RATIO_TYPES[r] for r in ratios]
    if types is None:  # transformers' default: two HCA layers, then CSA / HCA alternating
        types = [HCA] * min(layers, 2) + [CSA if i % 2 else HCA for i in range(max(layers - 2, 0))]
    mlp = raw.get("mlp_layer_types")
    if mlp is None:
        hashed = raw.get("num_hash_layers")
        hashed = 3 if hashed is None else _count(hashed + 1, "num_hash_layers + 1") - 1
        mlp = [HASH] * min(layers, hashed) + [LEARNED] * max(0, layers - hashed)
    for name, values, allowed in (("layer_types", types, LAYER_TYPES), ("mlp_layer_types", mlp, (HASH, LEARNED))):
        # the reference lists its MTP layer too: only the first `layers` entries are the decoder's
        if not isinstance(values, list) or len(values) < layers or any(v not in allowed for v in values[:layers]):
            raise LlmcliError(f"config.json (deepseek_v4): {name} must list {layers} of {', '.join(allowed)}")
    return tuple(types[:layers]), tuple(mlp[:layers])


def _compress_rope(raw: dict) -> tuple[float, dict]:
    """(compress_rope_theta, the compressed branches' YaRN settings as parse_rope_scaling reads them)."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("compress"), dict):
        compress = dict(params["compress"])
        return float(compress.get("rope_theta", raw.get("compress_rope_theta", 160000.0))), compress
    scaling = {**(raw.get("rope_scaling") or {}), **(params if isinstance(params, dict) else {})}
    return float(raw.get("compress_rope_theta", 160000.0)), scaling


def _expert_dtype(raw: dict) -> str | None:
    quant = raw.get("quantization_config") if isinstance(raw.get("quantization_config"), dict) else {}
    value = quant.get("expert_dtype", raw.get("expert_dtype"))
    if value not in EXPERT_DTYPES:
        raise LlmcliError(f"config.json (deepseek_v4): expert_dtype {value!r} is not supported "
                          f"(supported: fp8, fp4, bf16)")
    return value


def v4_settings(cfg: ModelConfig) -> V4Settings:
    """The V4-only settings of a `deepseek_v4` config (transformers' defaults = V4-Flash), checked."""
    raw, layers = cfg.raw, cfg.num_layers
    types, mlp = _schedules(raw, layers)
    rates = raw.get("compress_rates") if isinstance(raw.get("compress_rates"), dict) else {}
    theta, _ = _compress_rope(raw)
    settings = V4Settings(
        layer_types=types, mlp_layer_types=mlp,
        csa_rate=_positive({"r": raw.get("compress_rate_csa", rates.get(CSA))}, "r", 4),
        hca_rate=_positive({"r": raw.get("compress_rate_hca", rates.get(HCA))}, "r", 128),
        compress_rope_theta=_finite(theta, "compress_rope_theta", positive=True),
        sliding_window=_positive(raw, "sliding_window", 128),
        hc_mult=_positive(raw, "hc_mult", 4), hc_sinkhorn_iters=_positive(raw, "hc_sinkhorn_iters", 20),
        hc_eps=_finite(raw.get("hc_eps", 1e-6), "hc_eps"),
        o_groups=_positive(raw, "o_groups", 8), o_lora_rank=_positive(raw, "o_lora_rank", 1024),
        index_n_heads=_positive(raw, "index_n_heads", 64), index_head_dim=_positive(raw, "index_head_dim", 128),
        index_topk=_positive(raw, "index_topk", 512),
        swiglu_limit=_finite(raw.get("swiglu_limit", 10.0), "swiglu_limit", positive=True),
        expert_dtype=_expert_dtype(raw),
    )
    if (cfg.num_heads * cfg.head_dim) % settings.o_groups:
        raise LlmcliError(f"config.json (deepseek_v4): o_groups ({settings.o_groups}) must divide "
                          f"num_attention_heads x head_dim ({cfg.num_heads * cfg.head_dim})")
    if CSA in types and settings.index_head_dim < cfg.qk_rope_head_dim:
        raise LlmcliError(f"config.json (deepseek_v4): index_head_dim ({settings.index_head_dim}) is smaller "
                          f"than the {cfg.qk_rope_head_dim} dims RoPE rotates")
    return settings


def _rope_dim(raw: dict, head_dim: int) -> int:
    factor = raw.get("partial_rotary_factor")
    rope = int(head_dim * float(factor)) if factor is not None else int(raw.get("qk_rope_head_dim") or head_dim // 8)
    if rope <= 0 or rope % 2 or rope > head_dim:
        raise LlmcliError(f"config.json (deepseek_v4): the rotated dims ({rope}) must be even and within "
                          f"head_dim ({head_dim})")
    return rope


def parse_deepseek_v4(raw: dict) -> ModelConfig:
    layers = _count(_require(raw, "num_hidden_layers"), "num_hidden_layers", MAX_LAYERS)
    head_dim = _count(_require(raw, "head_dim"), "head_dim")
    main = raw.get("rope_parameters", {}).get("main") if isinstance(raw.get("rope_parameters"), dict) else None
    main_theta = float((main or {}).get("rope_theta", raw.get("rope_theta", 10000.0)))
    theta, compress = _compress_rope(raw)
    _, scaling = parse_rope_scaling({"rope_parameters": {**compress, "rope_theta": theta},
                                     "max_position_embeddings": raw.get("max_position_embeddings", 1048576)})
    if scaling.type == "yarn" and scaling.attention_factor is None:  # the reference does not rescale cos/sin
        scaling = replace(scaling, attention_factor=1.0)
    experts = _count(_require(raw, "n_routed_experts"), "n_routed_experts")
    scoring = str(raw.get("scoring_func") or "sqrtsoftplus")
    if scoring not in SCORING:
        raise LlmcliError(f"config.json (deepseek_v4): scoring_func {scoring!r} is not supported "
                          f"(supported: {', '.join(SCORING)})")
    width = _count(_require(raw, "moe_intermediate_size"), "moe_intermediate_size")
    cfg = ModelConfig(
        family="deepseek_v4", vocab_size=_count(_require(raw, "vocab_size"), "vocab_size"),
        hidden_size=_count(_require(raw, "hidden_size"), "hidden_size"), intermediate_size=width,
        num_layers=layers, num_heads=_count(_require(raw, "num_attention_heads"), "num_attention_heads"),
        num_kv_heads=1, head_dim=head_dim, rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=main_theta, rope_scaling=scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings") or 1048576),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        eos_token_ids=_as_id_list(raw.get("eos_token_id")), bos_token_id=_token_id(raw.get("bos_token_id")),
        torch_dtype=_dtype_name(raw.get("torch_dtype") or raw.get("dtype")),
        q_lora_rank=_count(_require(raw, "q_lora_rank"), "q_lora_rank"),
        qk_rope_head_dim=_rope_dim(raw, head_dim), n_routed_experts=experts,
        n_shared_experts=int(raw.get("n_shared_experts", 1) or 0),
        num_experts_per_tok=_count(_require(raw, "num_experts_per_tok"), "num_experts_per_tok"),
        moe_intermediate_size=width, scoring_func=scoring, norm_topk_prob=True, topk_method="noaux_tc",
        routed_scaling_factor=_finite(raw.get("routed_scaling_factor", 1.5), "routed_scaling_factor"),
        fp8_block_size=_fp8_block(raw), raw=raw,
    )
    if cfg.num_experts_per_tok > experts:
        raise LlmcliError(f"config.json (deepseek_v4): num_experts_per_tok ({cfg.num_experts_per_tok}) exceeds "
                          f"n_routed_experts ({experts})")
    if raw.get("hidden_act", "silu") != "silu":
        raise LlmcliError(f"config.json (deepseek_v4): hidden_act {raw.get('hidden_act')!r} is not supported")
    v4_settings(cfg)  # raises for bad V4 settings, before any weight is read
    return cfg


def v4_cache_values(cfg: ModelConfig) -> dict[str, dict]:
    """Per layer type: how many layers, the values each token adds to the cache (compressed entries, as a
    fraction: one entry per `rate` tokens) and the values held whatever the length (the sliding window's
    keys, the incomplete window's raw projections, CSA's overlap). What lets a million tokens fit."""
    s = v4_settings(cfg)
    hd, di, window = cfg.head_dim, s.index_head_dim, s.sliding_window - 1
    out = {}
    for kind in LAYER_TYPES:
        count = s.layer_types.count(kind)
        if not count:
            continue
        if kind == SLIDING:
            grows, fixed = 0.0, window * hd
        elif kind == HCA:
            grows, fixed = hd / s.hca_rate, window * hd + (s.hca_rate - 1) * 2 * hd
        else:
            rate = s.csa_rate
            grows = (hd + di) / rate
            fixed = window * hd + (rate - 1) * 2 * (2 * hd + 2 * di) + rate * 2 * (hd + di)
        out[kind] = {"layers": count, "values_per_token": grows, "values_per_sequence": fixed}
    return out


def v4_cache_bytes(cfg: ModelConfig, element: int, tokens: int) -> int:
    """Bytes of cache for one sequence of `tokens` tokens."""
    return int(sum(t["layers"] * (t["values_per_token"] * tokens + t["values_per_sequence"]) * element
                   for t in v4_cache_values(cfg).values()))
