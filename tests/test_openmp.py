"""OpenMP threads wait passively when the machine is already busy (llmcli.openmp), chosen before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from llmcli import openmp

ROOT = Path(__file__).resolve().parent.parent


def test_busy_machine_gets_passive_waits(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch")  # as in a fresh `llmcli` process, before a command loads it
    cores = os.cpu_count() or 1
    monkeypatch.setattr(openmp, "busy_cores", lambda: float(cores))
    environ = {}
    assert openmp.choose_wait_policy(environ) == "PASSIVE" and environ == {"OMP_WAIT_POLICY": "PASSIVE"}
    monkeypatch.setattr(openmp, "busy_cores", lambda: cores - 0.6)
    assert openmp.choose_wait_policy({}) is None  # a core left: spinning saves the wake-ups between regions
    monkeypatch.setattr(openmp, "busy_cores", lambda: float(cores))
    chosen = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert openmp.choose_wait_policy(chosen) is None and chosen == {"OMP_WAIT_POLICY": "ACTIVE"}  # the user's


def test_too_late_once_torch_is_loaded(monkeypatch):
    import torch  # noqa: F401  (loaded: its OpenMP runtime has read the environment already)

    monkeypatch.setattr(openmp, "busy_cores", lambda: 1e6)
    assert openmp.choose_wait_policy({}) is None


def test_the_cli_chooses_before_torch_loads():
    """In a real `llmcli` process the policy is in the environment by the time torch is imported."""
    code = ("import os, sys\nfrom llmcli import openmp\nopenmp.busy_cores = lambda: 1e6\nfrom llmcli.cli import main\n"
            "assert 'torch' not in sys.modules\nmain(['--version'])\nprint(os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "PASSIVE"
