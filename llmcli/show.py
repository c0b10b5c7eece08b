"""What a model is, from config.json and the safetensors headers, without reading any weights.

Parameter counts come from the checkpoint's tensor shapes when the weights are on disk (exact), else
from the config (the same shapes, computed). FP8 scale tensors are not parameters; DeepSeek-V3's
multi-token-prediction layer (`model.layers.{num_layers}`) is counted apart, since generation skips it.
The memory a model needs is llmcli.memory's figure, the one loading checks.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from llmcli import memory
from llmcli.config import ModelConfig, load_config
from llmcli.config_deepseek import indexer_settings
from llmcli.formats.safetensors import DTYPE_NAMES, TensorInfo, read_checkpoint
from llmcli.hybrid_facts import SKIPPED_PREFIXES, cache_facts, is_hybrid, mixer_params, schedule
from llmcli.memory import ELEMENT_BYTES, NOT_PARAMETERS, SCALE_SUFFIX, layer_of
from llmcli.show_gguf import gguf_facts, gguf_path_of, open_for_show
from llmcli.show_v4 import v4_facts, v4_params

# per-expert (experts.7.up_proj) or fused (experts.gate_up_proj); `ffn`: DeepSeek-V4's hub names
ROUTED_EXPERT_RE = re.compile(r"\.(mlp|ffn)\.experts\.")


# -- parameter counts -------------------------------------------------------------------------------


@dataclass
class ParamCount:
    total: int  # everything generation uses
    active: int  # per token (MoE: k of E routed experts, no embedding table; dense: = total)
    mtp: int = 0  # multi-token-prediction layers (not used for generation)
    source: str = "checkpoint"  # or "config"
    dtype_bytes: dict[str, int] = field(default_factory=dict)  # on-disk bytes per dtype


def count_checkpoint(cfg: ModelConfig, tensors: dict[str, TensorInfo]) -> ParamCount:
    total = mtp = 0
    routed: dict[int, int] = {}
    dtype_bytes: dict[str, int] = {}
    for t in tensors.values():
        dtype = DTYPE_NAMES.get(t.dtype, t.dtype)
        dtype_bytes[dtype] = dtype_bytes.get(dtype, 0) + t.nbytes
    for name, t in memory.block_quantised(tensors).items():
        if name.endswith(SCALE_SUFFIX) or name.endswith(NOT_PARAMETERS):
            continue
        layer = layer_of(name)
        if (is_hybrid(cfg) or cfg.family == "deepseek_v4") and name.startswith(SKIPPED_PREFIXES):  # vision; mtp.*
            mtp += t.numel if name.startswith("mtp.") else 0
            continue
        if layer is not None and layer >= cfg.num_layers:
            mtp += t.numel
            continue
        total += t.numel
        if layer is not None and ROUTED_EXPERT_RE.search(name):
            routed[layer] = routed.get(layer, 0) + t.numel
    return ParamCount(total, total - _inactive(cfg, routed), mtp, "checkpoint", dtype_bytes)


def _inactive(cfg: ModelConfig, routed: dict[int, int]) -> int:
    """What a token of a MoE model does not compute with: the routed experts it is not sent to (all the
    same size, k of E run) and, as DeepSeek counts its "activated" parameters, the embedding table
    (a lookup of one row; unless it doubles as the output head). Dense models: nothing."""
    if not cfg.n_routed_experts:
        return 0
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    # Qwen's "A3B"/"A2.7B" active counts include the embedding table (Qwen3-30B-A3B: 3.3B with, 3.0B without).
    qwen = cfg.family.startswith("qwen")
    embedding = 0 if cfg.tie_word_embeddings or qwen else cfg.vocab_size * cfg.hidden_size
    return embedding + sum(r - r * k // e for r in routed.values())


def count_config(cfg: ModelConfig) -> ParamCount:
    """The parameter count the config implies (used when the weights are not on disk)."""
    h, v = cfg.hidden_size, cfg.vocab_size
    total = v * h + h + (0 if cfg.tie_word_embeddings else v * h)  # embeddings, final norm, head
    if cfg.family == "deepseek_v4":  # compressed attention, hyper-connections: llmcli.show_v4
        body, routed = v4_params(cfg)
        return ParamCount(total + body, total + body - _inactive(cfg, routed), 0, "config")
    routed: dict[int, int] = {}
    for i in range(cfg.num_layers):
        total += 2 * h + (mixer_params(cfg, i) if is_hybrid(cfg) else _attention_params(cfg))  # norms + mixer
        if cfg.is_moe_layer(i):
            e, mi = cfg.n_routed_experts, cfg.moe_intermediate_size
            bias = e if cfg.topk_method == "noaux_tc" else 0  # V3's e_score_correction_bias
            total += e * h + bias + 3 * h * mi * (e + cfg.n_shared_experts)
            if cfg.shared_expert_intermediate_size:  # Qwen: one shared expert of its own width, and its gate
                total += 3 * h * cfg.shared_expert_intermediate_size + h
            routed[i] = 3 * h * mi * e
        else:
            total += 3 * h * cfg.intermediate_size
    return ParamCount(total, total - _inactive(cfg, routed), 0, "config")


def _largest_unit(cfg: ModelConfig) -> int:
    """Values of the largest part loading prepares at once (see llmcli.memory): a layer's attention and dense or
    shared-expert MLP, or an untied head."""
    h = cfg.hidden_size
    mlp = 3 * h * max(cfg.intermediate_size, cfg.n_shared_experts * cfg.moe_intermediate_size,
                      cfg.shared_expert_intermediate_size)
    return max(_attention_params(cfg) + mlp, 0 if cfg.tie_word_embeddings else cfg.vocab_size * h)


def _attention_params(cfg: ModelConfig) -> int:
    h = cfg.hidden_size
    if cfg.family.startswith("deepseek"):
        heads, nope, rope, vd, kvl = (cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                                      cfg.v_head_dim, cfg.kv_lora_rank)
        q_out = heads * (nope + rope)
        q = h * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * q_out if cfg.q_lora_rank else h * q_out
        mla = q + h * (kvl + rope) + kvl + kvl * heads * (nope + vd) + heads * vd * h
        if cfg.family == "deepseek_v32":  # the sparse attention indexer: wq_b, wk, k_norm, weights_proj
            ix = indexer_settings(cfg)
            mla += cfg.q_lora_rank * ix.heads * ix.head_dim + h * ix.head_dim + 2 * ix.head_dim + h * ix.heads
        return mla
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    bias = (q + 2 * kv) if cfg.attention_bias else 0
    norms = 2 * cfg.head_dim if cfg.qk_norm else 0
    return h * (q + 2 * kv) + bias + q * h + norms


# -- the rest of the facts --------------------------------------------------------------------------


def run_dtype(cfg: ModelConfig) -> str:
    """The dtype llmcli computes in by default. Mirrors loader.resolve_dtype("auto") without importing torch:
    FP8 checkpoints run in bfloat16, unknown ones in float32 (CPU runs float16 as bfloat16: same size)."""
    saved = (cfg.torch_dtype or "").replace("torch.", "")
    if cfg.fp8_block_size is not None:
        return "bfloat16"
    return saved if saved in ("float32", "bfloat16", "float16") else "float32"


def kv_cache(cfg: ModelConfig, dtype: str) -> dict:
    """Bytes of cache each token adds across all layers. MLA caches the compressed latent c_kv and the
    shared rotary key instead of per-head keys and values; hybrids keep keys and values in their full-attention
    layers only, and a constant state per sequence in their DeltaNet layers."""
    elem = ELEMENT_BYTES.get(dtype, 4)
    if is_hybrid(cfg):
        return {"kind": "keys and values (full layers) + recurrent state (linear layers)", "dtype": dtype,
                "values_per_layer": memory.kv_values_per_token(cfg), **cache_facts(cfg, elem)}
    values = memory.kv_values_per_token(cfg)
    if cfg.family.startswith("deepseek"):
        expanded = cfg.num_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
        kind = "latent (MLA) + indexer key (DSA)" if cfg.family == "deepseek_v32" else "latent (MLA)"
        return {"kind": kind, "dtype": dtype, "values_per_layer": values,
                "bytes_per_token": values * elem * cfg.num_layers,
                "expanded_bytes_per_token": expanded * elem * cfg.num_layers}
    return {"kind": "keys and values", "dtype": dtype, "values_per_layer": values,
            "bytes_per_token": values * elem * cfg.num_layers}


def window_schedule(cfg: ModelConfig) -> dict:
    windows = list(cfg.layer_windows or [None] * cfg.num_layers)
    sliding = [i for i, w in enumerate(windows) if w]
    if not sliding:
        return {"summary": "full causal attention on every layer", "layer_windows": windows}
    sizes = sorted({windows[i] for i in sliding})
    return {"summary": f"sliding window {', '.join(map(str, sizes))} on {len(sliding)} of {len(windows)} layers "
                       f"({_ranges(sliding)}), full attention elsewhere", "layer_windows": windows}


def _ranges(indices: list[int]) -> str:
    parts, start = [], indices[0]
    for prev, cur in zip(indices, indices[1:] + [None], strict=True):
        if cur != prev + 1:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return "layers " + ", ".join(parts)


def chat_template_source(model_dir: Path, family: str) -> str | None:
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return "checkpoint"
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        try:
            if json.loads(config.read_text(encoding="utf-8")).get("chat_template"):
                return "checkpoint"
        except (ValueError, AttributeError):
            pass
    if family == "qwen":
        return "built-in ChatML"
    if family == "deepseek_v32":  # its repo ships the format as Python, which llmcli writes natively
        return "built-in DeepSeek-V3.2 format"
    if family == "deepseek_v4":  # likewise
        return "built-in DeepSeek-V4 format"
    return None


def _rope(cfg: ModelConfig) -> dict:
    s = cfg.rope_scaling
    scaling = None if s.type == "default" else {
        "type": s.type, "factor": s.factor, "original_max_position_embeddings": s.original_max_position_embeddings,
        "mscale": s.mscale, "mscale_all_dim": s.mscale_all_dim,
    }
    return {"base": cfg.rope_theta, "scaling": scaling,
            "rotary_dim": cfg.rotary_dim or (cfg.qk_rope_head_dim if cfg.family.startswith("deepseek") else
                                             cfg.head_dim)}


def _experts(cfg: ModelConfig) -> dict | None:
    if not cfg.is_moe:
        return None
    moe_layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    return {
        "routed": cfg.n_routed_experts, "per_token": cfg.num_experts_per_tok,
        "shared": cfg.n_shared_experts or (1 if cfg.shared_expert_intermediate_size else 0),
        "shared_intermediate_size": cfg.shared_expert_intermediate_size or None,  # Qwen's own width
        "groups": cfg.n_group, "groups_per_token": cfg.topk_group, "intermediate_size": cfg.moe_intermediate_size,
        "moe_layers": len(moe_layers), "dense_layers": cfg.num_layers - len(moe_layers),
        "scoring": cfg.scoring_func, "topk_method": cfg.topk_method,
        "routed_scaling_factor": cfg.routed_scaling_factor, "norm_topk_prob": cfg.norm_topk_prob,
    }


def _attention(cfg: ModelConfig) -> dict:
    if cfg.family.startswith("deepseek"):
        mla = {"kind": "MLA", "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank,
               "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
               "v_head_dim": cfg.v_head_dim}
        if cfg.family == "deepseek_v32":  # each query attends to its index_topk best-scored tokens
            ix = indexer_settings(cfg)
            mla.update(sparse="DSA", index_topk=ix.topk, index_n_heads=ix.heads, index_head_dim=ix.head_dim)
        return mla
    kind = "MHA" if cfg.num_kv_heads == cfg.num_heads else "GQA" if cfg.num_kv_heads > 1 else "MQA"
    return {"kind": kind, "qkv_bias": cfg.attention_bias, "qk_norm": cfg.qk_norm}


def _weight_sizes(cfg: ModelConfig, tensors: dict[str, TensorInfo] | None, dtype: str) -> dict | None:
    """Bytes of the weights once loaded in the run dtype, and with --quantize int8, int5 or int4 (MTP layers
    skipped)."""
    if tensors is None:
        return None
    kept = memory.loaded_tensors(cfg, tensors)
    return {dtype: memory.weight_bytes(cfg, kept, dtype),
            **{q: memory.weight_bytes(cfg, kept, dtype, q) for q in ("int8", "int5", "int4")}}


def _memory(cfg: ModelConfig, tensors: dict[str, TensorInfo] | None, params: ParamCount, dtype: str) -> dict:
    """The memory loading checks for (the default dtype; int8 too when the headers are on disk) and what is free."""
    if tensors is not None:
        needed, int8 = memory.for_checkpoint(cfg, tensors, dtype), memory.for_checkpoint(cfg, tensors, dtype, "int8")
    else:
        needed, int8 = memory.for_config(cfg, params.total, _largest_unit(cfg), dtype), None
    available = memory.available_bytes()
    return {"dtype": dtype, "needs_bytes": needed.total, "weights_bytes": needed.weights,
            "int8_needs_bytes": int8.total if int8 else None, "available_bytes": available,
            "summary": memory.summary(needed, available)}


def disk_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file())


def describe(model_dir: Path, name: str | None = None, repo: str | None = None,
             remote_bytes: int | None = None) -> dict:
    """Every fact `show` reports, as a JSON-ready dict."""
    model_dir = Path(model_dir)
    gguf = open_for_show(gguf_file) if (gguf_file := gguf_path_of(model_dir)) is not None else None
    cfg = gguf.config if gguf else load_config(model_dir)
    # Lenient where loading is strict: with shards not (all) downloaded the counts come from the config, and
    # tensors of dtypes the reader has no size for are still counted.
    tensors = gguf.tensors if gguf else read_checkpoint(model_dir, missing_ok=True, unknown_dtypes=True)
    params = count_checkpoint(cfg, tensors) if tensors is not None else count_config(cfg)
    dtype = run_dtype(cfg)
    on_disk = max(params.dtype_bytes, key=params.dtype_bytes.get) if params.dtype_bytes else None
    fp8 = cfg.fp8_block_size is not None or any(d.startswith("float8") for d in params.dtype_bytes)
    raw = cfg.raw
    facts = {
        "name": name or str(model_dir),
        "path": str(model_dir),
        "repo": repo,
        "weights_on_disk": tensors is not None,
        "family": cfg.family,
        "architecture": (raw.get("architectures") or [None])[0],
        "params_total": params.total,
        "params_active": params.active,
        "params_mtp": params.mtp,
        "params_source": params.source,
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,  # per projection (original Qwen: half its config's)
        "vocab_size": cfg.vocab_size,
        "heads": cfg.num_heads,
        "kv_heads": None if cfg.family.startswith("deepseek") else cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "attention": _attention(cfg),
        "experts": _experts(cfg),
        "context_length": cfg.max_position_embeddings,
        "seq_length": cfg.seq_length,
        "rope": _rope(cfg),
        "logn_attention": cfg.use_logn_attn,
        "dynamic_ntk": cfg.use_dynamic_ntk,
        "window": window_schedule(cfg),
        "layer_schedule": schedule(cfg) if is_hybrid(cfg) else None,  # hybrids: linear / full token mixers
        "layer_types": cfg.layer_types or None,
        "tied_embeddings": cfg.tie_word_embeddings,
        "dtype_config": (cfg.torch_dtype or "").replace("torch.", "") or None,
        "dtype_on_disk": on_disk,
        "dtype_bytes_on_disk": params.dtype_bytes,
        "fp8": fp8,
        "fp8_block_size": list(cfg.fp8_block_size) if cfg.fp8_block_size else None,
        "run_dtype": dtype,
        "kv_cache": kv_cache(cfg, dtype),
        "weight_bytes": _weight_sizes(cfg, tensors, dtype),
        "memory": _memory(cfg, tensors, params, dtype),
        "chat_template": None if gguf else chat_template_source(model_dir, cfg.family),
        "tokenizer": "tokenizer.json" if (model_dir / "tokenizer.json").is_file()
        else "qwen.tiktoken" if (model_dir / "qwen.tiktoken").is_file() else None,
        "eos_token_ids": cfg.eos_token_ids,
        "size_on_disk": None if gguf else disk_bytes(model_dir),
        "download_bytes": remote_bytes,
    }
    if gguf:
        facts.update(gguf_facts(gguf))
    if cfg.family == "deepseek_v4":
        facts.update(v4_facts(cfg, ELEMENT_BYTES.get(dtype, 4), dtype))
    return facts
