"""The server's decode step on CPU: a batch of rows, each at its own position (continuous batching), as `llmcli serve`
steps them. The cache rows are filled with random values instead of prefills (timing does not depend on them); the
rows sit 37 tokens apart below each context. Prints milliseconds a step (median) and tokens a second over the rows,
for llmcli's ops and, with --plain, for the model's own torch code on the same weights (`fused_decode=False`).

    python benchmarks/batched_decode.py MODEL [--rows 4] [--contexts 128,2048] [--steps 12] [--plain]

MODEL: a model directory or alias, e.g. ~/.cache/llmcli/benchmarks/qwen2.5-0.5b-shape-random (vs_llamacpp.py builds it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmcli.loader import load_model
from llmcli.models.cache import StaticView


def step_times(runner, rows: int, context: int, steps: int) -> float:
    """Median seconds of a static step of `rows` rows at positions context, context - 37, ..."""
    runner.model.derived_tensors()  # as the server's engine does before its first step
    cache = runner.make_cache(rows, context + 1)
    positions = torch.tensor([[max(0, context - 37 * row)] for row in range(rows)])
    view = StaticView(cache, int(positions.max()) + 1, rows=rows)
    ids = torch.full((rows, 1), 5)
    times = []
    with torch.inference_mode():
        for tensor in cache.tensors():
            tensor.normal_(0, 0.1)
        for _ in range(steps + 2):
            start = time.perf_counter()
            runner.model(ids, positions, view)
            times.append(time.perf_counter() - start)
    return statistics.median(times[2:])  # the first two warm up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--contexts", default="128,2048")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--plain", action="store_true", help="also the model's own torch code")
    args = parser.parse_args()
    paths = {"llmcli ops": True, **({"torch code": False} if args.plain else {})}
    runners = {name: load_model("model", args.model, device="cpu", dtype=args.dtype, fused_decode=fused).runner
               for name, fused in paths.items()}
    print(f"{torch.get_num_threads()} threads; {args.rows} rows; {args.dtype}\n")
    print("| path | context | ms a step | tok/s |\n|---|---|---|---|")
    for context in (int(c) for c in args.contexts.split(",")):
        for name, runner in runners.items():
            seconds = step_times(runner, args.rows, context, args.steps)
            print(f"| {name} | {context} | {seconds * 1e3:.1f} | {args.rows / seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
