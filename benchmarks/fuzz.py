"""The long fuzz run: every target of tests/test_fuzz.py with many random examples, reporting per target how
many examples ran, how long it took, and the failure Hypothesis found (shrunk), if any.

    python benchmarks/fuzz.py [--examples 1000] [--target NAME ...] [--seed N]

Runs in a scratch $LLMCLI_HOME and an offline, empty Hugging Face cache, like the tests. A target stops at
its first failure (after shrinking); the others still run. Exit status 1 when any target failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000, help="Examples per target (default 1000).")
    parser.add_argument("--target", action="append", default=[], help="Only this target (repeatable).")
    parser.add_argument("--seed", type=int, default=None, help="Seed, to repeat a run.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmcli-fuzz-") as scratch:
        return run(parser, args, Path(scratch))


def run(parser: argparse.ArgumentParser, args: argparse.Namespace, scratch: Path) -> int:
    os.environ.update({"LLMCLI_HOME": str(scratch / "home"), "HF_HOME": str(scratch / "hf"), "HF_HUB_OFFLINE": "1"})
    sys.path.insert(0, str(ROOT))
    from tests.test_fuzz import TARGETS, Workspace, run_target  # after the environment is set

    targets = [t for t in TARGETS if not args.target or t.name in args.target]
    if not targets:
        parser.error(f"no such target; choose from {', '.join(t.name for t in TARGETS)}")
    workspace = Workspace(scratch / "work")
    rows, failed = [], 0
    for target in targets:
        counted = {"tried": 0}
        start = time.perf_counter()
        try:
            counted["tried"] = run_target(target, workspace, "llmcli-fuzz", args.examples, args.seed, counted)
            outcome = "ok"
        except Exception as exc:  # Hypothesis raises the shrunk failure (or a group of distinct ones)
            failed += 1
            outcome = f"FAILED: {type(exc).__name__}"
            print(f"--- {target.name} ---", file=sys.stderr)
            traceback.print_exception(exc, file=sys.stderr)
        ends = ", ".join(f"{key} {n}" for key, n in sorted(counted.get("outcomes", {}).items()))
        rows.append((target.name, counted["tried"], time.perf_counter() - start, outcome, ends))
        print(f"{target.name}: {counted['tried']} examples, {rows[-1][2]:.0f} s, {outcome} ({ends})", flush=True)
    print(f"\n{'target':<24} {'examples':>9} {'seconds':>8}  {'outcome':<8} how the examples ended")
    for name, tried, seconds, outcome, ends in rows:
        print(f"{name:<24} {tried:>9} {seconds:>8.0f}  {outcome:<8} {ends}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
