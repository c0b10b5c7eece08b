"""DeepSeek-V3.2 decode: sparse attention (the gathered top-k step) against dense MLA, same weights.

    python benchmarks/dsa_decode.py [--contexts 1024,8192,32768] [--layers 2] [--steps 5] [--threads 2]

A V3.2-shaped model: the real attention of DeepSeek-V3.2 (hidden 7168, 128 heads, q_lora 1536, kv_lora
512, rope 64, nope 128, v 128; indexer 64 heads x 128, index_topk 2048) in a few layers, with a small
dense MLP and vocabulary (their cost is the same in every mode and only dilutes the difference).
Random weights, float32. The cache is filled with random latents and indexer keys up to each context
length (a prompt of 32K tokens would take far longer than the decode being measured), then each mode
decodes `--steps` tokens from that length, cropping back after each; the median is reported ("step": the
whole model's decode step; "core": one layer's attention for one query without its projections, whose
weight reads cost the same in every mode and dominate a CPU step of this shape):
  sparse  the indexer scans every cached key, the absorbed MLA step attends to the top 2048 rows only
  masked  the same selection as a mask over dense attention on the whole cache (transformers' way)
  dense   V3's MLA: no indexer, attention over the whole cache
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmcli.config import config_from_dict
from llmcli.models.deepseek import DeepseekForCausalLM


def v32_shaped(layers: int) -> dict:
    return {
        "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", "vocab_size": 1024,
        "hidden_size": 7168, "intermediate_size": 1024, "num_hidden_layers": layers, "num_attention_heads": 128,
        "num_key_value_heads": 128, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "qk_nope_head_dim": 128, "n_routed_experts": 0, "first_k_dense_replace": layers,
        "max_position_embeddings": 163840, "rope_theta": 10000,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "index_topk": 2048, "index_n_heads": 64, "index_head_dim": 128, "torch_dtype": "float32",
    }


def fill(cache, length: int, generator: torch.Generator) -> None:
    """Random cache rows up to `length` (normalised like kv_a_layernorm's / the indexer's LayerNorm output)."""
    for layer in cache.layers:
        layer.kv[:length] = torch.randn(layer.kv[:length].shape, generator=generator)
        layer.index_keys[:length] = torch.randn(layer.index_keys[:length].shape, generator=generator)
    cache.length = length


def step_times(model, cache, context: int, steps: int) -> list[float]:
    times = []
    token = torch.tensor([[7]])
    for _ in range(steps + 1):  # the first step warms up
        cache.crop(context)
        start = time.perf_counter()
        model(token, cache.span(1).positions, cache)
        times.append(time.perf_counter() - start)
    return times[1:]


def core_times(attn, cache_layer, context: int, mode: str, steps: int, generator: torch.Generator) -> list[float]:
    """One layer's attention core for one query, without the projections (whose weight reads are the same
    in every mode): sparse = index scores over the cache, top-k, attention over the gathered rows; masked =
    the same selection as a mask over all rows; dense = attention over all rows."""
    from llmcli.models.dsa import gathered_attention, select

    latent, keys = cache_layer.kv[:context].transpose(0, 1), cache_layer.index_keys[:context].transpose(0, 1)
    x = torch.randn(1, 1, attn.indexer.wk.in_features, generator=generator)
    c_q = torch.randn(1, 1, attn.indexer.wq_b.in_features, generator=generator)
    q = torch.randn(1, attn.num_heads, latent.shape[-1], generator=generator)
    cos, sin = torch.ones(1, attn.rope // 2), torch.zeros(1, attn.rope // 2)

    def run() -> None:
        if mode == "dense":
            scores = torch.matmul(q, latent.transpose(1, 2)) * attn.softmax_scale
            torch.matmul(scores.softmax(-1), latent[..., : attn.rank])
            return
        indices = select(attn.indexer.scores(x, c_q, cos, sin, keys), None, attn.indexer.topk)[:, 0]
        if mode == "sparse":
            gathered_attention(q, latent, indices, None, attn.softmax_scale, attn.rank)
            return
        scores = torch.matmul(q, latent.transpose(1, 2)) * attn.softmax_scale
        hidden = torch.ones(1, context, dtype=torch.bool).scatter_(1, indices, False)
        torch.matmul(scores.masked_fill(hidden[:, None], float("-inf")).softmax(-1), latent[..., : attn.rank])

    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="1024,8192,32768", help="cached tokens before each step")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="sparse,masked,dense")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    torch.manual_seed(0)
    model = DeepseekForCausalLM(config_from_dict(v32_shaped(args.layers))).eval()
    generator = torch.Generator().manual_seed(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.layers} V3.2-shaped layers, "
          f"float32, index_topk 2048; median of {args.steps} decode steps (ms)")
    modes = args.modes.split(",")
    print(f"{'context':>8} {'what':>5} " + " ".join(f"{m:>9}" for m in modes) + "  dense/sparse")
    attn = model.model.layers[0].self_attn
    with torch.inference_mode():
        for context in contexts:
            cache = model.make_cache(1, context + 1)
            fill(cache, context, generator)
            step, core = {}, {}
            for mode in modes:
                model.set_sparse_mode(mode)
                step[mode] = statistics.median(step_times(model, cache, context, args.steps)) * 1e3
                core[mode] = statistics.median(core_times(attn, cache.layers[0], context, mode, 3 * args.steps,
                                                          generator)) * 1e3
            for what, row in (("step", step), ("core", core)):
                ratio = f"{row['dense'] / row['sparse']:.2f}x" if {"dense", "sparse"} <= row.keys() else ""
                print(f"{context:>8} {what:>5} " + " ".join(f"{v:>9.2f}" for v in row.values()) + f"  {ratio:>11}",
                      flush=True)
            del cache


if __name__ == "__main__":
    main()
