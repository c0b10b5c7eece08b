"""Running a workload for `trace --corpus`: prompts stream in, are packed into right-padded batches and
prefilled with a `WorkloadRecorder`; nothing is kept per prompt, so memory is the same for 10 or 10 million.

Batches: up to `window` prompts are read ahead and sorted by length, so a batch holds prompts of similar
length (little padding); a batch has at most `batch_size` rows and `batch_tokens` padded tokens. With
`generate` N each prompt runs alone (a padded row cannot continue past its own end) and N greedy tokens are
decoded and recorded after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from llmcli.backends.runner import as_runner
from llmcli.corpus import CorpusReader, Prompt
from llmcli.workload_recorder import WorkloadRecorder

PAD_ID = 0  # what fills a row after its prompt: causal attention never lets a real token see it


@dataclass
class WorkloadRun:
    recorder: WorkloadRecorder
    prompts: int = 0
    tokens: int = 0  # prompt tokens prefilled
    generated: int = 0  # decode steps recorded
    seconds: float = 0.0
    budget_reached: bool = False  # --max-tokens stopped the reading (the last prompt may be cut)


def within_budget(prompts: Iterable[Prompt], max_tokens: int | None, run: WorkloadRun) -> Iterator[Prompt]:
    """Stop reading once `max_tokens` prompt tokens are taken; the prompt that crosses it is cut to fit."""
    used = 0
    for prompt in prompts:
        if max_tokens is not None and used + len(prompt.ids) >= max_tokens:
            prompt.ids = prompt.ids[: max_tokens - used]
            run.budget_reached = True
            if prompt.ids:
                yield prompt
            return
        used += len(prompt.ids)
        yield prompt


def fitting(prompts: Iterable[Prompt], limit: int, reader: CorpusReader) -> Iterator[Prompt]:
    """Prompts that fit the model's context (with the tokens to generate); the others are skipped."""
    for prompt in prompts:
        if len(prompt.ids) > limit:
            reader.skip(prompt.line, f"longer than {limit} tokens")
            continue
        yield prompt


def batches(prompts: Iterable[Prompt], batch_size: int, batch_tokens: int, window: int) -> Iterator[list[Prompt]]:
    buffer: list[Prompt] = []
    for prompt in prompts:
        buffer.append(prompt)
        if len(buffer) >= window:
            yield from _pack(buffer, batch_size, batch_tokens)
            buffer = []
    if buffer:
        yield from _pack(buffer, batch_size, batch_tokens)


def _pack(buffer: list[Prompt], batch_size: int, batch_tokens: int) -> Iterator[list[Prompt]]:
    group: list[Prompt] = []
    for prompt in sorted(buffer, key=lambda p: len(p.ids)):
        width = len(prompt.ids)  # sorted: the newest prompt is the longest
        if group and (len(group) >= batch_size or width * (len(group) + 1) > batch_tokens):
            yield group
            group = []
        group.append(prompt)
    if group:
        yield group


def run_workload(model, prompts: Iterable[Prompt], reader: CorpusReader, *, batch_size: int = 16,
                 batch_tokens: int = 4096, max_tokens: int | None = None, generate: int = 0, stop_ids=(),
                 progress: Callable[[WorkloadRun], None] | None = None, window: int | None = None) -> WorkloadRun:
    """Prefill every prompt (recorded); `generate` N adds N greedy decode steps per prompt (also recorded)."""
    runner = as_runner(model)
    recorder = WorkloadRecorder()
    run = WorkloadRun(recorder)
    limit = runner.model.context_limit - generate
    stream = fitting(within_budget(prompts, max_tokens, run), limit, reader)
    size = 1 if generate else batch_size
    start = time.perf_counter()
    with torch.inference_mode():
        for group in batches(stream, size, batch_tokens, window or max(64, 8 * size)):
            labels = [recorder.label_id(p.label) for p in group]
            if generate:
                _prefill_and_decode(runner, recorder, group[0], labels[0], generate, set(stop_ids), run)
            else:
                prefill_batch(runner, recorder, group, labels)
            run.prompts += len(group)
            run.tokens += sum(len(p.ids) for p in group)
            run.seconds = time.perf_counter() - start
            if progress is not None:
                progress(run)
    run.seconds = time.perf_counter() - start
    return run


def prefill_batch(runner, recorder: WorkloadRecorder | None, group: list[Prompt], labels: list[int]):
    """One right-padded batch through the model (also what benchmarks/trace_corpus.py times without a recorder)."""
    lengths = [len(p.ids) for p in group]
    width = max(lengths)
    ids = torch.full((len(group), width), PAD_ID, dtype=torch.long)
    for row, prompt in enumerate(group):
        ids[row, : len(prompt.ids)] = torch.tensor(prompt.ids)
    if recorder is not None:
        recorder.begin(lengths, width, labels)
    cache = runner.make_cache(len(group), width)
    return runner(ids.to(runner.device), cache, recorder=recorder, last_only=True)


def _prefill_and_decode(runner, recorder, prompt: Prompt, label: int, steps: int, stop_ids: set[int],
                        run: WorkloadRun) -> None:
    n = len(prompt.ids)
    recorder.begin([n], n, [label])
    cache = runner.make_cache(1, n + steps)
    logits = runner(torch.tensor([prompt.ids], device=runner.device), cache, recorder=recorder, last_only=True)
    for _ in range(steps):
        token = int(logits[0, -1].float().argmax())
        if token in stop_ids:
            break
        recorder.begin([1], 1, [label], start=cache.length, new_prompt=False)
        logits = runner(torch.tensor([[token]], device=runner.device), cache, recorder=recorder, last_only=True)
        run.generated += 1
