"""How torch's OpenMP threads wait between parallel regions, chosen before torch is imported.

By default they spin for a while before sleeping: on an idle machine that saves the wake-up between the
hundreds of small regions of a decode step. When other work already keeps the cores busy, a spinning thread
takes the core its partner needs, and every region waits for a thread that is not running: a first answer
on 2 busy cores took 37 s instead of 6.6 s with OMP_WAIT_POLICY=PASSIVE (threads sleep at once). So a command
started on a busy machine asks for passive waiting; the OpenMP runtime reads it once, when torch loads it.
"""

from __future__ import annotations

import os
import sys
import time


def load_average() -> float:
    """The 1-minute load average (runnable threads), 0 where the OS does not say."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def full_at() -> float:
    """Busy cores from which a run gets passive waits: all but half of one."""
    return (os.cpu_count() or 1) - 0.5


def cpu_ticks() -> tuple[int, int] | None:
    """(busy, all) clock ticks of every core since boot, from /proc/stat (steal counts as busy: the host took
    it); None where there is none."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(fields) < 8:
        return None
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def sampled_busy_cores(seconds: float = 0.1) -> float | None:
    """Cores busy over the next `seconds` (this process sleeps meanwhile), or None without /proc/stat."""
    before = cpu_ticks()
    time.sleep(seconds)
    after = cpu_ticks()
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1]) * (os.cpu_count() or 1)


def busy_cores() -> float:
    """Cores that other work keeps busy. The load average is free to read but lags a minute behind: it still counts
    a run that ended seconds ago (llama-bench just before `llmcli bench`: 1.5 of 2 cores), so a machine it calls
    full is checked against what the cores do over the next 0.1 s."""
    average = load_average()
    if average <= full_at():
        return average
    sampled = sampled_busy_cores()
    return average if sampled is None else sampled


def choose_wait_policy(environ=None) -> str | None:
    """Set OMP_WAIT_POLICY=PASSIVE when other work already keeps (almost) every core busy, unless the user chose
    a policy or torch (and its OpenMP runtime) is loaded. Returns the policy set, or None. Not at a lower load:
    passive waits cost an idle machine's decode about a fifth (SmolLM2, 2 cores)."""
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in environ or "torch" in sys.modules:
        return None
    if busy_cores() <= full_at():
        return None
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "PASSIVE"
