"""Weights on 2 MiB pages: importing llmcli asks torch to madvise large buffers for transparent huge pages (unless
the user set THP_MEM_ALLOC_ENABLE), and `machine.huge_pages` says whether they get them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llmcli import machine

# A fresh process: import llmcli (then torch), allocate 64 MiB, and report the variable, what machine.huge_pages says
# and how much of the buffer's mapping the kernel put on huge pages.
PROBE = """
import json, os
{before}
import llmcli, torch
from llmcli import machine
buffer = torch.ones(64 << 20, dtype=torch.uint8)
huge_kib = int(machine.mapping_fields(buffer.data_ptr())["AnonHugePages"].split()[0])
print(json.dumps({"env": os.environ.get("THP_MEM_ALLOC_ENABLE"), "huge": machine.huge_pages()[0], "kib": huge_kib}))
"""


def probe(before: str = "", **env) -> dict:
    environment = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | env
    code = PROBE.replace("{before}", before)
    out = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux's")
def test_importing_llmcli_puts_large_buffers_on_huge_pages():
    found = probe()
    assert found["env"] == "1"
    if machine.thp_mode() not in ("madvise", "always"):
        pytest.skip(f"this kernel gives no transparent huge pages (mode: {machine.thp_mode()})")
    assert found["huge"] and found["kib"] >= 32 * 1024  # at least half of the 64 MiB (the aligned interior)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux's")
def test_the_users_setting_wins():
    """THP_MEM_ALLOC_ENABLE=0 stays, and huge_pages then says (from the buffer's mapping) that pages are 4 KiB."""
    found = probe(THP_MEM_ALLOC_ENABLE="0")
    assert found["env"] == "0"
    if machine.thp_mode() != "madvise":
        pytest.skip(f"only the madvise mode leaves the choice to the process (mode: {machine.thp_mode()})")
    assert not found["huge"] and found["kib"] == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux's")
def test_too_late_when_torch_allocated_first():
    """torch reads the variable at its first allocation: a program that allocated before importing llmcli keeps
    4 KiB pages, and huge_pages says so although the variable is 1."""
    found = probe(before="import torch; torch.ones(1)")
    assert found["env"] == "1"
    if machine.thp_mode() != "madvise":
        pytest.skip(f"only the madvise mode leaves the choice to the process (mode: {machine.thp_mode()})")
    assert not found["huge"] and found["kib"] == 0


@pytest.mark.parametrize("mode,asks,env,huge", [
    ("always [madvise] never", True, "0", True), ("always [madvise] never", False, "1", False),
    ("always [madvise] never", None, "1", True), ("always [madvise] never", None, None, False),
    ("[always] madvise never", False, "0", True), ("always madvise [never]", True, "1", False),
    (None, True, "1", False),
])
def test_huge_pages_reports_the_mode_and_what_torch_does(tmp_path, monkeypatch, mode, asks, env, huge):
    """What a buffer's mapping says wins over the variable (torch reads it once); without /proc the variable."""
    mode_file = tmp_path / "enabled"
    if mode is not None:
        mode_file.write_text(mode + "\n")
    if env is None:
        monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    else:
        monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", env)
    found, why = machine.huge_pages(mode_file, asks=lambda: asks)
    assert found is huge
    assert ("2 MiB" in why) is huge and ("4 KiB" in why) is not huge
