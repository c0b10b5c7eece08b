"""Prefill/decode loop, sampling, stopping and streaming.

`Generation` is an iterator of text pieces (already safe to print); when it ends, `.result`
holds the token ids, the finish reason and the timings.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field

import torch

from llmcli.backends.runner import Runner, as_runner
from llmcli.errors import LlmcliError
from llmcli.models.base import CausalLM

# Logits are float32: divided by a temperature below 1e-5 (which samples as greedily as 0 anyway) or by a
# penalty past these bounds, they could overflow to inf and make the probabilities NaN.
MIN_TEMPERATURE = 1e-5
MAX_PENALTY = 1e6
MAX_SEED = 2**64 - 1  # torch.Generator takes 64-bit seeds


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        """Every value in range, each failure one line (exit 2). NaN fails every comparison, so each check is
        written as what must hold."""
        t = self.temperature
        if not (t == 0 or MIN_TEMPERATURE <= t < math.inf):
            raise LlmcliError(f"--temperature must be 0 (greedy) or a number from {MIN_TEMPERATURE:g} up, got {t}",
                              exit_code=2)
        if not self.top_k >= 0:
            raise LlmcliError(f"--top-k must be >= 0, got {self.top_k}", exit_code=2)
        if not 0 < self.top_p <= 1:
            raise LlmcliError(f"--top-p must be in (0, 1], got {self.top_p}", exit_code=2)
        if not 0 <= self.min_p < 1:
            raise LlmcliError(f"--min-p must be in [0, 1), got {self.min_p}", exit_code=2)
        if not 1 / MAX_PENALTY <= self.repetition_penalty <= MAX_PENALTY:
            raise LlmcliError(f"--repetition-penalty must be between {1 / MAX_PENALTY:g} and {MAX_PENALTY:g} "
                              f"(1 = off), got {self.repetition_penalty}", exit_code=2)
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise LlmcliError(f"--seed must be between 0 and {MAX_SEED}, got {self.seed}", exit_code=2)


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token already in the sequence (as transformers does)."""
    seen = logits.gather(-1, history)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, history, seen)


def sample_next(logits: torch.Tensor, params: SamplingParams, generator=None, history=None) -> int:
    """Pick the next token from float32 logits [vocab]."""
    if params.repetition_penalty != 1.0 and history is not None and history.numel():
        logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Drop a token when the tokens before it already cover top_p; always keep the first.
        drop = (sorted_probs.cumsum(-1) - sorted_probs) > params.top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@dataclass
class GenerationResult:
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" (eos or stop string), "length" or "interrupted" (stop())
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    peak_memory_bytes: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    decode_steps: int = 0  # forward passes after the prefill

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0


class Generation:
    """Iterate to stream text; `result` is complete once iteration ends."""

    def __init__(self, model: Runner | CausalLM, tokenizer, prompt_ids: list[int], max_new_tokens: int = 256,
                 sampling: SamplingParams | None = None, stop_ids=None, stop_strings=(), cache=None,
                 recorder=None):
        self.model, self.tokenizer = as_runner(model), tokenizer
        self.prompt_ids = list(prompt_ids)
        self.sampling = sampling or SamplingParams()
        self.stop_ids = set(stop_ids or [])
        self.stop_strings = [s for s in stop_strings if s]
        self.recorder = recorder
        self.stop_requested = False  # set by stop(), e.g. from a Ctrl-C handler
        self.device = self.model.device
        if not self.prompt_ids:
            raise LlmcliError("the prompt is empty")
        # With a cache passed in, it already holds `cache.length` tokens of context and prompt_ids
        # continue them (chat reuses its cache across turns); otherwise a cache is sized to fit.
        self.cache = cache
        before = cache.length if cache is not None else 0
        limit = self.model.context_limit if cache is None else min(self.model.context_limit, cache.max_len)
        if before + len(self.prompt_ids) >= limit:
            raise LlmcliError(
                f"the prompt has {before + len(self.prompt_ids)} tokens; the context is {limit} tokens"
            )
        self.max_new_tokens = max(0, min(max_new_tokens, limit - before - len(self.prompt_ids)))
        self.result = GenerationResult(prompt_tokens=len(self.prompt_ids))

    def stop(self) -> None:
        """Ask a running generation to end before its next token (finish_reason "interrupted")."""
        self.stop_requested = True

    def _new_cache(self):
        return self.model.make_cache(1, len(self.prompt_ids) + self.max_new_tokens)

    def __iter__(self):
        with torch.inference_mode():
            yield from self._run()

    def _run(self):
        res, params = self.result, self.sampling
        if self.max_new_tokens == 0:
            return
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=self.device)
            if params.seed is not None:
                generator.manual_seed(params.seed)
            else:
                generator.seed()
        cache = self.cache if self.cache is not None else self._new_cache()
        history = torch.tensor(self.prompt_ids, device=self.device) if params.repetition_penalty != 1 else None
        decoder = self.tokenizer.stream_decoder()
        hold = max((len(s) for s in self.stop_strings), default=1) - 1
        pending = ""  # decoded text held back because it may be the start of a stop string
        stopped_by_string = False
        compiled = self.model.compiled
        compiling_before = (compiled.compiling_steps, compiled.compiling_seconds) if compiled else (0, 0.0)
        synchronize(self.device)
        t0 = time.perf_counter()
        logits = self.model(torch.tensor([self.prompt_ids], device=self.device), cache,
                            recorder=self.recorder, last_only=True)
        for step in range(self.max_new_tokens):
            token = self.model.shared_token(sample_next(logits[0, -1].float(), params, generator, history))
            if step == 0:
                synchronize(self.device)
                t1 = time.perf_counter()
                res.prefill_seconds = t1 - t0
            if self.stop_requested:  # checked between tokens, so the cache holds prompt + token_ids exactly
                res.finish_reason = "interrupted"
                break
            if token in self.stop_ids:
                res.finish_reason = "stop"
                break
            res.token_ids.append(token)
            if history is not None:
                history = torch.cat([history, history.new_tensor([token])])
            pending += decoder.add(token)
            cut = self._find_stop(pending)
            if cut is not None:
                pending, stopped_by_string, res.finish_reason = pending[:cut], True, "stop"
                break
            if len(pending) > hold:
                emit, pending = pending[: len(pending) - hold], pending[len(pending) - hold:]
                res.text += emit
                yield emit
            if step + 1 < self.max_new_tokens:
                logits = self.model(torch.tensor([[token]], device=self.device), cache, recorder=self.recorder)
                res.decode_steps += 1
        synchronize(self.device)
        res.decode_seconds = time.perf_counter() - t1
        if compiled is not None:  # a step that compiled is not a measure of decoding speed
            res.decode_steps -= compiled.compiling_steps - compiling_before[0]
            res.decode_seconds -= compiled.compiling_seconds - compiling_before[1]
        if not stopped_by_string:
            pending += decoder.flush()
            cut = self._find_stop(pending)
            if cut is not None:
                pending, res.finish_reason = pending[:cut], "stop"
        if pending:
            res.text += pending
            yield pending
        res.peak_memory_bytes = peak_memory_bytes(self.device)

    def _find_stop(self, pending: str) -> int | None:
        """Where the earliest stop string begins in emitted text + pending, relative to pending.
        Emitted text never holds a whole stop string; one may straddle the boundary."""
        text, offset = self.result.text + pending, len(self.result.text)
        found = [i for s in self.stop_strings if (i := text.find(s, max(0, offset - len(s) + 1))) != -1]
        if not found:
            return None
        return max(min(found) - offset, 0)
