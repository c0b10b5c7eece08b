"""generate under 1, 2 and 4 ranks (torchrun, gloo on CPU), tensor and expert parallel, for float32 Qwen2 and
DeepSeek-V3 checkpoints built with transformers as tests/test_parallel.py builds them: are the greedy tokens
those of one process, how fast does it decode, and where does the time go.

    python benchmarks/parallel_ranks.py [--steps 32] [--wide] [--ranks 1,2,4]

Each layout is one launch (torchrun, or a plain process for 1 rank) that runs, in process, `llmcli generate
--json` (its greedy token ids must equal the single process's) and `llmcli bench --json` (decode tok/s, and
bench's communication figures: rank 0's seconds per decode step inside all-reduce/all-gather, waiting for the
other ranks included; the rest of a step is compute and Python). One thread per rank. The default shapes are
the tests' tiny ones (every step is latency: a few microseconds of arithmetic per layer); --wide uses hidden
512 models, where the products start to count. On a machine with fewer cores than ranks, the ranks share
cores: 4 ranks on 2 cores oversubscribe them, and every collective then waits for a rank that is not running.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "Ranks that agree decode the same tokens."

# Divisible by 4 ranks: heads, kv heads (Qwen: 2, replicated on 4 ranks), MLP widths, experts, vocabulary.
WIDE_QWEN = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, max_position_embeddings=1024, bos_token_id=None, eos_token_id=None)
WIDE_DEEPSEEK = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
                     num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=128,
                     q_lora_rank=192, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16,
                     num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
                     routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=1024,
                     bos_token_id=None, eos_token_id=None)

CHILD = r"""
import contextlib, json, os, sys
from pathlib import Path
from llmcli.cli import main

out, commands = Path(sys.argv[1]), json.loads(sys.argv[2])
rank = int(os.environ.get("RANK", "0"))
for name, command in commands.items():  # rank 0's stdout (the JSON) to a file, the others' nowhere
    with open(out / f"{name}.json" if rank == 0 else os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        code = main(command)
    if code:
        sys.exit(code)
"""


def checkpoints(root: Path, wide: bool) -> dict[str, Path]:
    from tests.test_parallel import DEEPSEEK, QWEN, hf_checkpoint

    with contextlib.redirect_stderr(io.StringIO()):  # transformers' progress bars
        if wide:
            return {"qwen2": hf_checkpoint("Qwen2", root / "qwen2", **WIDE_QWEN),
                    "deepseek-v3": hf_checkpoint("DeepseekV3", root / "v3", **WIDE_DEEPSEEK)}
        return {"qwen2": hf_checkpoint("Qwen2", root / "qwen2", **QWEN, num_key_value_heads=2),
                "deepseek-v3": hf_checkpoint("DeepseekV3", root / "v3", **DEEPSEEK, q_lora_rank=24, n_group=4,
                                             topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)}


def launch(child: Path, out: Path, model: Path, tp: int, ep: int, steps: int, home: Path) -> tuple[dict, dict]:
    out.mkdir(parents=True, exist_ok=True)
    common = ["--device", "cpu", "--dtype", "float32"]
    ranks = ["--tp", str(tp), "--ep", str(ep)] if tp * ep > 1 else []
    generate = [str(model), "--raw", "-p", PROMPT, "-n", str(steps), "--json", *common, *ranks]
    bench = [str(model), "-p", "64", "-n", str(steps), "-r", "3", "--json", "-", *common, *ranks]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "LLMCLI_HOME": str(home)}
    world = max(tp, ep)
    prefix = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc-per-node", str(world)]
    script = [str(child), str(out), json.dumps({"generate": ["generate", *generate], "bench": ["bench", *bench]})]
    done = subprocess.run([*prefix, *script], capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{model.name} --tp {tp} --ep {ep} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "generate.json").read_text()), json.loads((out / "bench.json").read_text())


def layouts(model: str, ranks: list[int]) -> list[tuple[int, int]]:
    out = [(1, 1)] if 1 in ranks else []
    for n in (r for r in ranks if r > 1):
        out.append((n, 1))
        if model == "deepseek-v3":
            out.append((1, n))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=32, help="tokens generated (and decoded by bench)")
    parser.add_argument("--wide", action="store_true", help="hidden 512 models instead of the tests' tiny ones")
    parser.add_argument("--ranks", default="1,2,4", help="rank counts, comma-separated (1 = one process)")
    args = parser.parse_args()
    ranks = [int(n) for n in args.ranks.split(",")]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        child = tmp / "child.py"
        child.write_text(CHILD)
        print(f"{'wide' if args.wide else 'tiny'} float32 checkpoints, prompt {PROMPT!r}, {args.steps} greedy tokens; "
              f"{cores} cores, 1 thread per rank" + (" (more ranks than cores: oversubscribed)"
                                                     if max(ranks) > (cores or 1) else ""))
        print(f"{'model':12s} {'layout':14s} {'tokens':9s} {'decode tok/s':>13s} {'ms/step':>8s} "
              f"{'comm ms/step':>13s} {'comm share':>10s} {'comm ms/prompt':>15s}  peak mem per rank")
        for name, path in checkpoints(tmp / "models", args.wide).items():
            reference = None
            for tp, ep in layouts(name, ranks):
                generated, bench = launch(child, tmp / f"{name}-{tp}x{ep}", path, tp, ep, args.steps, tmp / "home")
                reference = reference or generated["token_ids"]  # the single process's (the first layout)
                same = "identical" if generated["token_ids"] == reference else "DIFFER"
                row = bench["results"][0]
                speed = row["decode_tokens_per_s"]["mean"]
                comm = row.get("communication") or {}
                step = comm.get("comm_s_per_decode_step") or {}
                prefill = comm.get("comm_s_per_prefill") or {}
                peaks = comm.get("peak_memory_bytes_per_rank") or [row["peak_memory_bytes"]]
                layout = "1 process" if tp * ep == 1 else f"{max(tp, ep)} ranks " + (f"tp{tp}" if tp > 1 else f"ep{ep}")
                figures = (f"{1000 * step['mean']:13.2f} {100 * comm['comm_fraction_of_decode']:9.0f}% "
                           f"{1000 * prefill['mean']:15.2f}") if comm else f"{'-':>13s} {'-':>10s} {'-':>15s}"
                print(f"{name:12s} {layout:14s} {same:9s} {speed:13.1f} {1000 / speed:8.2f} {figures}  "
                      + ", ".join(f"{p / 2**20:.0f}" for p in peaks) + " MiB")

if __name__ == "__main__":
    main()
