"""config.json of original Qwen (`QWenLMHeadModel`, model_type "qwen") -> ModelConfig.

Two generations of key names exist: the first releases used GPT-2/Megatron names (n_embd, n_head,
n_layer, n_positions, ffn_hidden_size, padded_vocab_size, params_dtype); later ones use hidden_size,
num_attention_heads, ... Both map to the same fields. `config.py` dispatches to it.
"""

from __future__ import annotations

from llmcli.config_fields import MAX_LAYERS, ModelConfig, _as_id_list, _count
from llmcli.errors import LlmcliError

# The Qwen vocabulary fixes its special tokens right after the 151,643 BPE tokens.
ENDOFTEXT_ID = 151643  # <|endoftext|>: the eos of original Qwen configs that name none


def _first(raw: dict, *keys: str, default=None):
    for key in keys:
        if raw.get(key) is not None:
            return raw[key]
    if default is not None:
        return default
    raise LlmcliError(f"config.json is missing {keys[0]!r} (or {', '.join(repr(k) for k in keys[1:])})")


def _saved_dtype(raw: dict) -> str:
    """The dtype of the weights. Qwen configs often leave it implicit (bf16/fp16/fp32 flags all false
    means "as saved"), and every released Qwen1 checkpoint is bfloat16."""
    explicit = raw.get("torch_dtype") or raw.get("dtype") or raw.get("params_dtype")
    if explicit:
        return str(explicit).replace("torch.", "")
    for flag, name in (("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")):
        if raw.get(flag) is True:
            return name
    return "bfloat16"


def parse_qwen1(raw: dict) -> ModelConfig:
    if raw.get("visual"):
        raise LlmcliError("Qwen-VL (a vision-language model) is not supported; only text Qwen models are")
    if raw.get("no_bias") is False:
        raise LlmcliError("config.json: no_bias=false (biases on c_proj and the MLP) is not supported")
    if raw.get("scale_attn_weights") is False:
        raise LlmcliError("config.json: scale_attn_weights=false is not supported")
    hidden = _count(_first(raw, "hidden_size", "n_embd"), "hidden_size")
    heads = _count(_first(raw, "num_attention_heads", "n_head"), "num_attention_heads")
    layers = _count(_first(raw, "num_hidden_layers", "n_layer"), "num_hidden_layers", MAX_LAYERS)
    ffn = int(_first(raw, "intermediate_size", "ffn_hidden_size", "n_inner"))
    if ffn % 2:
        raise LlmcliError(f"config.json: intermediate_size {ffn} must be even (the MLP width is half of it)")
    head_dim = int(_first(raw, "kv_channels", default=hidden // heads))
    rotary_dim = int(head_dim * float(_first(raw, "rotary_pct", default=1.0)))
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise LlmcliError(f"config.json: rotary_pct gives {rotary_dim} rotary dims of {head_dim}; need an even number")
    positions = _first(raw, "max_position_embeddings", "n_positions", "seq_length", default=8192)
    seq_length = int(_first(raw, "seq_length", default=positions))
    if seq_length < 2:
        raise LlmcliError(f"config.json: seq_length must be at least 2, got {seq_length}")
    return ModelConfig(
        family="qwen",
        vocab_size=int(_first(raw, "padded_vocab_size", "vocab_size")),
        hidden_size=hidden,
        # ModelConfig holds the width of each MLP projection; Qwen's intermediate_size counts w1 and w2 together.
        intermediate_size=ffn // 2,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,  # plain multi-head attention
        head_dim=head_dim,
        rms_norm_eps=float(_first(raw, "layer_norm_epsilon", "rms_norm_eps", default=1e-6)),
        rope_theta=float(_first(raw, "rotary_emb_base", "rope_theta", default=10000.0)),
        max_position_embeddings=max(int(positions), seq_length),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=True,  # c_attn always has a bias
        layer_windows=[None] * layers,  # released checkpoints use full attention; --window opts in
        eos_token_ids=_as_id_list(raw.get("eos_token_id")) or [ENDOFTEXT_ID],
        bos_token_id=None,  # Qwen prompts start without a BOS token
        torch_dtype=_saved_dtype(raw),
        seq_length=seq_length,
        use_logn_attn=bool(raw.get("use_logn_attn", True)),  # QWenConfig's defaults are on
        use_dynamic_ntk=bool(raw.get("use_dynamic_ntk", True)),
        rotary_dim=None if rotary_dim == head_dim else rotary_dim,
        raw=raw,
    )

