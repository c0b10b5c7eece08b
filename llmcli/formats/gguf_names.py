"""GGUF tensors -> the checkpoint tensors llmcli's models load (Hugging Face names and layouts), undoing
what llama.cpp's converter did to them:

- llama: the converter permuted the rows of attn_q / attn_k within each head from the half-split RoPE
  layout to interleaved pairs (`LlamaModel.permute`); `unpermute` is its exact inverse.
- qwen (original): attn_qkv keeps the fused Q|K|V rows; they are split three ways.
- deepseek2: routed experts are stacked per layer (ffn_*_exps, [experts, out, in]) and are read one
  expert at a time; newer files split kv_b_proj into attn_k_b (per head, transposed) and attn_v_b, which
  are joined back.

Each piece reads its bytes when asked (numpy, torch-free), so loading holds one piece at a time.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from llmcli.config import ModelConfig
from llmcli.errors import LlmcliError
from llmcli.formats import gguf_qwen35
from llmcli.formats.gguf import GGUFFile
from llmcli.formats.safetensors import TensorInfo

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    # DeepSeek MLA and MoE
    "attn_q_a.weight": "self_attn.q_a_proj.weight",
    "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn_q_b.weight": "self_attn.q_b_proj.weight",
    "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn_kv_b.weight": "self_attn.kv_b_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    "ffn_gate_shexp.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_experts.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_experts.down_proj.weight",
}
EXPERT_NAMES = {"ffn_gate_exps.weight": "gate_proj", "ffn_up_exps.weight": "up_proj",
                "ffn_down_exps.weight": "down_proj"}
# Read into the config (rope_freqs: llama3 frequency factors), not loaded as weights.
NOT_WEIGHTS = ("rope_freqs.weight",)
_LAYER = re.compile(r"blk\.(\d+)\.(.+)")


@dataclass(frozen=True)
class Piece:
    name: str  # the checkpoint tensor name the model loads
    shape: tuple[int, ...]
    source: str  # the GGUF tensor it comes from (the first, when several)
    read: Callable[[], np.ndarray]
    # Rows start..stop alone, for tensors stored as they load (no transform): big ones are read in parts.
    rows: Callable[[int, int], np.ndarray] | None = None
    # Its stored blocks, [rows, bytes per row] in the model's row order, for types kept as they are (4-bit).
    raw: Callable[[], np.ndarray] | None = None
    # Rows start..stop of those blocks alone, for tensors stored as they load: big ones are taken in parts.
    raw_rows: Callable[[int, int], np.ndarray] | None = None


def _raw_rows(gg: GGUFFile, name: str, start: int = 0, stop: int | None = None, rows: int | None = None) -> np.ndarray:
    data = gg.raw(name, start, stop)
    return data.reshape(rows or (stop or gg.tensors[name].shape[0]) - start, -1)


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` (rows of each head: interleaved pairs -> first half, second half)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _join_kv_b(gg: GGUFFile, k_name: str, v_name: str) -> np.ndarray:
    k_b = gg.read(k_name).astype(np.float32)  # [heads, rank, nope]
    v_b = gg.read(v_name).astype(np.float32)  # [heads, v, rank]
    if k_b.ndim != 3 or v_b.ndim != 3 or k_b.shape[0] != v_b.shape[0] or k_b.shape[1] != v_b.shape[2]:
        raise LlmcliError(f"{gg.path}: {k_name} {k_b.shape} and {v_name} {v_b.shape} do not make one kv_b_proj")
    heads, rank = k_b.shape[:2]
    return np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(-1, rank)


def _pieces_of(gg: GGUFFile, cfg: ModelConfig, name: str) -> list[Piece]:
    tensor = gg.tensors[name]
    if name == "output_norm.weight" and gg.architecture in gguf_qwen35.ARCHITECTURES:  # stored as 1 + w
        return [Piece(GLOBAL_NAMES[name], tensor.shape, name, lambda: gg.read(name).astype(np.float32) - 1)]
    if name in GLOBAL_NAMES:
        matrix = len(tensor.shape) == 2
        return [Piece(GLOBAL_NAMES[name], tensor.shape, name, lambda: gg.read(name),
                      lambda start, stop: gg.read(name, start, stop),
                      raw=(lambda: _raw_rows(gg, name)) if matrix else None,
                      raw_rows=(lambda start, stop: _raw_rows(gg, name, start, stop)) if matrix else None)]
    match = _LAYER.fullmatch(name)
    if not match:
        raise LlmcliError(f"{gg.path}: tensor {name} is not one llmcli knows for {gg.architecture}")
    layer, tail = match.groups()
    prefix = f"model.layers.{layer}."
    if int(layer) >= cfg.num_layers:  # DeepSeek's multi-token-prediction layers: the model skips them, unread
        return [Piece(prefix + LAYER_NAMES.get(tail, tail), tensor.shape, name, lambda: gg.read(name))]
    if tail in EXPERT_NAMES:
        experts = tensor.shape[0]
        return [Piece(f"{prefix}mlp.experts.{e}.{EXPERT_NAMES[tail]}.weight", tensor.shape[1:], name,
                      lambda e=e: gg.read(name, e, e + 1)[0],
                      raw=lambda e=e: _raw_rows(gg, name, e, e + 1, rows=tensor.shape[1])) for e in range(experts)]
    if gg.architecture in gguf_qwen35.ARCHITECTURES:
        return [_qwen35_piece(gg, cfg, name, prefix, tail)]
    if gg.architecture == "qwen" and tail.startswith("attn_qkv."):
        kind = tail.split(".")[1]
        rows = tensor.shape[0] // 3
        return [Piece(f"{prefix}self_attn.{proj}.{kind}", (rows, *tensor.shape[1:]), name,
                      lambda i=i: gg.read(name, i * rows, (i + 1) * rows) if len(tensor.shape) > 1
                      else gg.read(name)[i * rows:(i + 1) * rows],
                      raw=lambda i=i: _raw_rows(gg, name, i * rows, (i + 1) * rows) if len(tensor.shape) > 1 else None)
                for i, proj in enumerate(("q_proj", "k_proj", "v_proj"))]
    if tail == "attn_k_b.weight":
        if f"blk.{layer}.attn_kv_b.weight" in gg.tensors:
            return []  # the file has kv_b itself too
        heads, rank, nope = tensor.shape
        v_name = f"blk.{layer}.attn_v_b.weight"
        if v_name not in gg.tensors:
            raise LlmcliError(f"{gg.path}: {name} has no {v_name} beside it")
        v_dim = gg.tensors[v_name].shape[1]
        return [Piece(f"{prefix}self_attn.kv_b_proj.weight", (heads * (nope + v_dim), rank), name,
                      lambda: _join_kv_b(gg, name, v_name))]
    if tail == "attn_v_b.weight":
        return []  # joined with attn_k_b
    if tail not in LAYER_NAMES:
        raise LlmcliError(f"{gg.path}: tensor {name} is not one llmcli knows for {gg.architecture}")
    if gg.architecture == "llama" and tail.split(".")[0] in ("attn_q", "attn_k"):
        heads = cfg.num_heads if tail.startswith("attn_q") else cfg.num_kv_heads
        return [Piece(prefix + LAYER_NAMES[tail], tensor.shape, name, lambda: unpermute(gg.read(name), heads),
                      raw=lambda: unpermute(_raw_rows(gg, name), heads))]
    return [Piece(prefix + LAYER_NAMES[tail], tensor.shape, name, lambda: gg.read(name),
                  lambda start, stop: gg.read(name, start, stop), lambda: _raw_rows(gg, name),
                  lambda start, stop: _raw_rows(gg, name, start, stop))]


def _qwen35_piece(gg: GGUFFile, cfg: ModelConfig, name: str, prefix: str, tail: str) -> Piece:
    checkpoint_name = gguf_qwen35.OWN_NAMES.get(tail, LAYER_NAMES.get(tail))
    if checkpoint_name is None or tail == "ffn_norm.weight":
        raise LlmcliError(f"{gg.path}: tensor {name} is not one llmcli knows for {gg.architecture}")
    target = prefix + checkpoint_name
    undo = gguf_qwen35.transform(cfg, tail)
    if undo is None:  # stored as the checkpoint has it: read in parts, 4-bit codes taken as stored
        return Piece(target, gg.tensors[name].shape, name, lambda: gg.read(name),
                     lambda start, stop: gg.read(name, start, stop), lambda: _raw_rows(gg, name))
    # a reorder of rows alone applies to the stored blocks' rows too: 4-bit codes are then still taken as stored
    raw = (lambda: undo(_raw_rows(gg, name))) if tail in gguf_qwen35.ROW_REORDERS else None
    return Piece(target, gguf_qwen35.stored_shape(gg, name, tail), name, lambda: undo(gg.read(name)), raw=raw)


def checkpoint_pieces(gg: GGUFFile, cfg: ModelConfig) -> list[Piece]:
    """Every checkpoint tensor of the model, in file order, each read on demand."""
    pieces = []
    for name in gg.tensors:
        if name not in NOT_WEIGHTS:
            pieces.extend(_pieces_of(gg, cfg, name))
    return pieces


def tensor_infos(gg: GGUFFile, pieces: list[Piece]) -> dict[str, TensorInfo]:
    """The checkpoint tensors as llmcli.memory and show count them: quantised ones are read as float32."""
    infos = {}
    for piece in pieces:
        source = gg.tensors[piece.source]
        dtype = source.type_name if source.type_name in ("F32", "F16", "BF16") else "F32"
        infos[piece.name] = TensorInfo(source.file, dtype, piece.shape, 0, 0)
    return infos
