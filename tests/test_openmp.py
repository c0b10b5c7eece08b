"""OpenMP threads wait passively when the machine is already busy (llmcli.openmp), chosen before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def test_a_load_average_that_lags_is_checked_against_the_cores_now(monkeypatch):
    """The load average still counts a run that just ended (llama-bench before `llmcli bench`): a machine it calls
    full whose cores are idle now keeps spinning waits; one that is busy now gets passive ones."""
    monkeypatch.delitem(sys.modules, "torch")
    cores = os.cpu_count() or 1
    monkeypatch.setattr(openmp, "load_average", lambda: float(cores))
    monkeypatch.setattr(openmp, "sampled_busy_cores", lambda: 0.2)
    assert openmp.choose_wait_policy({}) is None
    monkeypatch.setattr(openmp, "sampled_busy_cores", lambda: float(cores))
    assert openmp.choose_wait_policy({}) == "PASSIVE"
    monkeypatch.setattr(openmp, "sampled_busy_cores", lambda: None)  # no /proc/stat: the average decides
    assert openmp.choose_wait_policy({}) == "PASSIVE"


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="reads /proc/stat")
def test_sampled_busy_cores_see_a_spinning_process():
    spin = "import time\nend = time.time() + 3\nwhile time.time() < end: pass"
    spinner = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.3)  # started and spinning
        busy = openmp.sampled_busy_cores(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and 0.5 <= busy <= (os.cpu_count() or 1) + 0.01, busy


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
