"""Qwen3.5 GGUF tensors (architectures `qwen35` and `qwen35moe`) -> the checkpoint tensors llmcli's hybrid model
loads, undoing what llama.cpp's converter (`Qwen3_5TextModel`, `Qwen3_5MoeTextModel`) did to them:

- RMSNorm weights outside the DeltaNet are stored as 1 + w (llama.cpp's norm multiplies by the weight; Qwen3.5's by
  1 + w). The converter adds 1 in the checkpoint's dtype, so a bfloat16 source's stored value is rounded there:
  1 + (stored - 1) is what llama.cpp multiplies by too.
- A_log is stored as -exp(A_log) (ssm_a), the depthwise conv1d kernel squeezed to [channels, kernel].
- Where a layer has more value heads than key heads, the value heads are reordered from grouped by key head
  (v0 v1 of k0, v0 v1 of k1, ...) to tiled (v0 of k0, v0 of k1, ..., v1 of k0, ...): the v rows of the fused qkv
  projection, the z and a/b projections' rows, A_log, dt_bias, the conv kernel's v channels, and the out
  projection's columns. `untile` is the inverse.
- The full-attention layers keep Qwen3's names; their q projection holds q and the output gate, as in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from llmcli.config import ModelConfig
from llmcli.formats.gguf import GGUFFile

# GGUF name -> checkpoint name within a layer, and how to undo the converter (see the module's docstring)
LINEAR_NAMES = {
    "attn_qkv.weight": "linear_attn.in_proj_qkv.weight",
    "attn_gate.weight": "linear_attn.in_proj_z.weight",
    "ssm_alpha.weight": "linear_attn.in_proj_a.weight",
    "ssm_beta.weight": "linear_attn.in_proj_b.weight",
    "ssm_a": "linear_attn.A_log",
    "ssm_dt.bias": "linear_attn.dt_bias",
    "ssm_conv1d.weight": "linear_attn.conv1d.weight",
    "ssm_norm.weight": "linear_attn.norm.weight",
    "ssm_out.weight": "linear_attn.out_proj.weight",
}
ROW_REORDERS = ("attn_qkv.weight", "attn_gate.weight", "ssm_alpha.weight", "ssm_beta.weight")  # rows alone move
PLUS_ONE_NORMS = ("attn_norm.weight", "post_attention_norm.weight", "attn_q_norm.weight", "attn_k_norm.weight")
ARCHITECTURES = ("qwen35", "qwen35moe")
# Where these files' names differ from the other architectures' (gguf_names.LAYER_NAMES covers the rest)
OWN_NAMES = {
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    # Qwen3.5-MoE's shared expert (the routed experts, stacked, are read one at a time as other MoE files' are)
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    **LINEAR_NAMES,
}


def untile(w: np.ndarray, axis: int, key_heads: int, per_key: int, size: int) -> np.ndarray:
    """Inverse of the converter's `_reorder_v_heads` along `axis`: value heads tiled over the key heads
    [per_key, key_heads, size] -> grouped by key head [key_heads, per_key, size]."""
    axis %= w.ndim
    shape = w.shape
    tiled = w.reshape(*shape[:axis], per_key, key_heads, size, *shape[axis + 1:])
    return np.swapaxes(tiled, axis, axis + 1).reshape(shape)


def transform(cfg: ModelConfig, tail: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """How the stored tensor `tail` of a layer becomes the checkpoint's, or None where it is stored as loaded."""
    if tail in PLUS_ONE_NORMS:
        return lambda w: w.astype(np.float32) - 1
    nk, nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    per_key, dk, dv = nv // nk, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    grouped = nv != nk  # the converter reordered the value heads

    def heads(w: np.ndarray, axis: int, size: int) -> np.ndarray:
        return untile(w, axis, nk, per_key, size) if grouped else w

    def v_rows(w: np.ndarray) -> np.ndarray:  # the rows after q and k: the value heads' channels
        qk = 2 * nk * dk
        return np.concatenate([w[:qk], heads(w[qk:], 0, dv)]) if grouped else w

    if tail == "ssm_a":
        return lambda w: heads(np.log(-w.astype(np.float32)), 0, 1)
    if tail == "ssm_conv1d.weight":
        return lambda w: v_rows(w)[:, None, :]
    if tail == "attn_qkv.weight":
        return v_rows if grouped else None
    if tail == "attn_gate.weight":
        return (lambda w: heads(w, 0, dv)) if grouped else None
    if tail in ("ssm_alpha.weight", "ssm_beta.weight", "ssm_dt.bias"):
        return (lambda w: heads(w, 0, 1)) if grouped else None
    if tail == "ssm_out.weight":
        return (lambda w: heads(w, 1, dv)) if grouped else None
    return None


def stored_shape(gg: GGUFFile, name: str, tail: str) -> tuple[int, ...]:
    shape = gg.tensors[name].shape
    return (shape[0], 1, shape[1]) if tail == "ssm_conv1d.weight" else shape
