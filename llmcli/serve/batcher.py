"""Continuous batching: one engine thread steps every running request together.

Each running request owns a row of one batch cache ([max_len, max_batch, ...] per layer). Between steps,
new requests join (their prompt prefilled into their row alone, in chunks, so a long prompt delays the
others by one chunk at a time) and finished or abandoned ones leave: the last row moves into the freed
one, so the running requests always hold rows 0..n-1 and a step reads one view of them. A step feeds each
row its last token at that row's own position (per-row positions, `models.cache`), so a sequence sees
exactly the keys it would see alone: greedy tokens equal those of a run on its own.

The server's event loop talks to the engine through `submit` (thread-safe, refuses when the queue is full)
and each request's `emit` callback, which the engine calls from its thread.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llmcli.generate import SamplingParams, sample_next
from llmcli.models.cache import StaticView
from llmcli.serve.text import TextStream

PREFILL_CHUNK = 256  # prompt tokens per engine iteration: bounds how long one prompt stalls the others


class QueueFull(Exception):
    """More requests waiting than the queue holds (the server answers 503)."""


@dataclass
class TokenInfo:
    """A generated token with its log-probability and the most likely alternatives, when asked for."""

    id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Piece:
    """Text released by one step (may be "") and the token(s) behind it (with logprobs when asked)."""

    text: str
    tokens: list[TokenInfo] = field(default_factory=list)


@dataclass
class Done:
    finish_reason: str  # "stop", "length", or "error"
    prompt_tokens: int
    completion_tokens: int
    seconds: float  # from admission to the end
    first_token_seconds: float  # from submission to the first token
    error: str | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[Piece | Done], None]  # called from the engine thread
    stop_ids: frozenset[int] = frozenset()  # tokens that end the reply (not part of it)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_strings: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no logprobs; 0..n: the chosen token's, plus n alternatives
    cancelled: bool = False  # set by the server when the client goes away; the engine drops it next step
    submitted: float = field(default_factory=time.perf_counter)


class Sequence:
    """A running request: its row's contents and where it stands."""

    def __init__(self, request: Request, tokenizer, device):
        self.request = request
        self.prefilled = 0  # prompt tokens in the cache so far
        self.length = 0  # tokens in the cache row
        self.next_token: int | None = None  # sampled, not yet fed
        self.generated = 0
        self.text = TextStream(tokenizer, request.stop_strings)
        self.generator = None
        params = request.sampling
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()
        self.started = time.perf_counter()
        self.first_token_at: float | None = None

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.request.prompt_ids)


class Engine:
    def __init__(self, runner, tokenizer, max_batch: int = 8, max_context: int = 4096,
                 max_queue: int = 64, log: Callable[[str], None] | None = None):
        self.runner, self.tokenizer = runner, tokenizer
        self.max_batch, self.max_context, self.max_queue = max_batch, max_context, max_queue
        self.log = log
        self.device = runner.device
        with torch.inference_mode():
            self.cache = runner.make_cache(max_batch, max_context)
        self.cache.row_cache(0)  # a model whose cache does not split into rows says so now, not at each request
        # per-sequence states (a recurrent layer's; layers without rows per position), which a dummy token changes
        self.states = [t for layer in self.cache.layers if not layer.per_token for t in layer.tensors()]
        runner.model.derived_tensors()  # what a static step reads besides the weights, built now
        self.rows: list[Sequence] = []  # row i of the cache belongs to rows[i]
        self.waiting: collections.deque[Request] = collections.deque()
        self.lock = threading.Condition()
        self.running = False
        self.thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (for tests and logs)
        self.max_rows_seen = 0  # the largest batch a step ran

    # -- the server's side -------------------------------------------------------------------------

    def start(self) -> None:
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="llmcli-engine", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self.lock:
            self.running = False
            self.lock.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)

    def submit(self, request: Request) -> None:
        with self.lock:
            free_rows = max(self.max_batch - len(self.rows), 0)  # those join at the next step
            if len(self.waiting) >= free_rows + self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting")
            self.waiting.append(request)
            self.lock.notify_all()

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        with self.lock:
            self.lock.notify_all()

    @property
    def load(self) -> dict:
        return {"running": len(self.rows), "waiting": len(self.waiting), "max_batch": self.max_batch,
                "decode_steps": self.steps, "largest_batch": self.max_rows_seen}

    # -- the engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.lock:
                while self.running and not self.rows and not self.waiting:
                    self.lock.wait()
                if not self.running:
                    break
                self._admit()
            try:
                with torch.inference_mode():
                    self._iteration()
            except Exception as exc:  # a bug or an out-of-memory: fail the running requests, keep serving
                if self.log:
                    self.log(f"engine error: {type(exc).__name__}: {exc}")
                for seq in self.rows:
                    self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
                self.rows.clear()
        for seq in self.rows:
            self._finish(seq, "error", error="the server is shutting down")
        for request in self.waiting:
            request.emit(Done("error", len(request.prompt_ids), 0, 0.0, 0.0, "the server is shutting down"))

    def _admit(self) -> None:
        """Move waiting requests into free rows (lock held)."""
        while self.waiting and len(self.rows) < self.max_batch:
            request = self.waiting.popleft()
            if not request.cancelled:
                self.rows.append(Sequence(request, self.tokenizer, self.device))

    def _iteration(self) -> None:
        self._drop_cancelled()
        prefilling = next((s for s in self.rows if not s.decoding), None)
        if prefilling is not None:  # one chunk of one prompt, then a decode step for the others
            self._prefill_chunk(self.rows.index(prefilling))
        ready = [i for i, s in enumerate(self.rows) if s.decoding and s.next_token is not None]
        if ready:
            self._decode_step()

    def _drop_cancelled(self) -> None:
        for i in reversed(range(len(self.rows))):
            if self.rows[i].request.cancelled:
                self._release(i)

    def _prefill_chunk(self, row: int) -> None:
        seq = self.rows[row]
        ids = seq.request.prompt_ids
        chunk = ids[seq.prefilled:seq.prefilled + PREFILL_CHUNK]
        cache = self.cache.row_cache(row)
        if seq.prefilled == 0:
            cache.reset()  # a recurrent state (Qwen3-Next, Qwen3.5) still holds the row's last sequence
        cache.length = seq.prefilled  # a row cache starts empty; continue where the last chunk ended
        logits = self.runner(torch.tensor([chunk], device=self.device), cache, last_only=True)
        seq.prefilled += len(chunk)
        seq.length = seq.prefilled
        if seq.decoding:
            self._take(row, logits[0, -1])

    def _decode_step(self) -> None:
        """One token for every row whose next token is known (rows 0..n-1; a row still prefilling is fed
        a dummy token at a position past its prompt, which its own prefill later overwrites, and its recurrent
        state, if the model keeps one, is put back after the step)."""
        n = len(self.rows)
        tokens, positions = [], []
        for seq in self.rows:
            fed = seq.next_token is not None and seq.decoding
            tokens.append(seq.next_token if fed else 0)
            positions.append(seq.length if fed else min(seq.prefilled, self.max_context - 1))
        ids = torch.tensor(tokens, device=self.device)[:, None]
        pos = torch.tensor(positions, device=self.device)[:, None]
        view = StaticView(self.cache, max(positions) + 1, rows=n)
        kept = self._states_of([row for row, seq in enumerate(self.rows)  # rows fed a dummy, past their first chunk
                                if (seq.next_token is None or not seq.decoding) and seq.prefilled > 0])
        logits = self.runner.model(ids, pos, view)
        for tensor, saved in kept:  # a dummy token is overwritten in a key cache, but folded into a state: undone
            tensor.copy_(saved)
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, n)
        for row in reversed(range(n)):  # reversed: a finished row takes the last row's place
            seq = self.rows[row]
            if seq.next_token is not None and seq.decoding:
                seq.length += 1
                seq.next_token = None
                self._take(row, logits[row, -1])

    def _states_of(self, rows: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The per-sequence states of these batch rows: (the row's tensor, a copy); none where the model keeps none."""
        return [(tensor[row], tensor[row].clone()) for tensor in self.states for row in rows]

    def _take(self, row: int, logits: torch.Tensor) -> None:
        """Sample row `row`'s next token from its logits, stream it, and end the sequence if it is done."""
        seq, request = self.rows[row], self.rows[row].request
        logits = logits.float()
        token = sample_next(logits, request.sampling, seq.generator)
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        if token in request.stop_ids:
            self._finish(seq, "stop")
            self._release(row)
            return
        seq.generated += 1
        info = [self._token_info(token, logits, request.top_logprobs)] if request.top_logprobs is not None else []
        text = seq.text.add(token)
        if seq.text.stopped:
            request.emit(Piece(text, info))
            self._finish(seq, "stop")
            self._release(row)
            return
        if text or info:
            request.emit(Piece(text, info))
        if seq.generated >= request.max_tokens or seq.length + 1 >= self.max_context:
            self._finish(seq, "length")
            self._release(row)
            return
        seq.next_token = token

    @staticmethod
    def _token_info(token: int, logits: torch.Tensor, top: int) -> TokenInfo:
        logprobs = torch.log_softmax(logits, dim=-1)
        alternatives = []
        if top:
            values, ids = logprobs.topk(min(top, logprobs.shape[-1]))
            alternatives = list(zip(ids.tolist(), values.tolist(), strict=True))
        return TokenInfo(token, float(logprobs[token]), alternatives)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        request = seq.request
        if reason != "error":
            tail = seq.text.flush()
            if tail:
                request.emit(Piece(tail))
            if seq.text.stopped:
                reason = "stop"
        now = time.perf_counter()
        first = (seq.first_token_at or now) - request.submitted
        request.emit(Done(reason, len(request.prompt_ids), seq.generated, now - seq.started, first, error))

    def _release(self, row: int) -> None:
        """Free row `row`: the last row moves into it (its cache contents too), keeping rows 0..n-1 dense."""
        last = len(self.rows) - 1
        if row != last:
            moved = self.rows[last]
            self.cache.copy_row(last, row, max(moved.length, moved.prefilled))
            self.rows[row] = moved
        self.rows.pop()
