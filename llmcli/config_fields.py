"""The normalised ModelConfig every family's parser fills in, and the parsing helpers they share.

Every family's parser turns its own key names into the same fields, so the model code never
looks at raw config dictionaries. Family-specific fields (MoE, MLA, LogN/NTK) default to values
that switch the feature off.
"""

from __future__ import annotations

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
    family: str  # "qwen", "qwen2", "qwen3", "deepseek_v2", "deepseek_v3"
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

    # Original Qwen: LogN attention scaling and dynamic NTK RoPE, both relative to seq_length.
    seq_length: int | None = None
    use_logn_attn: bool = False
    use_dynamic_ntk: bool = False
    rotary_dim: int | None = None  # rotary_pct * head_dim (None: whole head)

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
        )


# -- shared helpers ------------------------------------------------------------------------------


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def parse_rope_scaling(raw: dict) -> tuple[float, RopeScaling]:
    """Read rope_theta and scaling from either the legacy `rope_scaling` key or transformers-5
    `rope_parameters` (which also carries rope_theta)."""
    params = raw.get("rope_parameters") or {}
    legacy = raw.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
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
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(scaling.get("beta_fast") or 32),
        beta_slow=float(scaling.get("beta_slow") or 1),
        mscale=scaling.get("mscale"),
        mscale_all_dim=scaling.get("mscale_all_dim"),
        attention_factor=scaling.get("attention_factor"),
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
