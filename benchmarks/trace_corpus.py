"""`trace --corpus`: its speed against plain prefill, and its memory at 1k vs 10k prompts.

overhead (default): the DeepSeek-V3-shaped random MoE of benchmarks/deepseek_vs_transformers.py (hidden 1024,
8 layers, 64 experts, 6 per token; built once into llmcli's cache) prefills the same corpus of random-id
prompts (lengths 16-128) three ways, best of R interleaved runs:
  batched  the batches `trace --corpus` packs, without a recorder      (plain prefill, batched)
  single   one prompt at a time, without a recorder                    (plain prefill, as `generate` does)
  trace    llmcli.workload.run_workload: the same batches, recorded    (what `trace --corpus` does)
and prints tokens/s and the ratios trace/batched, trace/single (the target: >= 0.75).

memory: runs `trace --corpus` on N short text prompts (demo-deepseek, so the model is small next to what
could grow) in a fresh process for each N and prints its peak RSS: constant memory means equal peaks.

    python benchmarks/trace_corpus.py [--prompts 64] [--repeats 3] [--dtype float32] [--batch-size 16] [--threads 1]
    python benchmarks/trace_corpus.py --memory 1000 10000 [--batch-size 64]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmcli.corpus import CorpusReader, Prompt
from llmcli.loader import load_model
from llmcli.paths import cache_home
from llmcli.workload import batches, prefill_batch, run_workload


def v3_checkpoint() -> Path:
    """The V3-shaped random checkpoint; the real-vocabulary variant when it is already built (same layers)."""
    built = cache_home() / "benchmarks" / "deepseek-v3-shape-random-vocab129280"
    if (built / "config.json").is_file():
        return built
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from deepseek_vs_transformers import checkpoint_dir

    return checkpoint_dir()


def overhead(args) -> None:
    loaded = load_model("deepseek-v3-shape", v3_checkpoint(), device="cpu", dtype=args.dtype)
    runner = loaded.runner
    rng = random.Random(0)
    vocab = loaded.config.vocab_size
    prompts = [Prompt([rng.randrange(vocab) for _ in range(rng.randint(args.min_len, args.max_len))], None, i)
               for i in range(args.prompts)]
    tokens = sum(len(p.ids) for p in prompts)

    def batched():
        with torch.inference_mode():
            for group in batches(prompts, args.batch_size, 4096, max(64, 8 * args.batch_size)):
                prefill_batch(runner, None, group, [-1] * len(group))

    def single():
        with torch.inference_mode():
            for p in prompts:
                runner(torch.tensor([p.ids]), runner.make_cache(1, len(p.ids)), last_only=True)

    def trace():
        run_workload(runner, prompts, CorpusReader(None), batch_size=args.batch_size)

    fns = {"batched": batched, "single": single, "trace": trace}
    for fn in fns.values():
        fn()  # warm-up
    best, cpu = dict.fromkeys(fns, float("inf")), dict.fromkeys(fns, float("inf"))
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
            cpu[name] = min(cpu[name], time.process_time() - c0)
    print(f"DeepSeek-V3 shape (random, {args.dtype}), {args.prompts} prompts, {tokens} tokens, batch size "
          f"{args.batch_size}, {torch.get_num_threads()} threads, best of {args.repeats}, load average "
          f"{os.getloadavg()[0]:.2f}")
    for name, seconds in best.items():
        print(f"  {name:8s} wall {seconds:7.2f} s ({tokens / seconds:7.1f} tok/s)  CPU {cpu[name]:7.2f} s "
              f"({tokens / cpu[name]:7.1f} tok/s per CPU second)")
    for label, times in (("wall", best), ("CPU", cpu)):
        print(f"  {label}: trace speed / batched prefill {times['batched'] / times['trace']:.2f}x, "
              f"/ one-by-one prefill {times['single'] / times['trace']:.2f}x")


def memory(counts: list[int], batch_size: int) -> None:
    words = "the a router expert token layer sends keeps code prose cat dog runs".split()
    rng = random.Random(0)
    for n in counts:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            for _ in range(n):
                f.write(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + "\n")
        code = ("import resource, sys; from llmcli.cli import main; "
                f"code = main(['trace', 'demo-deepseek', '--corpus', {f.name!r}, '--batch-size', '{batch_size}', "
                f"'--json', {f.name + '.json'!r}]); "
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        peak_kib = int(out.stderr.strip().splitlines()[-1])
        print(f"{n:6d} prompts: peak RSS {peak_kib / 1024:.1f} MiB, {time.perf_counter() - t0:.1f} s")
        os.unlink(f.name)
        os.unlink(f.name + ".json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); with 1, "
                                                               "CPU time is the work done, whatever the load")
    parser.add_argument("--memory", type=int, nargs="*", help="peak RSS of trace --corpus for these prompt counts")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory:
        memory(args.memory, args.batch_size)
    else:
        overhead(args)


if __name__ == "__main__":
    main()
