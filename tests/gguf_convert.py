"""A small stand-in for llama.cpp's convert_hf_to_gguf.py, for tests: a Hugging Face checkpoint directory
(config.json, model.safetensors, tokenizer.json) -> a GGUF file written with the gguf package's
GGUFWriter, with the converter's names, metadata keys and transforms (llama's Q/K row permutation, stacked
experts, kv_b_proj split into attn_k_b / attn_v_b), optionally quantised with gguf.quants."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file

ARCH = {"qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3moe", "llama": "llama", "qwen": "qwen",
        "deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2"}
LAYER = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight", "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight", "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight", "self_attn.kv_b_proj.weight": "attn_kv_b.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight", "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
    # original Qwen
    "ln_1.weight": "attn_norm.weight", "ln_2.weight": "ffn_norm.weight", "attn.c_attn.weight": "attn_qkv.weight",
    "attn.c_attn.bias": "attn_qkv.bias", "attn.c_proj.weight": "attn_output.weight", "mlp.w1.weight": "ffn_up.weight",
    "mlp.w2.weight": "ffn_gate.weight", "mlp.c_proj.weight": "ffn_down.weight",
}
GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight", "transformer.wte.weight": "token_embd.weight",
          "transformer.ln_f.weight": "output_norm.weight"}
EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")
LAYER_NAME = re.compile(r"(?:model\.layers|transformer\.h)\.(\d+)\.(.+)")


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_factors(cfg: dict, rope: dict) -> np.ndarray:
    """The converter's LlamaModel.generate_extra_tensors: one divisor per RoPE frequency."""
    base = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _metadata(w: gguf.GGUFWriter, arch: str, cfg: dict, mla_split: bool) -> None:
    a = lambda key: f"{arch}.{key}"  # noqa: E731
    w.add_uint32(a("block_count"), cfg.get("num_hidden_layers") or cfg.get("n_layer"))
    w.add_uint32(a("context_length"), cfg.get("max_position_embeddings") or cfg.get("seq_length"))
    w.add_uint32(a("embedding_length"), cfg["hidden_size"])
    w.add_uint32(a("attention.head_count"), cfg["num_attention_heads"])
    if arch == "qwen":
        w.add_uint32(a("feed_forward_length"), cfg["intermediate_size"] // 2)
        w.add_float32(a("rope.freq_base"), cfg["rotary_emb_base"])
        w.add_float32(a("attention.layer_norm_rms_epsilon"), cfg["layer_norm_epsilon"])
        w.add_uint32(a("rope.dimension_count"), cfg["hidden_size"] // cfg["num_attention_heads"])
        return
    w.add_uint32(a("feed_forward_length"), cfg["intermediate_size"])
    w.add_float32(a("attention.layer_norm_rms_epsilon"), cfg["rms_norm_eps"])
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    w.add_float32(a("rope.freq_base"), rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if rope.get("rope_type", rope.get("type")) == "yarn":
        w.add_string(a("rope.scaling.type"), "yarn")
        w.add_float32(a("rope.scaling.factor"), rope["factor"])
        w.add_uint32(a("rope.scaling.original_context_length"), rope["original_max_position_embeddings"])
        if "mscale_all_dim" in rope:
            w.add_float32(a("rope.scaling.yarn_log_multiplier"), 0.1 * rope["mscale_all_dim"])
    if not arch.startswith("deepseek"):
        w.add_uint32(a("attention.head_count_kv"), cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
        if cfg.get("head_dim"):
            w.add_uint32(a("attention.key_length"), cfg["head_dim"])
            w.add_uint32(a("attention.value_length"), cfg["head_dim"])
        if arch == "qwen3moe":
            w.add_uint32(a("expert_count"), cfg.get("num_experts") or cfg["num_local_experts"])
            w.add_uint32(a("expert_used_count"), cfg["num_experts_per_tok"])
            w.add_uint32(a("expert_feed_forward_length"), cfg["moe_intermediate_size"])
        return
    w.add_uint32(a("attention.head_count_kv"), 1)
    w.add_uint32(a("leading_dense_block_count"), cfg["first_k_dense_replace"])
    if cfg.get("q_lora_rank"):
        w.add_uint32(a("attention.q_lora_rank"), cfg["q_lora_rank"])
    w.add_uint32(a("attention.kv_lora_rank"), cfg["kv_lora_rank"])
    nope, rope_dim, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    if mla_split:
        w.add_uint32(a("attention.key_length"), cfg["kv_lora_rank"] + rope_dim)
        w.add_uint32(a("attention.value_length"), cfg["kv_lora_rank"])
        w.add_uint32(a("attention.key_length_mla"), nope + rope_dim)
        w.add_uint32(a("attention.value_length_mla"), v)
    else:
        w.add_uint32(a("attention.key_length"), nope + rope_dim)
        w.add_uint32(a("attention.value_length"), v)
    w.add_uint32(a("rope.dimension_count"), rope_dim)
    w.add_uint32(a("expert_feed_forward_length"), cfg["moe_intermediate_size"])
    w.add_uint32(a("expert_count"), cfg["n_routed_experts"])
    w.add_uint32(a("expert_shared_count"), cfg["n_shared_experts"])
    w.add_uint32(a("expert_used_count"), cfg["num_experts_per_tok"])
    w.add_float32(a("expert_weights_scale"), cfg["routed_scaling_factor"])
    w.add_bool(a("expert_weights_norm"), bool(cfg.get("norm_topk_prob")))
    sigmoid = cfg["model_type"] == "deepseek_v3"
    w.add_uint32(a("expert_gating_func"), 2 if sigmoid else 1)
    if (cfg.get("n_group") or 1) > 1:
        w.add_uint32(a("expert_group_count"), cfg["n_group"])
        w.add_uint32(a("expert_group_used_count"), cfg["topk_group"])


def add_tokenizer(w: gguf.GGUFWriter, tokenizer_json: Path, vocab_size: int, pre: str,
                  config: dict | None = None) -> None:
    """The converter's _set_vocab_gpt2: tokens in id order ([PADn] where none), their types, the merges."""
    tj = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    vocab = {i: t for t, i in tj["model"]["vocab"].items()}
    added = {t["id"]: t for t in tj["added_tokens"]}
    size = max(vocab_size, max([*vocab, *added]) + 1)
    tokens, types = [], []
    for i in range(size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        elif i in vocab:
            tokens.append(vocab[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, value in (config or {}).items():
        if key == "chat_template":
            w.add_chat_template(value)
        elif isinstance(value, bool):
            w.add_bool(f"tokenizer.ggml.{key}", value)
        else:
            w.add_uint32(f"tokenizer.ggml.{key}", value)


def _quantised(name: str, array: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q]:
    """Like llama.cpp's quantize: matrices in qtype (when rows fit its blocks), vectors stay F32."""
    if qtype in (Q.F32, Q.F16, Q.BF16) or array.ndim == 1:
        kind = Q.F32 if array.ndim == 1 else qtype
        if kind == Q.F32:
            return array.astype(np.float32), Q.F32
        if kind == Q.F16:
            return array.astype(np.float16), Q.F16
        return gguf.quants.quantize(array.astype(np.float32), Q.BF16), Q.BF16
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        return array.astype(np.float32), Q.F32
    if qtype == Q.Q6_K:
        return q6_k_blocks(array), qtype
    if qtype in K_SCALES:
        return random_k_blocks(array.shape, qtype), qtype
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def q6_k_blocks(array: np.ndarray) -> np.ndarray:
    """`array` [..., K] (K a multiple of 256) quantised to Q6_K blocks, as llama.cpp's reference quantiser does in
    outline (gguf.quants has none): per 16 values a scale that maps the largest |w| to -32, per 256 a float16 d that
    maps the largest of those to -128 in the int8 sub-scales, q = round(w / (d sc)) + 32 in 0..63; packed as ggml lays
    Q6_K out (tested through gguf's own dequantisation)."""
    shape = array.shape
    sub = array.reshape(-1, 16, 16).astype(np.float32)  # [blocks, sub-block, value]
    signed_max = np.take_along_axis(sub, np.abs(sub).argmax(-1)[..., None], -1)[..., 0]
    scale = signed_max / -32
    largest = np.take_along_axis(scale, np.abs(scale).argmax(-1)[..., None], -1)  # [blocks, 1]
    d = (largest / -128).astype(np.float16)
    sc = np.clip(np.round(np.divide(scale, d.astype(np.float32), out=np.zeros_like(scale), where=d != 0)), -128, 127)
    step = d.astype(np.float32) * sc
    q = np.round(np.divide(sub, step[..., None], out=np.zeros_like(sub), where=step[..., None] != 0)) + 32
    q = np.clip(q, 0, 63).astype(np.uint8).reshape(-1, 2, 4, 32)  # [blocks, half, k, l]: value 128 h + 32 k + l
    low = np.concatenate([q[:, :, 0] & 15 | (q[:, :, 2] & 15) << 4, q[:, :, 1] & 15 | (q[:, :, 3] & 15) << 4], -1)
    high = sum((q[:, :, k] >> 4) << (2 * k) for k in range(4)).astype(np.uint8)
    blocks = np.concatenate([low.reshape(-1, 128), high.reshape(-1, 64), sc.astype(np.int8).view(np.uint8),
                             d.view(np.uint8)], -1)
    return blocks.reshape(*shape[:-1], shape[-1] // 256 * 210)


# gguf.quants cannot quantise to the K and IQ types: tests write random blocks with small valid f16 scales
# (byte offsets of each block's f16 fields), and compare against gguf's dequantisation of the same bytes.
K_SCALES = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.Q2_K: (80, 82), Q.Q3_K: (108,),
            **{t: (0,) for t in (Q.IQ4_NL, Q.IQ4_XS, Q.IQ3_S, Q.IQ3_XXS, Q.IQ2_S, Q.IQ2_XS, Q.IQ2_XXS, Q.IQ1_S)}}


def random_k_blocks(shape: tuple[int, ...], qtype: Q, seed: int = 0) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed + shape[0])
    count = int(np.prod(shape)) // block
    data = rng.integers(0, 256, size=(count, size), dtype=np.uint8)
    for offset in K_SCALES[qtype]:
        scales = rng.uniform(0.0005, 0.002, size=count).astype(np.float16)
        data[:, offset:offset + 2] = scales.view(np.uint8).reshape(count, 2)
    return data.reshape(*shape[:-1], shape[-1] // block * size)


def convert(model_dir: Path, out: Path, qtype: Q = Q.F32, pre: str = "gpt-2", mla_split: bool = True,
            tokenizer: dict | None = None, extra: dict | None = None, types: dict[str, Q] | None = None) -> Path:
    """Write model_dir as a GGUF file at `out` (tensor data of type qtype where it applies; `types`: another type
    for the tensors whose GGUF name contains a key, as llama.cpp's mixes keep attn_v or ffn_down in Q6_K)."""
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    arch = ARCH[cfg["model_type"]]
    tensors = {k: v.astype(np.float32) for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    w = gguf.GGUFWriter(str(out), arch)
    _metadata(w, arch, cfg, mla_split)
    tok_config = model_dir / "tokenizer_config.json"  # the chat template, as gguf.SpecialVocab reads it
    template = json.loads(tok_config.read_text()).get("chat_template") if tok_config.is_file() else None
    tokenizer = {**({"chat_template": template} if isinstance(template, str) else {}), **(tokenizer or {})}
    add_tokenizer(w, model_dir / "tokenizer.json", tensors.get("model.embed_tokens.weight",
                  tensors.get("transformer.wte.weight")).shape[0], pre, tokenizer)
    for key, value in (extra or {}).items():
        w.add_string(key, value) if isinstance(value, str) else w.add_uint32(key, value)
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    out_tensors = {}
    for name, array in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name in GLOBAL:
            out_tensors[GLOBAL[name]] = array
            continue
        match = EXPERT.fullmatch(name)
        if match:
            layer, index, kind = match.groups()
            experts.setdefault((int(layer), kind), {})[int(index)] = array
            continue
        layer, tail = LAYER_NAME.fullmatch(name).groups()
        if arch == "llama" and tail in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            array = permute(array, heads if ".q_proj" in tail else kv_heads)
        if arch == "deepseek2" and tail == "self_attn.kv_b_proj.weight" and mla_split:
            nope, v = cfg["qk_nope_head_dim"], cfg["v_head_dim"]
            kv_b = array.reshape(heads, nope + v, array.shape[-1])
            out_tensors[f"blk.{layer}.attn_k_b.weight"] = np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1))
            out_tensors[f"blk.{layer}.attn_v_b.weight"] = np.ascontiguousarray(kv_b[:, nope:])
            continue
        out_tensors[f"blk.{layer}.{LAYER[tail]}"] = array
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if arch == "llama" and rope.get("rope_type") == "llama3":
        out_tensors["rope_freqs.weight"] = llama3_factors(cfg, rope)
    write_tensors(w, out_tensors, experts, qtype, types)
    return Path(out)


def write_tensors(w: gguf.GGUFWriter, tensors: dict[str, np.ndarray], experts: dict[tuple, dict[int, np.ndarray]],
                  qtype: Q, types: dict[str, Q] | None = None) -> None:
    """The layers' experts stacked (ffn_*_exps, as llama.cpp's converter stacks them), every tensor quantised as
    `convert` says, and the file written and closed."""
    for (layer, kind), stack in sorted(experts.items()):
        tensors[f"blk.{layer}.ffn_{kind}_exps.weight"] = np.stack([stack[i] for i in sorted(stack)])
    for name, array in tensors.items():
        chosen = next((t for part, t in (types or {}).items() if part in name), qtype)
        data, kind = _quantised(name, array, chosen)
        w.add_tensor(name, data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
