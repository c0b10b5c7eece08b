"""The MoE part of Qwen2-MoE (`qwen2_moe`: Qwen1.5-MoE, Qwen2-57B-A14B) and Qwen3-MoE (`qwen3_moe`) configs.

Their attention is Qwen2's (q/k/v bias) and Qwen3's (q/k norms) respectively, parsed by `config.parse_qwen2`;
this adds the expert fields, checked before any weight is read, and their sliding-window rules (no released
checkpoint turns windows on).
"""

from __future__ import annotations

from llmcli.config_fields import MAX_LAYERS, _count, _require
from llmcli.errors import LlmcliError

QWEN_MOE_FAMILIES = ("qwen2_moe", "qwen3_moe")


def qwen_moe_fields(raw: dict, num_layers: int) -> dict:
    """ModelConfig fields for the experts of a qwen2_moe / qwen3_moe config ({} for any other family)."""
    family = raw.get("model_type")
    if family not in QWEN_MOE_FAMILIES:
        return {}

    def bad(message: str) -> LlmcliError:
        return LlmcliError(f"config.json ({family}): {message}")

    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise bad(f"hidden_act {act!r} is not supported (supported: silu)")
    experts = int(raw.get("num_experts", raw.get("num_local_experts")) or 0)
    if experts < 0 or experts > MAX_LAYERS:
        raise bad(f"num_experts must be between 0 and {MAX_LAYERS:,}, got {experts}")
    fields = {"n_routed_experts": experts, "mlp_only_layers": _layer_list(raw.get("mlp_only_layers"), num_layers,
                                                                          bad)}
    step = raw.get("decoder_sparse_step")
    fields["decoder_sparse_step"] = 1 if step is None else _count(step, "decoder_sparse_step", MAX_LAYERS)
    if not experts:
        return fields  # every layer dense (transformers builds no MoE block either)
    k = _count(_require(raw, "num_experts_per_tok"), "num_experts_per_tok")
    if k > experts:
        raise bad(f"num_experts_per_tok ({k}) exceeds num_experts ({experts})")
    fields.update(
        num_experts_per_tok=k,
        moe_intermediate_size=_count(_require(raw, "moe_intermediate_size"), "moe_intermediate_size"),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
    )
    if family == "qwen2_moe":  # one shared expert behind a sigmoid gate; Qwen3-MoE has none
        fields["shared_expert_intermediate_size"] = _count(_require(raw, "shared_expert_intermediate_size"),
                                                           "shared_expert_intermediate_size")
    return fields


def _layer_list(value, num_layers: int, bad) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(type(i) is int and 0 <= i < num_layers for i in value):
        raise bad(f"mlp_only_layers must list layer indices below {num_layers}, got {value!r}")
    return sorted(set(value))


def qwen_moe_windows(raw: dict, num_layers: int) -> list[int | None]:
    """Sliding windows as transformers applies them when use_sliding_window is set: Qwen2-MoE on the layers
    `layer_types` marks (by default the even layers below max_window_layers), Qwen3-MoE on every layer."""
    window = raw.get("sliding_window")
    if not raw.get("use_sliding_window") or not window:
        return [None] * num_layers
    window = _count(window, "sliding_window")
    if raw.get("model_type") == "qwen3_moe":
        return [window] * num_layers
    types = raw.get("layer_types")
    if types is None:
        first = raw.get("max_window_layers", 28)
        return [window if i % 2 == 0 and i < first else None for i in range(num_layers)]
    if not isinstance(types, list) or len(types) != num_layers:
        raise LlmcliError(f"config.json: layer_types must list {num_layers} entries, got {types!r}")
    return [window if t == "sliding_attention" else None for t in types]
