"""Reading a workload for `trace --corpus`: prompts one by one, as they stream in, never the whole file.

A corpus is plain text (one prompt per line) or JSONL, one object per line with either `text` (a raw
prompt) or `messages` (a chat, rendered through the model's chat template) and an optional `label`. The
format is decided by the first non-blank line: an object there means JSONL. Blank lines are not prompts;
records that cannot be used (bad JSON, no text, wrong types, a template that fails, no tokens) are skipped
and counted by reason, so that a few broken lines do not end a long run.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llmcli.errors import LlmcliError


@dataclass
class Prompt:
    ids: list[int]
    label: str | None
    line: int  # 1-based line number in the corpus


class BadRecord(ValueError):
    """Why a line is not a usable record (the reason is counted, the line skipped)."""


@dataclass
class CorpusReader:
    """Turns corpus lines into token ids. `skipped` counts skipped records by reason; `examples` keeps the
    first few (line, reason) for the report."""

    tokenizer: object
    chat: bool = False  # plain-text lines / `text` fields through the chat template as one user turn
    skipped: Counter = field(default_factory=Counter)
    examples: list[tuple[int, str]] = field(default_factory=list)
    format: str | None = None  # "text" or "jsonl", decided by the first non-blank line

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def prompts(self, lines: Iterable[str]) -> Iterator[Prompt]:
        for number, line in enumerate(lines, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if self.format is None:
                self.format = "jsonl" if line.lstrip().startswith("{") else "text"
            try:
                ids, label = self._parse(line)
            except BadRecord as exc:
                self.skip(number, str(exc))
                continue
            if not ids:
                self.skip(number, "no tokens")
                continue
            yield Prompt(ids, label, number)

    def skip(self, line: int, reason: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < 5:
            self.examples.append((line, reason))

    def _parse(self, line: str) -> tuple[list[int], str | None]:
        if self.format == "text":
            return self._encode_text(line), None
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise BadRecord("not valid JSON") from None
        if not isinstance(record, dict):
            raise BadRecord("not a JSON object")
        label = record.get("label")
        if label is not None and (not isinstance(label, (str, int)) or isinstance(label, bool)):
            raise BadRecord("label is not a string or integer")
        label = None if label is None else str(label)
        if "messages" in record:
            return self._encode_messages(record["messages"]), label
        text = record.get("text")
        if not isinstance(text, str):
            raise BadRecord("no `text` string or `messages` list")
        return self._encode_text(text), label

    def _encode_text(self, text: str) -> list[int]:
        if self.chat:
            return self._encode_messages([{"role": "user", "content": text}])
        return self.tokenizer.encode_prompt(text)

    def _encode_messages(self, messages) -> list[int]:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise BadRecord("`messages` is not a list of {role, content} strings")
        # A chat that ends with the user's turn is traced up to where the reply would start.
        prompt = messages[-1]["role"] == "user"
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=prompt)
        except LlmcliError as exc:
            raise BadRecord(f"chat template: {exc}") from None
        except Exception as exc:  # a template's own error (raise_exception, undefined values) skips one record
            raise BadRecord(f"chat template: {type(exc).__name__}") from None
        return self.tokenizer.encode(text)


def open_lines(source: str) -> Iterator[str]:
    """Lines of FILE, or of stdin for '-', decoded as UTF-8 (bad bytes become U+FFFD), read as they come."""
    if source == "-":
        buffer = getattr(sys.stdin, "buffer", None)  # absent when a test puts a StringIO there
        for line in sys.stdin if buffer is None else buffer:
            yield line if isinstance(line, str) else line.decode("utf-8", "replace")
        return
    path = Path(source)
    if not path.is_file():
        raise LlmcliError(f"--corpus: no such file: {source}", exit_code=2)
    with path.open("r", encoding="utf-8", errors="replace") as f:
        yield from f
