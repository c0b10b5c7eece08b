"""The collectives of a parallel run, timed: `bench` reports the time spent in them per decode step and per prompt.

Every all-reduce and all-gather of llmcli.backends.tensor_parallel goes through `all_reduce`/`all_gather`
here, which add their time to `CLOCK`. On CPU (gloo) a collective returns once its result is here, so the
wall time around the call is this rank's communication time, waiting for the slowest rank included (a rank
that finished its share early waits inside the all-reduce: that wait is where an uneven split shows). On
CUDA (NCCL) the call only queues work, so events on the current stream time it on the GPU; they are read,
with one sync, only when `seconds()` is asked.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

MAX_PENDING_EVENTS = 4096  # CUDA event pairs kept before they are read (one sync per this many collectives)


class CommClock:
    def __init__(self):
        self._seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # CUDA pairs not yet read
        self.calls = 0

    def run(self, tensor: torch.Tensor, collective, *args) -> None:
        self.calls += 1
        if tensor.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            collective(*args)
            end.record()
            self._events.append((start, end))
            if len(self._events) >= MAX_PENDING_EVENTS:  # a long generate or serve never asks: fold them now
                self.seconds()
            return
        began = time.perf_counter()
        collective(*args)
        self._seconds += time.perf_counter() - began

    def seconds(self) -> float:
        """Seconds spent in collectives since the process started (read differences around what you time)."""
        if self._events:
            self._events[-1][1].synchronize()
            self._seconds += sum(start.elapsed_time(end) for start, end in self._events) / 1000
            self._events.clear()
        return self._seconds


CLOCK = CommClock()


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place (timed); inside a compiled step (--compile), torch's traceable
    functional form, untimed."""
    if torch.compiler.is_compiling():
        return funcol.all_reduce(tensor, "sum", dist.group.WORLD)
    CLOCK.run(tensor, dist.all_reduce, tensor)
    return tensor


def all_gather(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """Every rank's `tensor` (equal shapes), concatenated in rank order along `dim` (timed; untimed and
    functional inside a compiled step)."""
    tensor = tensor.contiguous()
    if torch.compiler.is_compiling():
        return funcol.all_gather_tensor(tensor, dim % tensor.dim(), dist.group.WORLD)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    CLOCK.run(tensor, dist.all_gather, parts, tensor)
    return torch.cat(parts, dim=dim)
