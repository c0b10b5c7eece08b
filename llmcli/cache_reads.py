"""Cache bytes one decode step reads, per sequence, from the model's own attention facts (`attention_info`).

At long contexts the cache, not the weights, can be most of a step's reads: an original Qwen-7B step at 4,096
tokens reads 2 GB of keys and values beside 15 GB of weights, a Qwen2.5-0.5B step 50 MB beside 1 GB. Per layer:
- full attention: every cached key and value; a sliding window: its last `window` tokens;
- MLA: every latent row; with DeepSeek Sparse Attention (V3.2) every indexer key, but only the `index_topk`
  selected latent rows;
- a linear-attention (Gated DeltaNet) layer: its fixed state, whatever the context;
- DeepSeek-V4: the sliding window's keys, plus the compressed entries (all of them in an HCA layer; in a CSA
  layer every entry's indexer key and the `index_topk` selected entries).
"""

from __future__ import annotations

MAX_SAMPLES = 256  # contexts averaged over a run's steps; the reads are piecewise linear in the context


def layer_step_bytes(info: dict, context: int) -> float:
    """Bytes layer `info` reads from one sequence's cache in a step that attends to `context` tokens."""
    kind = info["type"]
    if kind == "linear":
        return info["state_bytes_per_sequence"]
    if "window_bytes_per_token" in info:  # DeepSeek-V4
        return _v4_layer_bytes(info, context)
    per_token = info["cache_bytes_per_token"]
    if kind == "mla+dsa":
        latent = info["kv_lora_rank"] + info["qk_rope_head_dim"]
        element = per_token / (latent + info["index_head_dim"])
        selected = min(context, info["index_topk"]) if info.get("sparse_mode") == "sparse" else context
        return element * (info["index_head_dim"] * context + latent * selected)
    window = info.get("window")
    return per_token * (min(context, window) if window else context)


def _v4_layer_bytes(info: dict, context: int) -> float:
    """V4: the window's keys (one head, K = V) and the compressed entries emitted so far."""
    key = info["window_bytes_per_token"]
    read = key * min(context, info["window"])
    rate = info.get("compress_rate")
    if rate:
        entries = context // rate
        if info.get("index_topk"):  # CSA: the indexer scans every entry's key, attention reads the chosen ones
            read += entries * info["index_bytes_per_entry"] + key * min(entries, info["index_topk"])
        else:
            read += key * entries
    return read


def _layer_facts(model) -> list[dict]:
    return [model.attention_info(i) for i in range(model.config.num_layers)]


def step_cache_bytes(model, context: int) -> float:
    """Bytes a decode step at `context` tokens reads from one sequence's cache, summed over the layers."""
    return sum(layer_step_bytes(info, context) for info in _layer_facts(model))


def mean_step_cache_bytes(model, prompt_tokens: int, steps: int) -> float:
    """The mean over a run's decode steps (step i attends to prompt_tokens + i tokens), per sequence."""
    if steps < 1:
        return 0.0
    infos = _layer_facts(model)
    count = min(steps, MAX_SAMPLES)
    contexts = [prompt_tokens + 1 + round(i * (steps - 1) / max(1, count - 1)) for i in range(count)]
    return sum(layer_step_bytes(info, c) for c in contexts for info in infos) / count
