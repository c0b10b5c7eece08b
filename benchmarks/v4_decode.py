"""DeepSeek-V4 decode: how a step's time grows with the context (sliding window + compressed entries).

    python benchmarks/v4_decode.py [--contexts 1024,8192,32768,131072] [--steps 5] [--threads 1]

A V4-Flash-shaped attention (hidden 4096, 64 heads sharing one K=V head of 512, q_lora 1024, grouped output
8 x 1024, window 128; CSA every 4 tokens with an indexer of 64 heads x 128 keeping 512 entries; HCA every
128) in three layers, one of each kind, with 4 residual streams and small MoE layers (4 experts of 256:
their cost does not depend on the context). Random weights, float32. Each layer's cache is filled with random
entries as a prompt of that length would leave them (127 window keys, context/4 CSA and indexer entries,
context/128 HCA entries), then `--steps` tokens are decoded, cropping back after each; the median step is
reported, and beside it the attention core of one query in the CSA layer (indexer scan, top-512, attention
over window + picks) against a plain MQA layer of the same shape attending to every cached token.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from llmcli.config import config_from_dict
from llmcli.models.compressed_attention import sink_attention
from llmcli.models.deepseek_v4 import DeepseekV4ForCausalLM

LAYERS = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]


def v4_shaped() -> dict:
    return {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 1024,
        "hidden_size": 4096, "moe_intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 64,
        "num_key_value_heads": 1, "head_dim": 512, "q_lora_rank": 1024, "qk_rope_head_dim": 64,
        "num_experts_per_tok": 2, "n_routed_experts": 4, "layer_types": LAYERS,
        "mlp_layer_types": ["hash_moe", "moe", "moe"], "sliding_window": 128, "o_groups": 8, "o_lora_rank": 1024,
        "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "hc_mult": 4, "hc_sinkhorn_iters": 20,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536},
        "max_position_embeddings": 1048576, "torch_dtype": "float32",
    }


def filled(model, context: int, generator: torch.Generator):
    """A cache as a prompt of `context` tokens (a multiple of 128) leaves it, with random values."""
    cache = model.make_cache(1, context + 64)
    cfg, s = model.config, model.settings
    for index, layer in enumerate(cache.layers):
        layer.keys = torch.randn(1, s.sliding_window - 1, cfg.head_dim, generator=generator)
        for name, state in layer.states.items():
            rate = s.rate(index)
            dim = s.index_head_dim if name == "index" else cfg.head_dim
            state.entries = torch.randn(1, context // rate, dim, generator=generator)
            state.count = context // rate
            if rate == s.csa_rate:
                state.overlap_kv = torch.randn(1, rate, dim, generator=generator)
                state.overlap_gate = torch.randn(1, rate, dim, generator=generator)
    cache.length = context
    return cache


def step_ms(model, cache, steps: int) -> float:
    times = []
    for _ in range(steps + 1):  # the first step warms up
        trial = copy.copy(cache)
        trial.layers = [copy.deepcopy(layer) for layer in cache.layers]
        start = time.perf_counter()
        model(torch.tensor([[7]]), trial.span(1).positions, trial)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def core_ms(model, cache, context: int, steps: int, generator: torch.Generator) -> tuple[float, float]:
    """(CSA layer's attention core for one query, a full-context MQA core of the same shape), in ms."""
    attn, layer = model.model.layers[1].self_attn, cache.layers[1]
    indexer = attn.compressor.indexer
    q = torch.randn(1, 1, attn.heads, attn.head_dim, generator=generator)
    q_index = torch.randn(1, indexer.heads, indexer.dim, generator=generator)
    weights = torch.randn(1, indexer.heads, 1, generator=generator)
    window, entries, keys = layer.keys, layer.states["kv"].entries, layer.states["index"].entries
    everything = torch.randn(1, context, attn.head_dim, generator=generator)

    def csa() -> None:
        scores = (torch.matmul(q_index, keys.transpose(-1, -2)).relu() * weights).sum(1)  # [1, W]
        picks = entries[:, scores.topk(min(indexer.topk, scores.shape[-1]), dim=-1).indices[0]]
        both = torch.cat([window, picks], dim=1)
        sink_attention(q, both, torch.ones(1, 1, both.shape[1], dtype=torch.bool), attn.sinks, 0.04)

    def full() -> None:
        sink_attention(q, everything, torch.ones(1, 1, context, dtype=torch.bool), attn.sinks, 0.04)

    out = []
    for run in (csa, full):
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        out.append(statistics.median(times[1:]) * 1e3)
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="1024,8192,32768,131072", help="cached tokens (multiples of 128)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(config_from_dict(v4_shaped())).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
        for layer in model.model.layers:
            if layer.mlp.gate.hashed:
                layer.mlp.gate.tid2eid.random_(0, 4)
    generator = torch.Generator().manual_seed(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, 3 V4-Flash-shaped layers (sliding, CSA, "
          f"HCA), float32; median of {args.steps} decode steps (ms)")
    print(f"{'context':>8} {'step':>9} {'CSA core':>9} {'full MQA':>9}")
    with torch.inference_mode():
        for context in (int(c) for c in args.contexts.split(",")):
            cache = filled(model, context, generator)
            step = step_ms(model, cache, args.steps)
            csa, full = core_ms(model, cache, context, 3 * args.steps, generator)
            print(f"{context:>8} {step:>9.2f} {csa:>9.2f} {full:>9.2f}", flush=True)
            del cache


if __name__ == "__main__":
    main()
