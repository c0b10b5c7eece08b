"""Peak resident memory of loading a model and generating with it, against its weights in the run's format.

    python benchmarks/generate_memory.py MODEL[:QUANTIZE] ... [--prompt 128] [--gen 64] [--crossover fixed]

Each MODEL (a checkpoint directory or a GGUF file; QUANTIZE as `--quantize` takes it, `auto` by default) loads in a
fresh process, which then runs a prompt of random token ids and greedy decoding. Memory is counted above that
process once torch and llmcli's CPU kernels are loaded, against the bytes of the loaded weights: the peak while
loading, the peak by the end of generating, and what is resident at the end. `--crossover fixed` (the default)
leaves out the one-off timing of the many-row products that a first load on a CPU runs (`measured` includes it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, torch
from pathlib import Path

from llmcli.backends import cpu_kernels
from llmcli.bench import parameter_bytes
from llmcli.loader import load_model
from llmcli.machine import PeakMemory, resident_bytes

cpu_kernels.load_once()
memory = PeakMemory(torch.device("cpu"))
memory.start()  # the peak (VmHWM) starts again from the current RSS
if memory.method != "rss_hwm":
    sys.exit("needs Linux's /proc/self/clear_refs to reset the peak")
model, quantize, prompt, gen = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
loaded = load_model("m", Path(model), device="cpu", quantize=quantize)
load_peak = memory.stop()[1]
runner = loaded.runner
ids = torch.randint(0, 1000, (1, prompt), generator=torch.Generator().manual_seed(0))
cache = runner.make_cache(1, prompt + gen)
with torch.no_grad():
    logits = runner(ids, cache, last_only=True)
    for _ in range(gen - 1):
        logits = runner(logits[:, -1].argmax(-1, keepdim=True), cache)
print(json.dumps({"weights": parameter_bytes(loaded.model)[0], "load_peak": load_peak, "peak": memory.stop()[1],
                  "resident": resident_bytes() - memory.base}))
"""


def measure(model: str, quantize: str, args) -> dict:
    env = {**os.environ, "LLMCLI_CROSSOVER": args.crossover}
    out = subprocess.run([sys.executable, "-c", CHILD, model, quantize, str(args.prompt), str(args.gen)],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"{model}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else 'failed'}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="MODEL[:QUANTIZE]")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--crossover", default="fixed", choices=("fixed", "cached", "measured", "remeasure"))
    args = parser.parse_args()
    print("| model | quantize | weights | load peak | generate peak | resident after |")
    print("|---|---|---|---|---|---|")
    for spec in args.models:
        model, _, quantize = spec.partition(":")
        r = measure(model, quantize or "auto", args)
        w = r["weights"]
        print(f"| {os.path.basename(model.rstrip('/'))} | {quantize or 'auto'} | {w / 2**20:.0f} MiB | "
              f"{r['load_peak'] / w:.2f}x | {r['peak'] / w:.2f}x | {r['resident'] / w:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
