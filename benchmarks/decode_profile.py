"""Time and profile eager decode steps of a model (what runs besides the products).

    python benchmarks/decode_profile.py smollm2-135m-instruct [--quantize int4] [--steps 32] [--profile]

Prefills a random 32-token prompt, then greedy-decodes; prints ms per step (median of the timed steps)
and, with --profile, torch.profiler's table of the ops of 10 steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmcli import hub
from llmcli.cli.common import Device, DType, Quantize, run_options
from llmcli.loader import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--quantize", default=None)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    resolved = hub.resolve(args.model, answers=True)
    options = run_options(Device.cpu, DType("auto"), Quantize(args.quantize) if args.quantize else None)
    runner = load_model(resolved.name, resolved.path, options).runner
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, runner.config.vocab_size, (1, 32), generator=gen)
    with torch.inference_mode():
        medians, cpu_medians = [], []
        for _ in range(args.rounds):
            cache = runner.make_cache(1, 32 + args.steps + 16)
            token = runner(prompt, cache, last_only=True)[:, -1].float().argmax(-1, keepdim=True)
            times, cpu_times = [], []
            for _ in range(args.steps):
                start, cpu_start = time.perf_counter(), time.process_time()
                token = runner(token, cache, last_only=True)[:, -1].float().argmax(-1, keepdim=True)
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
            medians.append(statistics.median(times) * 1000)
            cpu_medians.append(statistics.median(cpu_times) * 1000)
        print(f"ms/step per round: {' '.join(f'{m:.1f}' for m in medians)}; median {statistics.median(medians):.1f}"
              f" | CPU ms/step (all threads): {' '.join(f'{m:.1f}' for m in cpu_medians)}")
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    token = runner(token, cache, last_only=True)[:, -1].float().argmax(-1, keepdim=True)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))


if __name__ == "__main__":
    main()
