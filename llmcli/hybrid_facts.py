"""Facts about hybrid Gated DeltaNet models (Qwen3-Next, Qwen3.5) from their config alone, for `show` and the
memory estimate (no torch here: `show` stays torch-free).

Their cache has two parts: keys and values for the full-attention layers, which grow with every token, and
for each DeltaNet layer a constant state per sequence: the causal conv's last Kc-1 inputs (2Kd + Vd channels,
model dtype) and the recurrent state (nv x dk x dv, always float32).
"""

from __future__ import annotations

from llmcli.config import ModelConfig
from llmcli.config_qwen_hybrid import FULL, LINEAR

SKIPPED_PREFIXES = ("model.visual.", "mtp.")  # a wrapper's vision tower, multi-token prediction: never loaded


def is_hybrid(cfg: ModelConfig) -> bool:
    return bool(cfg.layer_types)


def full_layers(cfg: ModelConfig) -> int:
    return sum(kind == FULL for kind in cfg.layer_types)


def conv_channels(cfg: ModelConfig) -> int:
    keys = cfg.linear_num_key_heads * cfg.linear_key_head_dim
    return 2 * keys + cfg.linear_num_value_heads * cfg.linear_value_head_dim  # [q | k | v]


def state_bytes_per_layer(cfg: ModelConfig, element: int) -> int:
    """One DeltaNet layer's constant cache for one sequence."""
    conv = conv_channels(cfg) * (cfg.linear_conv_kernel_dim - 1) * element
    return conv + cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4


def cache_facts(cfg: ModelConfig, element: int) -> dict:
    """KV bytes per token (full layers only) and the constant state bytes per sequence (DeltaNet layers)."""
    full = full_layers(cfg)
    linear = cfg.num_layers - full
    return {"full_layers": full, "linear_layers": linear,
            "bytes_per_token": 2 * cfg.num_kv_heads * cfg.head_dim * element * full,
            "state_bytes_per_sequence": state_bytes_per_layer(cfg, element) * linear}


def schedule(cfg: ModelConfig) -> str:
    """The layer schedule in a line, e.g. "(3 linear, 1 full) x 12" or the runs as they come."""
    kinds = ["linear" if kind == LINEAR else "full" for kind in cfg.layer_types]
    runs: list[list] = []
    for kind in kinds:
        if runs and runs[-1][0] == kind:
            runs[-1][1] += 1
        else:
            runs.append([kind, 1])
    text = ", ".join(f"{n} {kind}" for kind, n in runs)
    for period in range(1, len(runs) // 2 + 1):  # a repeating block, as the released models have
        if len(runs) % period == 0 and runs == runs[:period] * (len(runs) // period):
            return f"({', '.join(f'{n} {kind}' for kind, n in runs[:period])}) x {len(runs) // period}"
    return text


def mixer_params(cfg: ModelConfig, index: int) -> int:
    """Parameters of layer `index`'s token mixer (for counts computed from the config)."""
    h = cfg.hidden_size
    if cfg.layer_types[index] == FULL:
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return h * (2 * q + 2 * kv) + q * h + 2 * cfg.head_dim  # q doubled by its gate; q/k norms
    nv, value = cfg.linear_num_value_heads, cfg.linear_num_value_heads * cfg.linear_value_head_dim
    channels = conv_channels(cfg)
    projections = h * (channels + value + 2 * nv) + value * h
    return projections + channels * cfg.linear_conv_kernel_dim + 2 * nv + cfg.linear_value_head_dim
