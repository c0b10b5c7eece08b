"""llmcli vs transformers on a random Qwen3-30B-A3B-shaped MoE checkpoint (fewer layers), bf16.

Workload: Qwen3-30B-A3B's layer at full width (hidden 2048, 32 heads / 4 kv heads of 128, q/k norms,
128 routed experts of 768, 8 per token, renormalised) but `--layers` layers (default 2) and a 32,000-token
vocabulary, so that both backends fit in memory side by side; 128 random prompt tokens, 32 greedy new tokens
(EOS ignored), batch 1. Both load the same safetensors files (one tensor per expert, as the hub ships them)
and run the same ids in one process, alternating (llmcli.bench does the timing); transformers runs as built
(its default attention and `grouped_mm` experts). The checkpoint is built once into llmcli's cache.

    python benchmarks/qwen_moe_vs_transformers.py [--layers 2] [--repeat 2] [--dtype bfloat16] [--compile]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmcli import bench, machine
from llmcli.demo import build_demo_tokenizer, write_tokenizer
from llmcli.loader import load_model
from llmcli.paths import cache_home

QWEN3_30B_A3B_LAYER = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=6144, num_attention_heads=32, num_key_value_heads=4,
    head_dim=128, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
    max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
)


def checkpoint_dir(layers: int, vocab_size: int | None = None) -> Path:
    """Build the random checkpoint once (bf16 on disk, like the released model); `vocab_size`: a variant with
    that vocabulary (Qwen3's real one, 151936, for llama.cpp's converter and the real tokenizer)."""
    suffix = f"-vocab{vocab_size}" if vocab_size else ""
    target = cache_home() / "benchmarks" / f"qwen3-30b-a3b-shape-{layers}-layers-random{suffix}"
    if (target / "config.json").is_file():
        return target
    import transformers

    print(f"building a random Qwen3-30B-A3B-shaped checkpoint in {target} (once)", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        torch.manual_seed(0)
        shape = {**QWEN3_30B_A3B_LAYER, **({"vocab_size": vocab_size} if vocab_size else {})}
        config = transformers.Qwen3MoeConfig(**shape, num_hidden_layers=layers, dtype="bfloat16")
        with torch.device("meta"):
            model = transformers.Qwen3MoeForCausalLM(config)
        model = model.to_empty(device="cpu").to(torch.bfloat16)
        with torch.no_grad():  # random weights of a trained model's scale, drawn in bf16 (init is slow on CPU)
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.fill_(1.0)
                else:
                    param.normal_(0, 0.02)
        model.save_pretrained(tmp, safe_serialization=True)
        write_tokenizer(tmp, build_demo_tokenizer())  # only loading needs it: bench uses random ids
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--gen", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantize", default=None, help="llmcli only: int8")
    parser.add_argument("--compile", action="store_true", help="llmcli with --compile (the warm-up compiles)")
    args = parser.parse_args()

    path = checkpoint_dir(args.layers)
    device = torch.device("cpu")
    bandwidth, source = machine.machine_bandwidth(device)
    env = bench.environment(device, torch.float32, bandwidth, source)
    import transformers

    mode = ("compiled" if args.compile else "eager") + (f", {args.quantize}" if args.quantize else "")
    print(f"Qwen3-30B-A3B layer shape x {args.layers} layers (random weights, {args.dtype}), llmcli {mode}, "
          f"prompt {args.prompt}, {args.gen} new tokens, greedy, batch 1, {args.warmup} warm-up + "
          f"{args.repeat} runs each")
    print(f"torch {env['torch']} | transformers {transformers.__version__} | {env['device_name']} | "
          f"{env['threads']} threads | memory bandwidth {bandwidth / 1e9:.1f} GB/s ({source}) | "
          f"load average at start {os.getloadavg()[0]:.2f}")
    started = time.perf_counter()
    loaded = load_model("qwen3-moe-shape", path, device="cpu", dtype=args.dtype, compile=args.compile,
                        quantize=args.quantize)
    mine = bench.LlmcliBackend(loaded.runner, loaded.device)
    theirs = bench.TransformersBackend(path, loaded.device, loaded.dtype, loaded.config.family)
    settings = bench.BenchSettings([bench.Workload(args.prompt, args.gen, 1)], repeat=args.repeat,
                                   warmup=args.warmup, seed=0)
    rows = bench.run_bench(mine, settings, bandwidth, theirs,
                           progress=lambda text: print(f"  {text}", file=sys.stderr, flush=True))
    print(f"{'backend':13} {'prefill tok/s':>17} {'decode tok/s':>15} {'TTFT ms':>15} {'BW use':>7}")
    for row in rows:
        p, d, t = row.prefill_tokens_per_s, row.decode_tokens_per_s, row.ttft_s
        print(f"{row.backend:13} {p.mean:9.1f} ± {p.std:5.1f} {d.mean:7.2f} ± {d.std:5.2f} "
              f"{t.mean * 1000:7.1f} ± {t.std * 1000:5.1f} {100 * row.bandwidth_fraction:6.0f}%")
    same = rows[0].runs[0].token_ids == rows[1].runs[0].token_ids
    ratio = rows[0].ratio
    print(f"llmcli / transformers (> 1: llmcli faster): prefill {ratio['prefill']:.2f}x   "
          f"decode {ratio['decode']:.2f}x   | same greedy tokens: {same}")
    print(f"load average at end {os.getloadavg()[0]:.2f}; total {time.perf_counter() - started:.0f} s")
    theirs.close()


if __name__ == "__main__":
    main()
