"""Decode speed with and without the integer kernels (activations quantised to int8, backends/int_dot.py), on
the same checkpoint in one process: bf16, int8 and int4, each quantised path with LLMCLI_INT_DOT on and off.
The models are loaded side by side and timed in turns, round by round (a shared machine's load then hits
every path alike); best round per path, and each path's ratio to bf16 within each round.

    python benchmarks/int_dot_decode.py [MODEL_DIR] [--rounds 3] [--tokens 16]

Default: the random Qwen2.5-0.5B-shaped checkpoint of benchmarks/decode_vs_transformers.py.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from llmcli.loader import load_model
from llmcli.paths import cache_home

RUNS = {"bf16": (None, True), "int8 float activations": ("int8", False), "int8 x int8": ("int8", True),
        "int4 float activations": ("int4", False), "int4 x int8": ("int4", True)}


def decode_seconds(runner, tokens: int) -> float:
    """Seconds per token for `tokens` one-token steps after a 32-token prompt."""
    cache = runner.make_cache(1, 32 + tokens + 1)
    with torch.inference_mode():
        runner(torch.arange(32)[None], cache, last_only=True)
        token = torch.tensor([[7]])
        runner(token, cache)
        start = time.perf_counter()
        for _ in range(tokens):
            runner(token, cache)
    return (time.perf_counter() - start) / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path,
                        default=cache_home() / "benchmarks" / "qwen2.5-0.5b-shape-random")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    runners = {name: load_model(name, args.model, device="cpu", dtype="bfloat16", quantize=quantize,
                                int_dot=integer).runner for name, (quantize, integer) in RUNS.items()}
    rounds = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            rounds[name].append(decode_seconds(runner, args.tokens))
    print(f"{args.model.name}, {torch.get_num_threads()} threads, {args.rounds} rounds of {args.tokens} tokens: best "
          f"round, its ratio to bf16's best, and the median and range of the ratios within each round")
    # Each path's best round may come from another minute than bf16's; within a round the paths run a few seconds
    # apart, so the per-round ratios hold better on a machine whose speed drifts.
    for name, seconds in rounds.items():
        ratios = sorted(b / s for b, s in zip(rounds["bf16"], seconds, strict=True))
        print(f"{name:24s} {1 / min(seconds):6.1f} tok/s  ({min(rounds['bf16']) / min(seconds):.2f}x bf16's best; "
              f"per round {statistics.median(ratios):.2f}x, {ratios[0]:.2f}-{ratios[-1]:.2f})")


if __name__ == "__main__":
    main()
