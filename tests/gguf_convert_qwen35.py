"""A stand-in for llama.cpp's converter for Qwen3.5 (`Qwen3_5TextModel`, architecture qwen35), for tests: the
metadata keys it writes and its transforms (RMSNorm weights stored as 1 + w outside the DeltaNet, A_log as
-exp(A_log), the conv kernel squeezed, value heads reordered from grouped by key head to tiled where a layer has
more value heads than key heads), as that converter's code does them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file

from tests.gguf_convert import LAYER, add_tokenizer, write_tensors

NAMES = {  # the other architectures' names (gguf_convert.LAYER), and Qwen3.5's own
    **LAYER, "post_attention_layernorm.weight": "post_attention_norm.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight", "mlp.shared_expert.up_proj.weight":
    "ffn_up_shexp.weight", "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
    "linear_attn.in_proj_qkv.weight": "attn_qkv.weight", "linear_attn.in_proj_z.weight": "attn_gate.weight",
    "linear_attn.in_proj_a.weight": "ssm_alpha.weight", "linear_attn.in_proj_b.weight": "ssm_beta.weight",
    "linear_attn.A_log": "ssm_a", "linear_attn.dt_bias": "ssm_dt.bias", "linear_attn.conv1d.weight":
    "ssm_conv1d.weight", "linear_attn.norm.weight": "ssm_norm.weight", "linear_attn.out_proj.weight": "ssm_out.weight",
}
PREFIX = "model.language_model."
EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")


def tile(w: np.ndarray, axis: int, key_heads: int, per_key: int, size: int) -> np.ndarray:
    """The converter's `_reorder_v_heads`: [key_heads, per_key, size] along `axis` -> [per_key, key_heads, size]."""
    shape = w.shape
    grouped = w.reshape(*shape[:axis], key_heads, per_key, size, *shape[axis + 1:])
    return np.swapaxes(grouped, axis, axis + 1).reshape(shape)


def _transformed(tail: str, w: np.ndarray, text: dict) -> np.ndarray:
    nk, nv = text["linear_num_key_heads"], text["linear_num_value_heads"]
    dk, dv, per_key = text["linear_key_head_dim"], text["linear_value_head_dim"], nv // nk
    if tail.endswith("norm.weight") and not tail.endswith("linear_attn.norm.weight"):
        w = w + 1
    if tail.endswith("A_log"):
        w = -np.exp(w)
    if tail.endswith("conv1d.weight"):
        w = w.squeeze()
    if nk == nv or "linear_attn." not in tail:
        return w
    qk = 2 * nk * dk
    if tail.endswith(("in_proj_qkv.weight", "conv1d.weight")):
        return np.concatenate([w[:qk], tile(w[qk:], 0, nk, per_key, dv)])
    if tail.endswith("in_proj_z.weight"):
        return tile(w, 0, nk, per_key, dv)
    if tail.endswith(("in_proj_a.weight", "in_proj_b.weight", "A_log", "dt_bias")):
        return tile(w, 0, nk, per_key, 1)
    if tail.endswith("out_proj.weight"):
        return tile(w, 1, nk, per_key, dv)
    return w


def convert_qwen35(model_dir: Path, out: Path, qtype: Q = Q.F32) -> Path:
    """Write a Qwen3.5 or Qwen3.5-MoE checkpoint directory (the vision-language wrapper) as a qwen35 or qwen35moe
    GGUF file at `out`."""
    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    text = raw["text_config"]
    tensors = {k: v.astype(np.float32) for k, v in load_file(str(model_dir / "model.safetensors")).items()
               if k.startswith(PREFIX) or k == "lm_head.weight"}
    moe = "num_experts" in text
    arch = "qwen35moe" if moe else "qwen35"
    w = gguf.GGUFWriter(str(out), arch)
    head_dim = text["head_dim"]
    rope = text["rope_parameters"]
    mlp = (("expert_count", text["num_experts"]), ("expert_used_count", text["num_experts_per_tok"]),
           ("expert_feed_forward_length", text["moe_intermediate_size"]),
           ("expert_shared_feed_forward_length", text["shared_expert_intermediate_size"])) if moe else \
        (("feed_forward_length", text["intermediate_size"]),)
    for key, value in (*mlp, ("block_count", text["num_hidden_layers"]),
                       ("context_length", text["max_position_embeddings"]), ("embedding_length", text["hidden_size"]),
                       ("attention.head_count", text["num_attention_heads"]),
                       ("attention.head_count_kv", text["num_key_value_heads"]), ("attention.key_length", head_dim),
                       ("attention.value_length", head_dim), ("ssm.conv_kernel", text["linear_conv_kernel_dim"]),
                       ("ssm.state_size", text["linear_key_head_dim"]),
                       ("ssm.group_count", text["linear_num_key_heads"]),
                       ("ssm.time_step_rank", text["linear_num_value_heads"]),
                       ("ssm.inner_size", text["linear_value_head_dim"] * text["linear_num_value_heads"]),
                       ("full_attention_interval", 4),
                       ("rope.dimension_count", int(head_dim * rope["partial_rotary_factor"]))):
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", rope["rope_theta"])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", text["rms_norm_eps"])
    w.add_array(f"{arch}.rope.dimension_sections", [*rope["mrope_section"], 0])
    w.add_array(f"{arch}.attention.recurrent_layers", [t == "linear_attention" for t in text["layer_types"]])
    add_tokenizer(w, model_dir / "tokenizer.json", text["vocab_size"], "gpt-2")  # the tests' byte tokenizer
    out_tensors = {"token_embd.weight": tensors.pop(PREFIX + "embed_tokens.weight"),
                   "output_norm.weight": tensors.pop(PREFIX + "norm.weight") + 1}
    if "lm_head.weight" in tensors:
        out_tensors["output.weight"] = tensors.pop("lm_head.weight")
    experts: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, array in tensors.items():
        layer, tail = name.removeprefix(PREFIX + "layers.").split(".", 1)
        if match := EXPERT.fullmatch(tail):  # stacked per layer, as the converter's Qwen2MoeModel does
            experts.setdefault((layer, match.group(2)), {})[int(match.group(1))] = array
            continue
        out_tensors[f"blk.{layer}.{NAMES[tail]}"] = _transformed(tail, array, text)
    write_tensors(w, out_tensors, experts, qtype)
    return Path(out)
