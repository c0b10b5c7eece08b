"""config.json -> one normalised ModelConfig (`config_fields.py`), by the family's parser: Qwen2/3 (and Llama,
Qwen2's layout without the q/k/v bias) here,
original Qwen in `config_qwen1.py`, DeepSeek in `config_deepseek.py`."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from llmcli.config_deepseek import _fp8_block, parse_deepseek
from llmcli.config_deepseek_v4 import parse_deepseek_v4
from llmcli.config_fields import (
    MAX_LAYERS,
    ModelConfig,
    _as_id_list,
    _count,
    _dtype_name,
    _layer_windows,
    _require,
    _token_id,
    check_config,
    parse_rope_scaling,
)
from llmcli.config_qwen1 import parse_qwen1
from llmcli.config_qwen_hybrid import ARCHITECTURES as HYBRID_ARCHITECTURES
from llmcli.config_qwen_hybrid import MODEL_TYPES as HYBRID_TYPES
from llmcli.config_qwen_hybrid import parse_qwen_hybrid
from llmcli.config_qwen_moe import QWEN_MOE_FAMILIES, qwen_moe_fields, qwen_moe_windows
from llmcli.errors import LlmcliError

__all__ = ["ModelConfig", "config_from_dict", "load_config", "model_type_of", "read_json"]


# -- family parsers ------------------------------------------------------------------------------


def parse_qwen2(raw: dict) -> ModelConfig:
    family = raw.get("model_type", "qwen2")
    layers = _count(_require(raw, "num_hidden_layers"), "num_hidden_layers", MAX_LAYERS)
    heads = _count(_require(raw, "num_attention_heads"), "num_attention_heads")
    hidden = _count(_require(raw, "hidden_size"), "hidden_size")
    head_dim = raw.get("head_dim") or hidden // heads
    factors = llama3_rope_factors(raw, int(head_dim)) if family == "llama" else None
    theta, scaling = parse_rope_scaling(_without_llama3(raw) if factors else raw)
    is_qwen3 = family in ("qwen3", "qwen3_moe")
    moe = family in QWEN_MOE_FAMILIES
    return ModelConfig(
        rope_freq_factors=factors,
        family=family,
        vocab_size=int(_require(raw, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_require(raw, "intermediate_size")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)) if is_qwen3 or family == "llama"
        else bool(raw.get("qkv_bias", True)),
        qk_norm=is_qwen3,
        layer_windows=qwen_moe_windows(raw, layers) if moe else _layer_windows(raw, layers),
        eos_token_ids=_as_id_list(raw.get("eos_token_id")),
        bos_token_id=_token_id(raw.get("bos_token_id")),
        torch_dtype=_dtype_name(raw.get("torch_dtype") or raw.get("dtype")),
        fp8_block_size=_fp8_block(raw),  # Qwen3-*-FP8: 128x128 block scales, as DeepSeek's
        raw=raw,
        **qwen_moe_fields(raw, layers),
    )


def _llama3_params(raw: dict) -> dict | None:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type")) if isinstance(params, dict) else None
    return params if kind == "llama3" else None


def _without_llama3(raw: dict) -> dict:
    """The rest of the RoPE settings (rope_theta) once the llama3 factors are taken out."""
    params = _llama3_params(raw)
    return {**raw, "rope_scaling": None, "rope_parameters": {"rope_theta": params.get("rope_theta",
                                                                                     raw.get("rope_theta", 10000.0))}}


def llama3_rope_factors(raw: dict, head_dim: int) -> list[float] | None:
    """Llama 3.1's RoPE scaling (DeepSeek-R1-Distill-Llama) as one divisor per frequency, as llama.cpp's
    converter writes rope_freqs: 1 for short wavelengths, `factor` for long ones, smoothed between."""
    params = _llama3_params(raw)
    if params is None:
        return None
    base = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    factor, low = float(params.get("factor", 8.0)), float(params.get("low_freq_factor", 1.0))
    high, old = float(params.get("high_freq_factor", 4.0)), float(params.get("original_max_position_embeddings", 8192))
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


# model_type -> parser; each family's parser lives in its own module.
PARSERS: dict[str, Callable[[dict], ModelConfig]] = {
    "qwen": parse_qwen1,
    "qwen2": parse_qwen2,
    "qwen3": parse_qwen2,
    "qwen2_moe": parse_qwen2,
    "qwen3_moe": parse_qwen2,
    "llama": parse_qwen2,
    "deepseek_v2": parse_deepseek,
    "deepseek_v3": parse_deepseek,
    "deepseek_v32": parse_deepseek,
    "deepseek_v4": parse_deepseek_v4,
    **dict.fromkeys(HYBRID_TYPES, parse_qwen_hybrid),
}

# architectures[0] -> model_type, for configs that lack model_type.
ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "LlamaForCausalLM": "llama",
    "QWenLMHeadModel": "qwen",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "DeepseekV32ForCausalLM": "deepseek_v32",
    "DeepseekV4ForCausalLM": "deepseek_v4",
    **HYBRID_ARCHITECTURES,
}


def model_type_of(raw: dict) -> str:
    kind = raw.get("model_type")
    if not kind:
        archs = raw.get("architectures") or []
        kind = ARCHITECTURES.get(archs[0]) if archs else None
    return kind or "unknown"


def config_from_dict(raw: dict) -> ModelConfig:
    archs = raw.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise LlmcliError(f"config.json: architectures must be a list of class names, got {archs!r}")
    if not isinstance(raw.get("model_type", ""), (str, type(None))):
        raise LlmcliError(f"config.json: model_type must be a name, got {raw['model_type']!r}")
    kind = model_type_of(raw)
    parser = PARSERS.get(kind)
    if parser is None:
        supported = ", ".join(sorted(PARSERS))
        raise LlmcliError(f"unknown model_type {kind!r}; supported: {supported}")
    try:  # the parsers take the family from model_type: fill it in where only architectures named it
        cfg = parser(raw if raw.get("model_type") == kind else {**raw, "model_type": kind})
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:  # ArithmeticError: float() of a huge int
        raise LlmcliError(f"config.json is invalid for {kind}: {exc}") from exc
    check_config(cfg)
    return cfg


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as exc:
        raise LlmcliError(f"{path} not found") from exc
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: deep nesting
        raise LlmcliError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise LlmcliError(f"{path} does not hold a JSON object")
    return data


def load_config(model_dir: Path) -> ModelConfig:
    """Read config.json (and eos ids from generation_config.json) from a model directory."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise LlmcliError(f"{model_dir} has no config.json; is it a model directory?")
    cfg = config_from_dict(read_json(path))
    gen_path = Path(model_dir) / "generation_config.json"
    if gen_path.is_file():
        gen = read_json(gen_path)
        for token_id in _as_id_list(gen.get("eos_token_id")):
            if token_id not in cfg.eos_token_ids:
                cfg.eos_token_ids.append(token_id)
        if cfg.bos_token_id is None:
            cfg.bos_token_id = gen.get("bos_token_id")
    return cfg
