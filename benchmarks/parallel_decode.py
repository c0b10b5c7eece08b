"""Decode speed and per-rank memory of tensor/expert-parallel runs on CPU (gloo), against one process.

    python benchmarks/parallel_decode.py [--model qwen|deepseek] [--steps 32] [--layouts 1x1,2x1,...]

Builds (once, in llmcli's cache) a random bfloat16 checkpoint with the Qwen2.5-0.5B shape, or the
DeepSeek-V3-shaped MoE of benchmarks/deepseek_vs_transformers.py, then runs, each in fresh processes:
one process with 1 and with 2 threads, and torchrun launches of 2 ranks (1 thread each) for each layout
(TPxEP). Reports prompt and decode tok/s, the seconds per step spent in collectives on rank 0 (all-reduce,
all-gather, broadcast, timed around each call: on CPU they also absorb the wait for the slower rank), how many
collectives a step makes and what one all-reduce of a token's hidden state costs back to back, and each
rank's parameter bytes and resident anonymous memory after loading (RssAnon: the weights, not the file pages).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CHILD = r"""
import json, os, sys, time
from pathlib import Path
import torch
import torch.distributed as dist
from llmcli.bench import parameter_bytes
from llmcli.loader import load_model

path, tp, ep, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
spent, calls = [0.0], [0]
def timed(fn):
    def wrapper(*args, **kwargs):
        calls[0] += 1
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start
    return wrapper
for name in ("all_reduce", "all_gather", "broadcast"):
    setattr(dist, name, timed(getattr(dist, name)))

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

loaded = load_model("bench", path, device="cpu", dtype="bfloat16", tp=tp, ep=ep, check_memory=False)
runner = loaded.runner
weights = parameter_bytes(loaded.model)[0]
memory = {"weights": weights, "rss_anon": status("RssAnon"), "peak_rss": status("VmHWM")}
ids = torch.randint(100, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
times = []
with torch.inference_mode():
    for repeat in range(2):
        cache = runner.make_cache(1, ids.shape[1] + steps + 1)
        start = time.perf_counter()
        logits = runner(ids, cache, last_only=True)
        prompt = time.perf_counter() - start
        spent[0], calls[0] = 0.0, 0
        start = time.perf_counter()
        for _ in range(steps):
            token = runner.shared_token(int(logits[0, -1].argmax()))
            logits = runner(torch.tensor([[token]]), cache)
        times.append((prompt, time.perf_counter() - start, spent[0], calls[0] / steps))
prompt, decode, comm, per_step = min(times, key=lambda t: t[1])  # the second run: warm
memories, alone = [memory], None
if dist.is_initialized():  # one decode step's all-reduce on its own, back to back: the transfer without waiting
    x = torch.zeros(1, 1, loaded.config.hidden_size, dtype=torch.bfloat16)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(200):
        dist.all_reduce(x)
    alone = (time.perf_counter() - start) / 200 * 1e6
    memories = [None] * dist.get_world_size()
    dist.all_gather_object(memories, memory)
if not dist.is_initialized() or dist.get_rank() == 0:
    print(json.dumps({"prompt_tok_s": ids.shape[1] / prompt, "decode_tok_s": steps / decode,
                      "comm_ms_per_step": 1000 * comm / steps, "step_ms": 1000 * decode / steps,
                      "collectives_per_step": per_step, "all_reduce_alone_us": alone,
                      "memory": memories}))
"""


def qwen_checkpoint() -> Path:
    from load_memory import build_checkpoint

    from llmcli.paths import cache_home

    target = cache_home() / "benchmarks" / "qwen2.5-0.5b-shape-bf16"
    if not (target / "config.json").is_file():
        target.mkdir(parents=True, exist_ok=True)
        build_checkpoint(target, 24, "bfloat16")
    return target


def run(script: Path, path: Path, layout: tuple[int, int], threads: int, steps: int) -> dict:
    tp, ep = layout
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    args = [str(script), str(path), str(tp), str(ep), str(steps)]
    if tp * ep == 1:
        command = [sys.executable, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(max(tp, ep)), *args]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("qwen", "deepseek"), default="qwen")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--layouts", default=None, help="comma list of TPxEP for 2 ranks (default by model)")
    parser.add_argument("--no-single", action="store_true", help="skip the single-process runs")
    args = parser.parse_args()
    if args.model == "qwen":
        path, layouts = qwen_checkpoint(), args.layouts or "2x1"
    else:
        from deepseek_vs_transformers import checkpoint_dir

        path, layouts = checkpoint_dir(), args.layouts or "2x1,1x2,2x2"
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "child.py"
        script.write_text(CHILD)
        rows = [] if args.no_single else [("1 process, 1 thread", run(script, path, (1, 1), 1, args.steps)),
                                          ("1 process, 2 threads", run(script, path, (1, 1), 2, args.steps))]
        for text in layouts.split(","):
            tp, ep = (int(n) for n in text.split("x"))
            rows.append((f"2 ranks --tp {tp} --ep {ep}, 1 thread each", run(script, path, (tp, ep), 1, args.steps)))
    print(f"{args.model} ({path.name}), bfloat16, prompt 64, {args.steps} decode steps")
    for label, r in rows:
        mem = ", ".join(f"{m['weights'] / 2**20:.0f}/{m['rss_anon'] / 2**20:.0f}" for m in r["memory"])
        print(f"{label:38s} prompt {r['prompt_tok_s']:7.1f} tok/s  decode {r['decode_tok_s']:6.2f} tok/s "
              f"({r['step_ms']:6.1f} ms/step, {r['comm_ms_per_step']:5.1f} in collectives)  "
              f"weights/RssAnon MiB per rank: {mem}")
        if r["all_reduce_alone_us"]:
            print(f"{'':38s} {r['collectives_per_step']:.0f} collectives a step; one all-reduce of a token's hidden "
                  f"state, back to back: {r['all_reduce_alone_us']:.0f} us")


if __name__ == "__main__":
    main()
