"""`show` facts of DeepSeek-V4 from its config alone: the layer-type schedule, the cache per token and per
type (compressed entries only grow: 1 per 4 tokens in CSA layers, 1 per 128 in HCA ones), the parameters."""

from __future__ import annotations

from llmcli.config import ModelConfig
from llmcli.config_deepseek_v4 import CSA, HASH, HCA, SLIDING, v4_cache_values, v4_settings

SHORT = {SLIDING: "sliding", CSA: "CSA", HCA: "HCA"}


def v4_params(cfg: ModelConfig) -> tuple[int, dict[int, int]]:
    """(parameters besides embeddings, head and final norm; routed expert parameters per layer)."""
    s = v4_settings(cfg)
    h, hd, heads, q_lora, n = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.q_lora_rank, s.hc_mult
    e, width = cfg.n_routed_experts, cfg.moe_intermediate_size
    hc = (2 + n) * n * (n * h + 1) + 3
    total, routed = n * n * h + n + 1, {}  # the final hyper-head
    for i, kind in enumerate(s.layer_types):
        attn = h * q_lora + q_lora + q_lora * heads * hd + h * hd + hd + heads * hd * s.o_lora_rank \
            + s.o_groups * s.o_lora_rank * h + heads
        rate = s.rate(i)
        if rate:
            wide = 2 * hd if kind == CSA else hd
            attn += 2 * h * wide + rate * wide + hd
        if kind == CSA:
            di, ih = s.index_head_dim, s.index_n_heads
            attn += 2 * h * 2 * di + rate * 2 * di + di + q_lora * ih * di + h * ih
        router = e * h + (cfg.vocab_size * cfg.num_experts_per_tok if s.mlp_layer_types[i] == HASH else e)
        routed[i] = 3 * h * width * e
        total += 2 * h + 2 * hc + attn + router + routed[i] + 3 * h * width
    return total, routed


def schedule_text(kinds: list[str]) -> str:
    """Layer kinds as runs ("HCA×3") and repeated pairs of runs ("(CSA HCA)×20")."""
    runs, start = [], 0
    for i in range(1, len(kinds) + 1):
        if i == len(kinds) or kinds[i] != kinds[start]:
            runs.append(f"{kinds[start]}×{i - start}" if i - start > 1 else kinds[start])
            start = i
    out, i = [], 0
    while i < len(runs):
        repeats = 1
        while runs[i + 2 * repeats: i + 2 * repeats + 2] == runs[i: i + 2] and i + 1 < len(runs):
            repeats += 1
        out.append(f"({runs[i]} {runs[i + 1]})×{repeats}" if repeats > 1 else runs[i])
        i += 2 * repeats if repeats > 1 else 1
    return " ".join(out)


def v4_facts(cfg: ModelConfig, dtype_bytes: int, dtype: str) -> dict:
    """The facts `show` reports differently for V4 (merged over the generic ones)."""
    s = v4_settings(cfg)
    types = v4_cache_values(cfg)
    per_token = sum(t["layers"] * t["values_per_token"] for t in types.values()) * dtype_bytes
    fixed = sum(t["layers"] * t["values_per_sequence"] for t in types.values()) * dtype_bytes
    hashed = s.mlp_layer_types.count(HASH)
    return {
        "attention": {"kind": "V4", "sliding_window": s.sliding_window, "csa_rate": s.csa_rate,
                      "hca_rate": s.hca_rate, "index_topk": s.index_topk, "index_n_heads": s.index_n_heads,
                      "index_head_dim": s.index_head_dim, "o_groups": s.o_groups, "o_lora_rank": s.o_lora_rank,
                      "q_lora_rank": cfg.q_lora_rank, "hc_mult": s.hc_mult, "hash_layers": hashed},
        "layer_schedule": schedule_text([SHORT[k] for k in s.layer_types]),
        "layer_schedule_legend": f"(sliding window {s.sliding_window}; CSA: 1 entry per {s.csa_rate} tokens, "
                                 f"top {s.index_topk} per query; HCA: 1 entry per {s.hca_rate} tokens)",
        "layer_types": list(s.layer_types),
        "window": {"summary": f"sliding window {s.sliding_window} on every layer, plus compressed entries in "
                              f"{len(s.layer_types) - s.layer_types.count(SLIDING)} layers",
                   "layer_windows": [s.sliding_window] * cfg.num_layers},
        "kv_cache": {"kind": "compressed entries (CSA, HCA) + sliding window", "dtype": dtype,
                     "bytes_per_token": per_token, "bytes_per_sequence": fixed,
                     "per_type": {SHORT[k]: {"layers": t["layers"],
                                             "bytes_per_token_per_layer": t["values_per_token"] * dtype_bytes,
                                             "bytes_per_sequence_per_layer": t["values_per_sequence"] * dtype_bytes}
                                  for k, t in types.items()}},
        "rope": {"base": cfg.rope_theta, "compress_base": s.compress_rope_theta, "rotary_dim": cfg.qk_rope_head_dim,
                 "scaling": None if cfg.rope_scaling.type == "default" else {
                     "type": "yarn", "factor": cfg.rope_scaling.factor,
                     "original_max_position_embeddings": cfg.rope_scaling.original_max_position_embeddings}},
        "kv_heads": 1,
    }


def v4_lines(f: dict, add, human_bytes) -> None:
    """The `show` table's V4 lines (attention and cache), in place of the MLA / GQA ones."""
    a, kv = f["attention"], f["kv_cache"]
    add("attention", f"V4: {f['heads']} heads sharing one K=V head of {f['head_dim']}, q_lora {a['q_lora_rank']}, "
                     f"sinks, grouped output ({a['o_groups']} groups x {a['o_lora_rank']}), {a['hc_mult']} residual "
                     f"streams (mHC)")
    add("compressed", f"CSA every {a['csa_rate']} tokens (indexer: top {a['index_topk']}, {a['index_n_heads']} heads "
                      f"x {a['index_head_dim']}), HCA every {a['hca_rate']}; hash routing in {a['hash_layers']} layers")
    parts = ", ".join(f"{k} {human_bytes(t['bytes_per_token_per_layer'])} x {t['layers']}"
                      for k, t in kv["per_type"].items())
    add("kv cache", f"{human_bytes(kv['bytes_per_token'])} per token ({parts}; {kv['dtype']}) + "
                    f"{human_bytes(kv['bytes_per_sequence'])} per sequence (windows, buffers)")
