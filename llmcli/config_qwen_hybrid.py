"""config.json of the hybrid Gated DeltaNet Qwens -> ModelConfig: Qwen3-Next (`qwen3_next`), Qwen3.5
(`qwen3_5`, a vision-language wrapper whose `text_config` holds the decoder, or `qwen3_5_text`) and
Qwen3.5-MoE (`qwen3_5_moe` / `qwen3_5_moe_text`).

The vision part of a wrapper is ignored: llmcli runs the text decoder. `layer_types` lists each layer's
token mixer; configs without it get the released schedule from `full_attention_interval` (every 4th
layer full attention). Qwen3.5's interleaved MRoPE reduces to plain partial RoPE for text, where the
three position rows are equal, so only `partial_rotary_factor` matters here.
"""

from __future__ import annotations

from llmcli.config_fields import (
    MAX_LAYERS,
    ModelConfig,
    _as_id_list,
    _count,
    _dtype_name,
    _require,
    _token_id,
    parse_rope_scaling,
)
from llmcli.errors import LlmcliError

LINEAR, FULL = "linear_attention", "full_attention"
LAYER_TYPES = (LINEAR, FULL)
# wrapper model_type -> the family the decoder belongs to (the text config's own type says the same)
FAMILIES = {"qwen3_next": "qwen3_next", "qwen3_5": "qwen3_5", "qwen3_5_text": "qwen3_5",
            "qwen3_5_moe": "qwen3_5_moe", "qwen3_5_moe_text": "qwen3_5_moe"}
MODEL_TYPES = tuple(FAMILIES)
ARCHITECTURES = {
    "Qwen3NextForCausalLM": "qwen3_next",
    "Qwen3_5ForConditionalGeneration": "qwen3_5",
    "Qwen3_5ForCausalLM": "qwen3_5_text",
    "Qwen3_5MoeForConditionalGeneration": "qwen3_5_moe",
    "Qwen3_5MoeForCausalLM": "qwen3_5_moe_text",
}


def text_part(raw: dict) -> dict:
    """The decoder's settings: a wrapper's `text_config`, with what the wrapper states besides (dtype, eos)
    filled in where the text part leaves it out. The wrapper's `tie_word_embeddings` decides (transformers
    ties the head of the model it builds, the wrapper, by the wrapper's config)."""
    text = raw.get("text_config")
    if text is None:
        return raw
    if not isinstance(text, dict):
        raise LlmcliError(f"config.json: text_config must be an object, got {type(text).__name__}")
    inherited = ("torch_dtype", "dtype", "eos_token_id", "bos_token_id")
    merged = {**{key: raw[key] for key in inherited if raw.get(key) is not None},
              **{key: value for key, value in text.items() if value is not None}}
    if "tie_word_embeddings" in raw:
        merged["tie_word_embeddings"] = raw["tie_word_embeddings"]
    return merged


def layer_types(raw: dict, num_layers: int) -> list[str]:
    """Each layer's mixer: `layer_types` as given, else full attention every `full_attention_interval` layers."""
    given = raw.get("layer_types")
    if given is None:
        interval = _count(raw.get("full_attention_interval", 4), "full_attention_interval")
        return [FULL if (i + 1) % interval == 0 else LINEAR for i in range(num_layers)]
    if not isinstance(given, list) or len(given) != num_layers:
        count = len(given) if isinstance(given, list) else "no list of"
        raise LlmcliError(f"config.json: layer_types has {count} entries, expected {num_layers} (one per layer)")
    for i, kind in enumerate(given):
        if kind not in LAYER_TYPES:
            raise LlmcliError(f"config.json: layer_types[{i}] is {kind!r}; this model's layers are "
                              f"{LINEAR!r} or {FULL!r}")
    return list(given)


def _moe_fields(family: str, raw: dict) -> dict:
    if family == "qwen3_5":
        return {}
    experts = _count(_require(raw, "num_experts"), "num_experts")
    fields = dict(
        n_routed_experts=experts,
        num_experts_per_tok=_count(_require(raw, "num_experts_per_tok"), "num_experts_per_tok", experts),
        moe_intermediate_size=_count(_require(raw, "moe_intermediate_size"), "moe_intermediate_size"),
        shared_expert_intermediate_size=int(raw.get("shared_expert_intermediate_size") or 0),
        scoring_func="softmax",
        norm_topk_prob=True,  # Qwen3.5-MoE always renormalises; Qwen3-Next's default
    )
    if family == "qwen3_next":  # the knobs Qwen3.5-MoE dropped (every layer MoE there)
        fields["norm_topk_prob"] = bool(raw.get("norm_topk_prob", True))
        fields["decoder_sparse_step"] = _count(raw.get("decoder_sparse_step", 1), "decoder_sparse_step")
        fields["mlp_only_layers"] = [int(i) for i in raw.get("mlp_only_layers") or []]
    return fields


def _linear_fields(raw: dict) -> dict:
    fields = {name: _count(raw.get(name, default), name) for name, default in (
        ("linear_num_key_heads", 16), ("linear_num_value_heads", 32), ("linear_key_head_dim", 128),
        ("linear_value_head_dim", 128), ("linear_conv_kernel_dim", 4))}
    if fields["linear_num_value_heads"] % fields["linear_num_key_heads"]:
        raise LlmcliError(f"config.json: linear_num_value_heads ({fields['linear_num_value_heads']}) must be a "
                          f"multiple of linear_num_key_heads ({fields['linear_num_key_heads']})")
    return fields


def _rotary_dim(raw: dict, head_dim: int) -> int:
    params = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    factor = float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.25)))
    rotary = int(head_dim * factor)
    if not 0 < factor <= 1 or rotary % 2:
        raise LlmcliError(f"config.json: partial_rotary_factor {factor} gives {rotary} rotary dims of "
                          f"{head_dim}; RoPE needs an even number above zero")
    return rotary


def parse_qwen_hybrid(raw: dict) -> ModelConfig:
    family = FAMILIES[raw.get("model_type") or "qwen3_next"]
    text = text_part(raw)
    layers = _count(_require(text, "num_hidden_layers"), "num_hidden_layers", MAX_LAYERS)
    heads = _count(_require(text, "num_attention_heads"), "num_attention_heads")
    hidden = _count(_require(text, "hidden_size"), "hidden_size")
    head_dim = int(text.get("head_dim") or hidden // heads)
    theta, scaling = parse_rope_scaling(text)
    moe = _moe_fields(family, text)
    dense = text.get("intermediate_size") or moe.get("moe_intermediate_size")  # Qwen3.5-MoE has no dense MLP
    return ModelConfig(
        family=family,
        vocab_size=int(_require(text, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_require({"intermediate_size": dense}, "intermediate_size")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
        attention_bias=bool(text.get("attention_bias", False)),
        qk_norm=True,
        layer_windows=[None] * layers,
        eos_token_ids=_as_id_list(text.get("eos_token_id")),
        bos_token_id=_token_id(text.get("bos_token_id")),
        torch_dtype=_dtype_name(text.get("torch_dtype") or text.get("dtype")),
        rotary_dim=_rotary_dim(text, head_dim),
        layer_types=layer_types(text, layers),
        **_linear_fields(text),
        **moe,
        raw=raw,
    )
