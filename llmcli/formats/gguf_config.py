"""GGUF metadata -> ModelConfig: the `{arch}.*` keys are rewritten as the config.json that llama.cpp's
converter read (key by key, as `convert_hf_to_gguf.py` writes them), then parsed and checked by the same
family parsers as a safetensors checkpoint (`llmcli.config`).

Architectures: qwen2, qwen3, qwen3moe (Qwen3's MoE models), qwen35 and qwen35moe (Qwen3.5's hybrids), llama (e.g.
DeepSeek-R1-Distill-Llama, SmolLM2), qwen (original Qwen) and deepseek2 (DeepSeek V2, V3, R1; V3 and R1 are told
apart by their sigmoid gating).
"""

from __future__ import annotations

from llmcli.config import ModelConfig, config_from_dict
from llmcli.errors import LlmcliError
from llmcli.formats.gguf import GGUFFile

ARCHITECTURES = ("qwen2", "qwen3", "qwen3moe", "qwen35", "qwen35moe", "llama", "qwen", "deepseek2")
_FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
SIGMOID_GATING = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID


class _Keys:
    """The metadata of one architecture, read as `{arch}.<key>`."""

    def __init__(self, gg: GGUFFile):
        self.gg, self.arch = gg, gg.architecture

    def get(self, key: str, default=None):
        value = self.gg.metadata.get(f"{self.arch}.{key}", default)
        return default if value is None else value

    def need(self, key: str):
        value = self.get(key)
        if value is None:
            raise LlmcliError(f"{self.gg.path}: GGUF metadata has no {self.arch}.{key}")
        if isinstance(value, list):  # per-layer values (some converters): llmcli needs one for all layers
            if len(set(value)) != 1:
                raise LlmcliError(f"{self.gg.path}: {self.arch}.{key} differs between layers ({value[:4]}...)")
            value = value[0]
        return value


def run_dtype_name(gg: GGUFFile) -> str:
    """The dtype `--dtype auto` runs in: that of the float weights, bfloat16 once anything is quantised."""
    types = {t.type_name for t in gg.tensors.values() if len(t.shape) > 1}
    if types - set(_FLOAT_TYPES):
        return "bfloat16"
    for name in ("BF16", "F16", "F32"):
        if name in types:
            return _FLOAT_TYPES[name]
    return "float32"


def _rope_scaling(keys: _Keys, deepseek: bool) -> dict | None:
    kind = keys.get("rope.scaling.type", "none")
    if kind in ("none", None):
        return None
    if kind != "yarn":
        raise LlmcliError(f"{keys.gg.path}: RoPE scaling {kind!r} is not supported (supported: yarn)")
    scaling = {"type": "yarn", "factor": float(keys.need("rope.scaling.factor")),
               "original_max_position_embeddings": int(keys.need("rope.scaling.original_context_length"))}
    for key, name in (("rope.scaling.yarn_beta_fast", "beta_fast"), ("rope.scaling.yarn_beta_slow", "beta_slow")):
        if keys.get(key) is not None:
            scaling[name] = float(keys.get(key))
    log_mul = keys.get("rope.scaling.yarn_log_multiplier")
    if deepseek and log_mul:  # the converter wrote 0.1 * mscale_all_dim (DeepSeek's mscale equals it)
        scaling["mscale"] = scaling["mscale_all_dim"] = float(log_mul) / 0.1
    return scaling


def _common(gg: GGUFFile, keys: _Keys) -> dict:
    embed = gg.tensors.get("token_embd.weight")
    if embed is None:
        raise LlmcliError(f"{gg.path}: GGUF has no token_embd.weight tensor")
    eos = [gg.metadata[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
           if isinstance(gg.metadata.get(k), int)]
    layers = int(keys.need("block_count")) - int(keys.get("nextn_predict_layers", 0))
    return {
        "vocab_size": embed.shape[0],
        "hidden_size": int(keys.need("embedding_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": int(keys.need("attention.head_count")),
        "rms_norm_eps": float(keys.get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(keys.get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(keys.get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in gg.tensors,
        "eos_token_id": list(dict.fromkeys(eos)),
        "bos_token_id": gg.metadata.get("tokenizer.ggml.bos_token_id"),
        "torch_dtype": run_dtype_name(gg),
    }


def _qwen2_like(gg: GGUFFile, keys: _Keys, dense_mlp: bool = True) -> dict:
    raw = _common(gg, keys)
    heads = raw["num_attention_heads"]
    if dense_mlp:
        raw["intermediate_size"] = int(keys.need("feed_forward_length"))
    raw.update({
        "model_type": gg.architecture,
        "num_key_value_heads": int(keys.get("attention.head_count_kv", heads)),
        "head_dim": int(keys.get("attention.key_length", raw["hidden_size"] // heads)),
        "attention_bias": "blk.0.attn_q.bias" in gg.tensors,
    })
    scaling = _rope_scaling(keys, deepseek=False)
    if scaling:
        raw["rope_scaling"] = scaling
    return raw


def _qwen3moe(gg: GGUFFile, keys: _Keys) -> dict:
    raw = _qwen2_like(gg, keys)
    raw.update({
        "model_type": "qwen3_moe",
        "num_experts": int(keys.need("expert_count")),
        "num_experts_per_tok": int(keys.need("expert_used_count")),
        "moe_intermediate_size": int(keys.need("expert_feed_forward_length")),
        # the file does not say: llama.cpp's qwen3moe graph always renormalises the chosen experts' weights
        "norm_topk_prob": True,
    })
    return raw


def _qwen35(gg: GGUFFile, keys: _Keys) -> dict:
    """Qwen3.5, dense or MoE: full-attention layers as Qwen3's (q with its output gate), Gated DeltaNet layers from the
    ssm.* keys as llama.cpp's converter writes them (group_count: key heads, time_step_rank: value heads)."""
    moe = gg.architecture == "qwen35moe"
    raw = _qwen2_like(gg, keys, dense_mlp=not moe)
    head_dim = raw["head_dim"]
    value_heads = int(keys.need("ssm.time_step_rank"))
    recurrent = keys.get("attention.recurrent_layers")
    layers = raw["num_hidden_layers"]
    raw.update({
        "model_type": "qwen3_5_moe_text" if moe else "qwen3_5_text",
        "linear_conv_kernel_dim": int(keys.need("ssm.conv_kernel")),
        "linear_key_head_dim": int(keys.need("ssm.state_size")),
        "linear_num_key_heads": int(keys.need("ssm.group_count")),
        "linear_num_value_heads": value_heads,
        "linear_value_head_dim": int(keys.need("ssm.inner_size")) // value_heads,
        "full_attention_interval": int(keys.get("full_attention_interval", 4)),
        "rope_parameters": {"rope_type": "default", "rope_theta": raw.pop("rope_theta"),
                            "partial_rotary_factor": int(keys.need("rope.dimension_count")) / head_dim},
    })
    if isinstance(recurrent, list):
        raw["layer_types"] = ["linear_attention" if r else "full_attention" for r in recurrent[:layers]]
    if moe:
        raw.update({"num_experts": int(keys.need("expert_count")),
                    "num_experts_per_tok": int(keys.need("expert_used_count")),
                    "moe_intermediate_size": int(keys.need("expert_feed_forward_length")),
                    "shared_expert_intermediate_size": int(keys.get("expert_shared_feed_forward_length", 0))})
    return raw


def _qwen1(gg: GGUFFile, keys: _Keys) -> dict:
    raw = _common(gg, keys)
    raw.update({
        "model_type": "qwen",
        "intermediate_size": 2 * int(keys.need("feed_forward_length")),  # the converter wrote half
        "kv_channels": raw["hidden_size"] // raw["num_attention_heads"],
        "rotary_emb_base": raw.pop("rope_theta"),
        "layer_norm_epsilon": raw.pop("rms_norm_eps"),
        "seq_length": raw["max_position_embeddings"],
    })
    raw["rotary_pct"] = int(keys.get("rope.dimension_count", raw["kv_channels"])) / raw["kv_channels"]
    return raw


def _deepseek2(gg: GGUFFile, keys: _Keys) -> dict:
    raw = _common(gg, keys)
    rope = int(keys.need("rope.dimension_count"))
    sigmoid = int(keys.get("expert_gating_func", 1)) == SIGMOID_GATING
    bias = any(name.endswith("exp_probs_b.bias") for name in gg.tensors)
    groups = int(keys.get("expert_group_count", 1))
    raw.update({
        "model_type": "deepseek_v3" if sigmoid or bias else "deepseek_v2",
        "intermediate_size": int(keys.need("feed_forward_length")),
        "q_lora_rank": keys.get("attention.q_lora_rank") or None,
        "kv_lora_rank": int(keys.need("attention.kv_lora_rank")),
        "qk_rope_head_dim": rope,
        # Files with split attn_k_b/attn_v_b keep the per-head sizes under *_mla.
        "qk_nope_head_dim": int(keys.get("attention.key_length_mla") or keys.need("attention.key_length")) - rope,
        "v_head_dim": int(keys.get("attention.value_length_mla") or keys.need("attention.value_length")),
        "n_routed_experts": int(keys.get("expert_count", 0)),
        "n_shared_experts": int(keys.get("expert_shared_count", 0)),
        "num_experts_per_tok": int(keys.get("expert_used_count", 0)),
        "moe_intermediate_size": int(keys.get("expert_feed_forward_length", 0)),
        "n_group": groups,
        "topk_group": int(keys.get("expert_group_used_count", groups)),
        "topk_method": "noaux_tc" if bias else "group_limited_greedy" if groups > 1 else "greedy",
        "scoring_func": "sigmoid" if sigmoid else "softmax",
        "norm_topk_prob": bool(keys.get("expert_weights_norm", sigmoid)),
        "routed_scaling_factor": float(keys.get("expert_weights_scale", 1.0)),
        "first_k_dense_replace": int(keys.get("leading_dense_block_count", 0)),
    })
    scaling = _rope_scaling(keys, deepseek=True)
    if scaling:
        raw["rope_scaling"] = scaling
    return raw


_BUILDERS = {"qwen2": _qwen2_like, "qwen3": _qwen2_like, "qwen3moe": _qwen3moe, "qwen35": _qwen35, "qwen35moe": _qwen35,
             "llama": _qwen2_like, "qwen": _qwen1, "deepseek2": _deepseek2}


def config_json(gg: GGUFFile) -> dict:
    """The config.json the metadata stands for."""
    arch = gg.architecture
    builder = _BUILDERS.get(arch)
    if builder is None:
        raise LlmcliError(f"{gg.path}: GGUF architecture {arch!r} is not supported (supported: "
                          f"{', '.join(ARCHITECTURES)})")
    try:
        return builder(gg, _Keys(gg))
    except (TypeError, ValueError, OverflowError) as exc:
        raise LlmcliError(f"{gg.path}: GGUF metadata is invalid for {arch}: {exc}") from exc


def gguf_config(gg: GGUFFile) -> ModelConfig:
    cfg = config_from_dict(config_json(gg))
    cfg.raw["gguf"] = True  # show and bench tell GGUF models apart by this
    freqs = gg.tensors.get("rope_freqs.weight")
    if freqs is not None:  # llama3 RoPE scaling: llama.cpp divides each frequency by its factor
        rope_dim = cfg.rotary_dim or cfg.qk_rope_head_dim or cfg.head_dim
        if cfg.family != "llama" or freqs.shape != (rope_dim // 2,) or freqs.type_name != "F32":
            raise LlmcliError(f"{gg.path}: rope_freqs.weight {freqs.type_name} {list(freqs.shape)} is not the "
                              f"{rope_dim // 2} F32 frequency factors llmcli reads (llama models only)")
        cfg.rope_freq_factors = [float(x) for x in gg.read("rope_freqs.weight")]
    return cfg
