"""config.json of DeepSeek V2 / V3 / R1 / V3.2 (`deepseek_v2`, `deepseek_v3`, `deepseek_v32`) -> ModelConfig.

V3 configs written by transformers omit `topk_method` and `scoring_func` (its V3 code always routes
with sigmoid scores and the bias-corrected group top-k), so the defaults differ by family.
V3.2 adds the lightning indexer of DeepSeek Sparse Attention (`index_*` keys, read by `indexer_settings`).
Inconsistent routing settings are rejected here, before any weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmcli.config_fields import (
    ModelConfig,
    _as_id_list,
    _dtype_name,
    _finite,
    _require,
    _token_id,
    parse_rope_scaling,
)
from llmcli.errors import LlmcliError

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
FAMILY_DEFAULTS = {
    "deepseek_v2": {"topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False,
                    "routed_scaling_factor": 1.0},
    "deepseek_v3": {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
                    "routed_scaling_factor": 2.5},
}
FAMILY_DEFAULTS["deepseek_v32"] = FAMILY_DEFAULTS["deepseek_v3"]  # V3's routing; only attention changes


def _get(raw: dict, key: str, default):
    """raw[key], with a null value treated like a missing one."""
    value = raw.get(key)
    return default if value is None else value


def _fp8_block(raw: dict) -> tuple[int, int] | None:
    quant = raw.get("quantization_config")
    if not quant:
        return None
    if not isinstance(quant, dict):
        raise LlmcliError(f"config.json: quantization_config must be an object, got {quant!r}")
    method = quant.get("quant_method")
    if method != "fp8":
        raise LlmcliError(f"config.json: quantization method {method!r} is not supported (supported: fp8)")
    block = quant.get("weight_block_size") or [128, 128]
    if len(block) != 2 or min(block) <= 0:
        raise LlmcliError(f"config.json: weight_block_size {block!r} must be two positive sizes")
    return int(block[0]), int(block[1])


def parse_deepseek(raw: dict) -> ModelConfig:
    family = raw.get("model_type") or "deepseek_v3"
    defaults = FAMILY_DEFAULTS[family]
    hidden = int(_require(raw, "hidden_size"))
    heads = int(_require(raw, "num_attention_heads"))
    nope = int(_require(raw, "qk_nope_head_dim"))
    rope = int(_require(raw, "qk_rope_head_dim"))
    theta, scaling = parse_rope_scaling(raw)
    q_lora = raw.get("q_lora_rank")
    experts = int(_get(raw, "n_routed_experts", 0))
    cfg = ModelConfig(
        family=family,
        vocab_size=int(_require(raw, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_require(raw, "intermediate_size")),
        num_layers=int(_require(raw, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=heads,  # MLA has no key/value heads of its own; the raw value is meaningless
        head_dim=nope + rope,
        rms_norm_eps=float(_get(raw, "rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(_get(raw, "max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        eos_token_ids=_as_id_list(raw.get("eos_token_id")),
        bos_token_id=_token_id(raw.get("bos_token_id")),
        torch_dtype=_dtype_name(raw.get("torch_dtype") or raw.get("dtype")),
        q_lora_rank=int(q_lora) if q_lora else None,
        kv_lora_rank=int(_require(raw, "kv_lora_rank")),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        v_head_dim=int(_require(raw, "v_head_dim")),
        n_routed_experts=experts,
        n_shared_experts=int(_get(raw, "n_shared_experts", 0)),
        num_experts_per_tok=int(_require(raw, "num_experts_per_tok")) if experts else 0,
        moe_intermediate_size=int(_require(raw, "moe_intermediate_size")) if experts else 0,
        n_group=int(_get(raw, "n_group", 1)),
        topk_group=int(_get(raw, "topk_group", 1)),
        topk_method=str(_get(raw, "topk_method", defaults["topk_method"])),
        scoring_func=str(_get(raw, "scoring_func", defaults["scoring_func"])),
        norm_topk_prob=bool(_get(raw, "norm_topk_prob", defaults["norm_topk_prob"])),
        routed_scaling_factor=_finite(_get(raw, "routed_scaling_factor", defaults["routed_scaling_factor"]),
                                      "routed_scaling_factor"),
        first_k_dense_replace=int(_get(raw, "first_k_dense_replace", 0)),
        moe_layer_freq=int(_get(raw, "moe_layer_freq", 1)),
        fp8_block_size=_fp8_block(raw),
        raw=raw,
    )
    check_deepseek(cfg)
    return cfg


def check_deepseek(cfg: ModelConfig) -> None:
    """Reject settings that the model could not run, or would run with a silently different meaning."""

    def bad(message: str) -> None:
        raise LlmcliError(f"config.json ({cfg.family}): {message}")

    act = cfg.raw.get("hidden_act", "silu")
    if act != "silu":
        bad(f"hidden_act {act!r} is not supported (supported: silu)")
    for name in ("hidden_size", "num_heads", "num_layers", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
        if getattr(cfg, name) <= 0:
            bad(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.qk_nope_head_dim < 0:
        bad(f"qk_nope_head_dim must be >= 0, got {cfg.qk_nope_head_dim}")
    if cfg.qk_rope_head_dim % 2:
        bad(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {cfg.qk_rope_head_dim}")
    if cfg.q_lora_rank is not None and cfg.q_lora_rank <= 0:
        bad(f"q_lora_rank must be positive or null, got {cfg.q_lora_rank}")
    if cfg.family == "deepseek_v32":
        indexer_settings(cfg)  # raises for bad index_* settings
    if not cfg.is_moe:
        return
    experts, k, groups, keep = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
    if cfg.topk_method not in TOPK_METHODS:
        bad(f"topk_method {cfg.topk_method!r} is not supported (supported: {', '.join(TOPK_METHODS)})")
    if cfg.scoring_func not in SCORING_FUNCS:
        bad(f"scoring_func {cfg.scoring_func!r} is not supported (supported: {', '.join(SCORING_FUNCS)})")
    if k <= 0 or cfg.moe_intermediate_size <= 0:
        bad("num_experts_per_tok and moe_intermediate_size must be positive")
    if k > experts:
        bad(f"num_experts_per_tok ({k}) exceeds n_routed_experts ({experts})")
    if cfg.n_shared_experts < 0 or cfg.first_k_dense_replace < 0 or cfg.moe_layer_freq <= 0:
        bad("n_shared_experts and first_k_dense_replace must be >= 0, moe_layer_freq > 0")
    if groups <= 0 or experts % groups:
        bad(f"n_routed_experts ({experts}) is not divisible by n_group ({groups})")
    if not 0 < keep <= groups:
        bad(f"topk_group ({keep}) must be between 1 and n_group ({groups})")
    if cfg.topk_method != "greedy":
        per_group = experts // groups
        if k > keep * per_group:
            bad(f"num_experts_per_tok ({k}) exceeds the {keep * per_group} experts of the topk_group "
                f"({keep}) groups kept")
        if cfg.topk_method == "noaux_tc" and per_group < 2:
            bad(f"noaux_tc scores each group by its top two experts; groups have {per_group}")


def rope_interleaved(cfg: ModelConfig) -> bool:
    """Whether the checkpoint lays the rope dims out in interleaved pairs (x0, x1), (x2, x3), ...
    DeepSeek's own checkpoints do; transformers' V3 config can say otherwise (`rope_interleave`), its V3.2
    config cannot (the key was removed: always interleaved)."""
    if cfg.family in ("deepseek_v2", "deepseek_v32"):
        return True
    return bool(_get(cfg.raw, "rope_interleave", True))


@dataclass(frozen=True)
class IndexerSettings:
    """DeepSeek Sparse Attention's lightning indexer (V3.2): `heads` query heads of `head_dim` values
    scored against one key per token; each query attends to its `topk` best-scored tokens."""

    topk: int
    heads: int
    head_dim: int


def indexer_settings(cfg: ModelConfig) -> IndexerSettings:
    """The indexer of a `deepseek_v32` config (transformers' defaults = DeepSeek-V3.2's 671B layout)."""

    def bad(message: str) -> None:
        raise LlmcliError(f"config.json ({cfg.family}): {message}")

    values = {}
    for key, default in (("index_topk", 2048), ("index_n_heads", 64), ("index_head_dim", 128)):
        value = _get(cfg.raw, key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            bad(f"{key} must be a positive integer, got {value!r}")
        values[key] = value
    if cfg.q_lora_rank is None:
        bad("q_lora_rank must be set: the indexer reads the query latent")
    if values["index_head_dim"] < cfg.qk_rope_head_dim:
        bad(f"index_head_dim ({values['index_head_dim']}) is smaller than qk_rope_head_dim "
            f"({cfg.qk_rope_head_dim}), the dims it rotates")
    return IndexerSettings(values["index_topk"], values["index_n_heads"], values["index_head_dim"])
