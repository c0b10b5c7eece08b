"""The normalised ModelConfig every family's parser fills in, and the parsing helpers they share.

Every family's parser turns its own key names into the same fields, so the model code never
looks at raw config dictionaries. Family-specific fields (MoE, MLA, LogN/NTK) default to values
that switch the feature off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llmcli.errors import LlmcliError


@dataclass
class RopeScaling:
    """RoPE scaling. Only YaRN changes the frequencies; "default" means plain RoPE."""

    type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass
class ModelConfig:
    family: str  # "qwen", "qwen2", "qwen3", "deepseek_v2", "deepseek_v3", "qwen3_next", "qwen3_5", ...
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2, original Qwen)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    # Per layer: None for full causal attention, else the sliding window size in tokens.
    layer_windows: list[int | None] = field(default_factory=list)
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    torch_dtype: str | None = None  # dtype the checkpoint was saved in
    # llama3-style RoPE scaling as GGUF stores it (rope_freqs.weight): each inv_freq is divided by its factor.
    rope_freq_factors: list[float] | None = None

    # Original Qwen: LogN attention scaling and dynamic NTK RoPE, both relative to seq_length.
    seq_length: int | None = None
    use_logn_attn: bool = False
    use_dynamic_ntk: bool = False
    rotary_dim: int | None = None  # rotary_pct * head_dim (None: whole head)

    # Qwen3-Next / Qwen3.5 hybrids: each layer's token mixer, "linear_attention" (Gated DeltaNet) or
    # "full_attention" (gated attention); empty for every other family. The DeltaNet's key/value heads
    # (nk, nv; nv a multiple of nk), their dims and the causal conv's kernel width.
    layer_types: list[str] = field(default_factory=list)
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0

    # DeepSeek MLA.
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # DeepSeekMoE.
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    # Qwen MoE (qwen2_moe, qwen3_moe; also Qwen3-Next / Qwen3.5-MoE). The routed experts use the DeepSeekMoE
    # fields above as they mean the same (n_routed_experts = num_experts, num_experts_per_tok,
    # moe_intermediate_size, norm_topk_prob; softmax router, no groups, no scaling). Qwen adds one shared expert
    # of its own width behind a sigmoid gate (0: none), and dense layers: those in mlp_only_layers, and those
    # with (index + 1) % decoder_sparse_step != 0.
    shared_expert_intermediate_size: int = 0
    mlp_only_layers: list[int] = field(default_factory=list)
    decoder_sparse_step: int = 1
    # FP8 block quantisation of the checkpoint, e.g. (128, 128); None when not quantised.
    fp8_block_size: tuple[int, int] | None = None

    raw: dict = field(default_factory=dict, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    def is_moe_layer(self, index: int) -> bool:
        return (
            self.is_moe
            and index >= self.first_k_dense_replace
            and index % max(self.moe_layer_freq, 1) == 0
            and index not in self.mlp_only_layers
            and (index + 1) % max(self.decoder_sparse_step, 1) == 0
        )


# -- shared helpers ------------------------------------------------------------------------------


MAX_LAYERS = 100_000  # far above any real model (DeepSeek-V3 has 61); per-layer lists and loops stay small


def _as_id_list(value) -> list[int]:
    """A token id or a list of them (eos_token_id); none is []."""
    if value is None:
        return []
    ids = value if isinstance(value, list) else [value]
    if not all(type(i) is int and i >= 0 for i in ids):
        raise LlmcliError(f"config.json: token ids must be non-negative integers, got {value!r}")
    return list(ids)


def _token_id(value) -> int | None:
    if value is not None and not (type(value) is int and value >= 0):
        raise LlmcliError(f"config.json: a token id must be a non-negative integer, got {value!r}")
    return value


def _dtype_name(value) -> str | None:
    """torch_dtype as config.json names it ("bfloat16", "torch.float16"); None when absent."""
    if value is not None and not isinstance(value, str):
        raise LlmcliError(f"config.json: torch_dtype must be a name like \"bfloat16\", got {value!r}")
    return value or None


def _count(value, name: str, limit: int | None = None) -> int:
    """A setting that counts something (layers, heads, sizes): a positive integer, at most `limit`. Checked
    before use, so that a corrupt value never sizes a list or a loop."""
    count = int(value)
    if count < 1 or (limit is not None and count > limit):
        most = f" and at most {limit:,}" if limit is not None else ""
        raise LlmcliError(f"config.json: {name} must be positive{most}, got {count}")
    return count


def _finite(value, name: str, *, positive: bool = False) -> float:
    number = float(value)
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise LlmcliError(f"config.json: {name} must be a finite {'positive' if positive else 'non-negative'} "
                          f"number, got {value!r}")
    return number


def _optional_finite(value, name: str) -> float | None:
    return None if value is None else _finite(value, name)


def check_config(cfg: ModelConfig) -> None:
    """What every family's model code relies on, checked once the family's parser has filled the fields."""
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                 "max_position_embeddings"):
        _count(getattr(cfg, name), name)
    _count(cfg.num_layers, "num_hidden_layers", MAX_LAYERS)
    if cfg.num_heads % cfg.num_kv_heads:
        raise LlmcliError(f"config.json: num_attention_heads ({cfg.num_heads}) must be a multiple of "
                          f"num_key_value_heads ({cfg.num_kv_heads})")
    if cfg.head_dim % 2:
        raise LlmcliError(f"config.json: head_dim must be even (RoPE rotates pairs), got {cfg.head_dim}")
    for window in cfg.layer_windows:
        if window is not None:
            _count(window, "sliding_window")
    _finite(cfg.rms_norm_eps, "rms_norm_eps")
    _finite(cfg.rope_theta, "rope_theta", positive=True)


def parse_rope_scaling(raw: dict) -> tuple[float, RopeScaling]:
    """Read rope_theta and scaling from either the legacy `rope_scaling` key or transformers-5
    `rope_parameters` (which also carries rope_theta)."""
    params = raw.get("rope_parameters") or {}
    legacy = raw.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(legacy, dict):
        raise LlmcliError("config.json: rope_scaling and rope_parameters must be objects")
    theta = _finite(params.get("rope_theta", raw.get("rope_theta", 10000.0)), "rope_theta", positive=True)
    scaling = {**legacy, **params}
    kind = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if kind not in ("default", "yarn"):
        raise LlmcliError(f"RoPE scaling type {kind!r} is not supported (supported: default, yarn)")
    if kind == "default":
        return theta, RopeScaling()
    original = scaling.get("original_max_position_embeddings") or raw.get("max_position_embeddings")
    factor = scaling.get("factor")
    if factor is None:
        factor = raw["max_position_embeddings"] / original
    return theta, RopeScaling(
        type="yarn",
        factor=_finite(factor, "rope_scaling factor", positive=True),
        original_max_position_embeddings=_count(original, "original_max_position_embeddings"),
        beta_fast=_finite(scaling.get("beta_fast") or 32, "rope_scaling beta_fast"),
        beta_slow=_finite(scaling.get("beta_slow") or 1, "rope_scaling beta_slow"),
        mscale=_optional_finite(scaling.get("mscale"), "rope_scaling mscale"),
        mscale_all_dim=_optional_finite(scaling.get("mscale_all_dim"), "rope_scaling mscale_all_dim"),
        attention_factor=_optional_finite(scaling.get("attention_factor"), "rope_scaling attention_factor"),
        truncate=bool(scaling.get("truncate", True)),
    )


def _layer_windows(raw: dict, num_layers: int) -> list[int | None]:
    """Sliding windows of Qwen2/Qwen3: explicit `layer_types`, or layers from max_window_layers up
    when use_sliding_window is set."""
    window = raw.get("sliding_window")
    layer_types = raw.get("layer_types")
    if not raw.get("use_sliding_window") or not window:
        return [None] * num_layers
    if layer_types:
        if len(layer_types) != num_layers:
            raise LlmcliError(f"config.json: layer_types has {len(layer_types)} entries, expected {num_layers}")
        return [int(window) if t == "sliding_attention" else None for t in layer_types]
    first = raw.get("max_window_layers", num_layers)
    return [int(window) if i >= first else None for i in range(num_layers)]


def _require(raw: dict, *keys: str):
    for key in keys:
        if key in raw and raw[key] is not None:
            return raw[key]
    raise LlmcliError(f"config.json is missing {keys[0]!r}")
