"""`Runner`: a model as the drivers (generate, chat, trace, bench) call it.

It gives each forward call its positions from the cache, and sends the one-token steps that a compiled
decode step accepts there instead. The model itself holds no compiled object.
"""

from __future__ import annotations

import torch

from llmcli.models.base import CausalLM


class Runner:
    def __init__(self, model: CausalLM, compiled=None):
        self.model = model
        self.compiled = compiled  # a CompiledDecode, or None

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_limit(self) -> int:
        return self.model.context_limit

    def make_cache(self, batch: int, max_len: int):
        return self.model.make_cache(batch, max_len)

    def shared_token(self, token: int) -> int:
        """The token every process continues with: this one (a parallel runner takes rank 0's)."""
        return token

    def shared_text(self, text: str | None) -> str | None:
        """Input every process acts on: this (a parallel runner's ranks take what rank 0 read)."""
        return text

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head over the whole vocabulary (the logit lens reads every layer through it)."""
        return self.model.lm_head(x)

    def attention_info(self, index: int, cache=None) -> dict:
        """Facts about layer `index`'s attention (`trace`)."""
        return self.model.attention_info(index, cache)

    def comm_seconds(self) -> float | None:
        """Seconds spent communicating with other processes so far (None: one process)."""
        return None

    def barrier(self) -> None:
        """Wait for every process to reach this point (here, none other)."""

    def gathered(self, value) -> list:
        """Every process's `value`, in rank order: here, one."""
        return [value]

    def __call__(self, input_ids: torch.Tensor, cache, recorder=None, last_only: bool = False) -> torch.Tensor:
        """input_ids [B, T] continue the sequence held in `cache`; returns logits [B, T or 1, vocab]."""
        span = cache.span(input_ids.shape[1], input_ids.device)  # checks that the tokens fit
        if self.compiled is not None and self.compiled.accepts(input_ids, cache, recorder):
            return self.compiled(input_ids, span.positions, cache)
        return self.model(input_ids, span.positions, cache, recorder=recorder, last_only=last_only)


def as_runner(model) -> Runner:
    """A runner for a model, or the runner itself (the Python API takes either)."""
    return model if isinstance(model, Runner) else Runner(model)
