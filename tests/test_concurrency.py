"""Several llmcli processes starting at once on an empty cache: the CPU kernels and the demo models are
built once (or harmlessly twice) and every process ends with a working copy. (Two downloads of the same
model at once, against the loopback hub, are in test_hub.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmcli.backends import cpu_kernels
from llmcli.demo import ensure_demo

ROOT = Path(__file__).resolve().parent.parent
LOAD_KERNELS = ("import torch\nfrom llmcli.backends import cpu_kernels\nloaded, note = cpu_kernels.load_once()\n"
                "print(note if loaded else 'unavailable: ' + note)\nprint(torch.ops.llmcli.built_with_avx512_bf16())")
# Counts what torch's builder runs: one line per compiler call. The added -O0 (the last -O wins) spares the
# optimiser's time: these tests are about who builds, not about the code built.
COUNTING_CXX = '#!/bin/sh\necho "$*" >> "$(dirname "$0")/calls"\nexec c++ "$@" -O0\n'


def python(code: str, home: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "LLMCLI_HOME": str(home), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code], env={**env, **popen.pop("env", {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def kill_session(session: int) -> None:
    """SIGKILL every process of `session`: ninja starts each compiler in a process group of its own, which a kill of
    the build's group misses (they ran on for half a minute beside the next build)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, session, ...
            if int(fields[3]) == session:
                os.kill(int(stat.parent.name), signal.SIGKILL)
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue


@pytest.mark.slow
def test_a_killed_build_then_two_processes_at_once_build_the_kernels_once(tmp_path):
    """A first build is killed mid-way (kill -9 of its processes, as the OOM killer or a closed terminal
    would); then two processes start together. Before: the killed build's lock file made every later
    process wait for it forever. Now: one builds (once: a compiler call per source, one link), the other
    waits and loads."""
    home = tmp_path / "home"
    cxx = tmp_path / "bin" / "c++"
    cxx.parent.mkdir()
    cxx.write_text(COUNTING_CXX)
    cxx.chmod(0o755)
    env = {"CXX": str(cxx)}
    killed = python(LOAD_KERNELS, home, env=env, start_new_session=True)
    deadline = time.time() + 300
    while not list((home / "extensions").glob("llmcli_*.build-*/build.ninja")):
        if killed.poll() is not None:  # done before the build began: no ninja, no compiler
            out, err = killed.communicate()
            assert killed.returncode == 0 and out.startswith("unavailable"), err
            pytest.skip(out.strip())
        assert time.time() < deadline, "the build did not start"
        time.sleep(0.1)
    time.sleep(1)  # the compiler is running
    os.killpg(killed.pid, signal.SIGKILL)
    kill_session(killed.pid)
    killed.communicate()
    calls = cxx.parent / "calls"
    calls_before = calls.read_text().splitlines() if calls.exists() else []

    processes = [python(LOAD_KERNELS, home, env=env) for _ in range(2)]
    results = [(*p.communicate(timeout=600), p.returncode) for p in processes]
    for out, err, code in results:
        assert code == 0, err
        if out.startswith("unavailable"):
            pytest.skip(out.strip())
    notes = sorted(out.splitlines()[0] for out, _, _ in results)
    assert notes[0].startswith("built llmcli's CPU kernels"), notes
    assert not notes[1].startswith("built"), notes  # "waited ... for another llmcli process"
    builds = calls.read_text().splitlines()[len(calls_before):]
    compiles = len(cpu_kernels.SOURCES)  # one per source file, then one link
    assert sum(" -c " in line for line in builds) == compiles and sum("-shared" in line for line in builds) == 1, builds
    # the killed build's scratch folder is gone; the library is in place, whole
    folders = sorted(p.name for p in (home / "extensions").iterdir() if p.is_dir())
    assert len(folders) == 1 and (home / "extensions" / folders[0] / f"{folders[0]}.so").is_file(), folders

    # a later process loads it without building or waiting
    again = python(LOAD_KERNELS, home, env=env)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0 and out.splitlines()[0] == "", (out, err)
    assert len(calls.read_text().splitlines()) == len(calls_before) + len(builds)


def test_two_processes_build_the_same_demo_model_at_once(tmp_path):
    """Each builds into a folder of its own and renames it into place; the loser of the rename keeps the
    winner's. Both end with the whole model, the same bytes as a build made alone."""
    home = tmp_path / "home"
    code = "from llmcli.demo import ensure_demo\nprint(ensure_demo('demo-qwen'))"
    processes = [python(code, home) for _ in range(2)]
    results = [(*p.communicate(timeout=300), p.returncode) for p in processes]
    for _, err, code in results:
        assert code == 0, err
    paths = {Path(out.strip()) for out, _, _ in results}
    assert len(paths) == 1
    path = paths.pop()
    alone = ensure_demo("demo-qwen")  # the session's, built by one process
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in alone.iterdir())
    for file in alone.iterdir():
        assert (path / file.name).read_bytes() == file.read_bytes(), file.name
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no scratch folders left
