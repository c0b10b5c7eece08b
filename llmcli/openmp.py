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


def busy_cores() -> float:
    """The 1-minute load average (runnable threads), 0 where the OS does not say."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def choose_wait_policy(environ=None) -> str | None:
    """Set OMP_WAIT_POLICY=PASSIVE when other work already keeps (almost) every core busy, unless the user chose
    a policy or torch (and its OpenMP runtime) is loaded. Returns the policy set, or None. Not at a lower load:
    passive waits cost an idle machine's decode about a fifth (SmolLM2, 2 cores), and the load average still
    counts the llmcli run just before this one (a 2-thread run of 30 s leaves about 0.8)."""
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in environ or "torch" in sys.modules:
        return None
    if busy_cores() <= (os.cpu_count() or 1) - 0.5:
        return None
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "PASSIVE"
