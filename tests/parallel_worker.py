"""Run under torchrun by tests/test_parallel.py (and benchmarks/parallel_decode.py): one process per rank.

`python -m torch.distributed.run --nproc-per-node 2 tests/parallel_worker.py cases SPEC.json OUT_DIR`: loads
each case's model with its --tp/--ep through llmcli's Python API, runs the prompt and greedy decode steps,
and rank 0 writes the logits and tokens (OUT_DIR/NAME.safetensors, OUT_DIR/NAME.json); then runs SPEC's "cli"
commands (arguments and rank 0's stdin), the N-th one's stdout going to OUT_DIR/cli-N.txt (cli-NAME.txt when the
command has a name).
`... parallel_worker.py fault MODEL_DIR raise|hang`: rank 1 raises, or hangs, in its first forward pass, through
the CLI.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmcli.cli import main
from llmcli.loader import load_model


def run_case(case: dict, out: Path) -> None:
    loaded = load_model(case["name"], Path(case["path"]), device="cpu", dtype="float32", tp=case["tp"],
                        ep=case["ep"], check_memory=False)
    runner, ids, steps = loaded.runner, case["ids"], case["steps"]
    cache = runner.make_cache(1, len(ids) + steps + 1)
    with torch.inference_mode():
        logits = [runner(torch.tensor([ids]), cache)[0]]
        tokens = []
        for _ in range(steps):
            tokens.append(runner.shared_token(int(logits[-1][-1].argmax())))
            logits.append(runner(torch.tensor([[tokens[-1]]]), cache)[0])
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    if runner.rank == 0:
        save_file({"logits": torch.cat(logits).contiguous()}, str(out / f"{case['name']}.safetensors"))
        (out / f"{case['name']}.json").write_text(json.dumps({"tokens": tokens, "weight_bytes": weight_bytes}))


def small_bandwidth_probe() -> None:
    """bench measures the machine's memory bandwidth once (a fresh LLMCLI_HOME here): with a small buffer."""
    from llmcli import machine

    measure = machine.measure_bandwidth
    machine.measure_bandwidth = lambda device: measure(device, buffer_bytes=32 << 20, repeats=2)


def cases(spec_file: str, out_dir: str) -> int:
    spec, out = json.loads(Path(spec_file).read_text()), Path(out_dir)
    for case in spec["cases"]:
        run_case(case, out)
    rank = int(os.environ["RANK"])
    small_bandwidth_probe()
    for index, run in enumerate(spec.get("cli", [])):
        sys.stdin = io.StringIO(run["stdin"] if rank == 0 else "")  # a parallel run reads stdin on rank 0 only
        with open(out / f"cli-{run.get('name', index)}.txt" if rank == 0 else os.devnull, "w") as sink, \
                contextlib.redirect_stdout(sink):
            code = main(run["args"])
        if code:
            return code
    return 0


def fault(model_dir: str, how: str) -> int:
    """Rank 1 raises ("raise") or never answers ("hang") at its first forward pass."""
    if os.environ["RANK"] == "1":
        from llmcli.backends.runner import Runner

        def broken(*args, **kwargs):
            if how == "hang":
                time.sleep(3600)
            raise RuntimeError("rank 1 fails on purpose")

        Runner.__call__ = broken
    return main(["generate", model_dir, "--raw", "-p", "hello", "-n", "4", "--device", "cpu", "--tp", "2"])


if __name__ == "__main__":
    sys.exit(cases(*sys.argv[2:]) if sys.argv[1] == "cases" else fault(*sys.argv[2:]))
