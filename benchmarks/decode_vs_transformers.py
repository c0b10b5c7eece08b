"""llmcli vs transformers on a random checkpoint with the exact Qwen2.5-0.5B shape.

Workload (issue 2): 128 random prompt tokens, 64 greedy new tokens (EOS ignored), batch 1, in
float32 and bfloat16; both backends load the same safetensors files and run the identical ids in
one process, alternating run by run (llmcli.bench does the timing). The checkpoint is built once
with transformers into llmcli's cache ($LLMCLI_HOME or ~/.cache/llmcli) and reused.

    python benchmarks/decode_vs_transformers.py [--repeat 3] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import gc
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

QWEN25_05B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
)


def checkpoint_dir() -> Path:
    """Build the random checkpoint once (bf16 on disk, like the released model)."""
    target = cache_home() / "benchmarks" / "qwen2.5-0.5b-shape-random"
    if (target / "config.json").is_file():
        return target
    import transformers

    print(f"building a random Qwen2.5-0.5B-shaped checkpoint in {target} (once)", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        torch.manual_seed(0)
        config = transformers.Qwen2Config(**QWEN25_05B, dtype="bfloat16")
        model = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(tmp, safe_serialization=True)
        write_tokenizer(tmp, build_demo_tokenizer())  # only loading needs it: bench uses random ids
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def run(dtype: str, path: Path, args, bandwidth: float) -> list[bench.BenchRow]:
    loaded = load_model("qwen2.5-0.5b-shape", path, device="cpu", dtype=dtype, compile=args.compile)
    mine = bench.LlmcliBackend(loaded.runner, loaded.device)
    theirs = bench.TransformersBackend(path, loaded.device, loaded.dtype, loaded.config.family)
    settings = bench.BenchSettings([bench.Workload(args.prompt, args.gen, 1)], repeat=args.repeat,
                                   warmup=args.warmup, seed=0)
    rows = bench.run_bench(mine, settings, bandwidth, theirs,
                           progress=lambda text: print(f"  {dtype}: {text}", file=sys.stderr, flush=True))
    theirs.close()
    del loaded, mine
    gc.collect()
    return rows


def best_decode(row: bench.BenchRow) -> float:
    return max(row.workload.decode_steps / r.decode_s for r in row.runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="llmcli with --compile (the warm-up compiles)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    path = checkpoint_dir()
    device = torch.device("cpu")
    bandwidth, source = machine.machine_bandwidth(device)
    env = bench.environment(device, torch.float32, bandwidth, source)
    import transformers

    mode = "compiled" if args.compile else "eager"
    print(f"Qwen2.5-0.5B shape (random weights), llmcli {mode}, prompt {args.prompt}, {args.gen} new tokens, "
          "greedy, batch 1, "
          f"{args.warmup} warm-up + {args.repeat} runs each")
    print(f"torch {env['torch']} | transformers {transformers.__version__} | {env['device_name']} | "
          f"{env['threads']} threads | memory bandwidth {bandwidth / 1e9:.1f} GB/s ({source}) | "
          f"load average at start {os.getloadavg()[0]:.2f}")
    # "best" = the fastest run: on a shared machine the least disturbed one, so its ratio is the steadier.
    header = (f"{'dtype':9} {'backend':13} {'prefill tok/s':>17} {'decode tok/s':>15} {'best decode':>11} "
              f"{'TTFT ms':>17} {'BW use':>7} {'BW bound tok/s':>15}")
    print(header)
    ratios = []
    started = time.perf_counter()
    for dtype in args.dtypes.split(","):
        rows = run(dtype, path, args, bandwidth)
        for row in rows:
            bound = bandwidth / row.decode_read_bytes_per_step
            p, d, t = row.prefill_tokens_per_s, row.decode_tokens_per_s, row.ttft_s
            print(f"{dtype:9} {row.backend:13} {p.mean:9.1f} ± {p.std:5.1f} {d.mean:7.2f} ± {d.std:5.2f} "
                  f"{best_decode(row):11.2f} {t.mean * 1000:8.1f} ± {t.std * 1000:6.1f} "
                  f"{100 * row.bandwidth_fraction:6.0f}% {bound:15.1f}", flush=True)
        ratios.append((dtype, rows[0].ratio, best_decode(rows[0]) / best_decode(rows[1])))
    print("llmcli / transformers (> 1: llmcli faster):")
    for dtype, ratio, best in ratios:
        print(f"  {dtype:9} prefill {ratio['prefill']:.2f}×   decode {ratio['decode']:.2f}× (mean), {best:.2f}× (best)")
    print(f"load average at end {os.getloadavg()[0]:.2f}; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
