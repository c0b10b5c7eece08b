"""The chat session engine: conversation state, prompt rendering, KV-cache reuse, reasoning, commands.

Each turn re-renders the whole conversation with the chat template and reuses the longest common
prefix of the new token ids and the ids already in the KV cache; only the rest is prefilled. That
single rule covers the plain case (the previous prompt and reply are a prefix of the new prompt) and
templates that rewrite history (e.g. dropping earlier `<think>` reasoning): whatever the template
changes is recomputed. The terminal front end lives in `llmcli/cli/chat.py`; nothing here prints.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from llmcli.errors import LlmcliError
from llmcli.generate import MAX_SEED, Generation, SamplingParams
from llmcli.templates import CHATML_TEMPLATE

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
DEFAULT_MAX_CONTEXT = 8192  # tokens of KV cache allocated when --max-context is not given
ROLES = ("system", "user", "assistant")

COMMANDS = {
    "/help": "show this help",
    "/reset": "forget the conversation (keeps the system message)",
    "/system TEXT": "set the system message (no TEXT: show it; '/system -' removes it)",
    "/save FILE": "save the conversation as JSON messages",
    "/load FILE": "replace the conversation with one saved by /save (or a JSON list of messages)",
    "/retry": "regenerate the last reply",
    "/stats": "tokens in context, cache use, last turn's speed",
    "/exit": "quit (Ctrl-D works too)",
}
HELP = "\n".join(f"  {name:<14} {text}" for name, text in COMMANDS.items()) + (
    "\n  Start a message with // to send a literal '/'. End a line with \\ to continue it,"
    '\n  or wrap several lines in """ ... """.'
)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def chat_tokenizer(tokenizer, family: str | None):
    """The tokenizer whose template renders the conversation. Original Qwen repos ship no template
    but were trained on ChatML, so they get the built-in one; other models without one cannot chat."""
    if tokenizer.chat_template is not None:
        return tokenizer
    if family == "qwen":
        return tokenizer.with_chat_template(CHATML_TEMPLATE)
    raise LlmcliError("this model has no chat template; use `llmcli generate --raw` instead")


def chat_stop_ids(tokenizer, stop_ids) -> list[int]:
    """The model's stop ids, plus <|im_end|> when the template ends turns with it (base Qwen models list
    only <|endoftext|> as eos, yet a chat turn is over at <|im_end|>)."""
    ids = list(stop_ids)
    end = tokenizer.token_to_id("<|im_end|>")
    if end is not None and end not in ids and "<|im_end|>" in (tokenizer.chat_template or ""):
        ids.append(end)
    return ids


def validate_messages(data, source: str) -> list[dict]:
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list):
        raise LlmcliError(f"{source}: expected a JSON list of messages or an object with 'messages'")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise LlmcliError(f"{source}: message {i} needs a role ({', '.join(ROLES)}) and a string content")
        if m["role"] == "system" and i != 0:
            raise LlmcliError(f"{source}: only the first message may be a system message")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def drop_oldest_turn(messages: list[dict]) -> bool:
    """Remove the first user message and the replies after it, in place. The system message and the
    last user message always stay; returns False when nothing can go."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    users = [i for i in range(start, len(messages)) if messages[i]["role"] == "user"]
    if not users or (users[0] == start and len(users) < 2):
        return False
    del messages[start:users[1] if users[0] == start else users[0]]
    return True


# --- reasoning --------------------------------------------------------------------------------------------


class ThinkSplitter:
    """Splits streamed reply text into reasoning and answer parts at <think> / </think>.

    A tag may arrive split across pieces, so a tail that could be the start of the next tag is held
    back. Newlines right after a tag are dropped (templates strip them too)."""

    def __init__(self, thinking: bool = False):
        self.thinking = thinking
        self._pending = ""
        self._section_start = True

    def feed(self, text: str) -> list[tuple[bool, str]]:
        """-> [(is_reasoning, text), ...] ready to show."""
        out: list[tuple[bool, str]] = []
        buf = self._pending + text
        while True:
            tag = THINK_CLOSE if self.thinking else THINK_OPEN
            i = buf.find(tag)
            if i == -1:
                break
            self._emit(out, buf[:i])
            buf = buf[i + len(tag):]
            self.thinking, self._section_start = not self.thinking, True
        keep = next((k for k in range(len(tag) - 1, 0, -1) if buf.endswith(tag[:k])), 0)
        self._pending = buf[len(buf) - keep:] if keep else ""
        self._emit(out, buf[:len(buf) - keep])
        return out

    def flush(self) -> list[tuple[bool, str]]:
        out: list[tuple[bool, str]] = []
        self._emit(out, self._pending)
        self._pending = ""
        return out

    def _emit(self, out: list, text: str) -> None:
        if self._section_start:
            text = text.lstrip("\n")
        if text:
            self._section_start = False
            out.append((self.thinking, text))


def opens_reasoning(prompt_text: str) -> bool:
    """True when the generation prompt itself opens a <think> block (R1-style templates), so the reply
    starts inside the reasoning."""
    tail = prompt_text.rstrip()
    return tail.rfind(THINK_OPEN) > tail.rfind(THINK_CLOSE)


# --- the session ------------------------------------------------------------------------------------------


@dataclass
class TurnStats:
    context_tokens: int  # the rendered conversation, in tokens
    reused_tokens: int  # of those, found in the KV cache
    prefilled_tokens: int  # the rest, computed this turn
    reply_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    finish_reason: str = ""

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefilled_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0


class Turn:
    """One reply: iterate for text pieces; `stop()` ends it before the next token. When iteration ends,
    however it ends (exhausted, stopped, Ctrl-C), the session records the reply and what the cache holds."""

    def __init__(self, session: ChatSession, generation: Generation, prompt_ids: list[int], stats: TurnStats,
                 notices: list[str], reasoning_open: bool):
        self.session, self.generation, self.prompt_ids = session, generation, prompt_ids
        self.stats, self.notices, self.reasoning_open = stats, notices, reasoning_open
        self.text = ""
        self.done = False
        self._completed = False

    def __iter__(self) -> Iterator[str]:
        if self.done:
            return
        try:
            yield from self.generation
            self._completed = True
        finally:
            self.session._finish(self)

    def stop(self) -> None:
        self.generation.stop()

    def run(self) -> str:
        for _ in self:
            pass
        return self.text


class ChatSession:
    def __init__(self, loaded, sampling: SamplingParams | None = None, max_new_tokens: int = 2048,
                 max_context: int | None = None, system: str | None = None, enable_thinking: bool | None = None,
                 stop_ids=()):
        self.loaded, self.runner = loaded, loaded.runner
        self.tokenizer = chat_tokenizer(loaded.tokenizer, loaded.config.family)
        self.sampling = sampling or SamplingParams()
        self.max_new_tokens = max_new_tokens
        self.enable_thinking = enable_thinking
        self.stop_ids = chat_stop_ids(self.tokenizer, stop_ids)
        limit = self.runner.context_limit
        if max_context is not None and not 2 <= max_context <= limit:
            raise LlmcliError(f"--max-context must be between 2 and the model's context ({limit} tokens)",
                              exit_code=2)
        self.max_context = max_context or min(limit, DEFAULT_MAX_CONTEXT)
        with torch.inference_mode():  # like every other cache: one kind of tensor for the compiled step
            self.cache = self.runner.make_cache(1, self.max_context)
        self.cached_ids: list[int] = []  # the tokens whose keys/values the cache holds, in order
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.turns_started = 0
        self.last: TurnStats | None = None
        self._active: Turn | None = None

    # rendering

    def render(self, messages: list[dict] | None = None) -> tuple[str, list[int]]:
        """The prompt for the next reply: the conversation through the template, plus the generation prompt."""
        text = self.tokenizer.apply_chat_template(
            self.messages if messages is None else messages, add_generation_prompt=True,
            enable_thinking=self.enable_thinking,
        )
        return text, self.tokenizer.encode(text)

    def reply_room(self) -> int:
        """Tokens kept free for the reply when deciding whether old turns must go."""
        return min(self.max_new_tokens, self.max_context // 2)

    def _fit(self) -> tuple[str, list[int], list[str]]:
        """Render, dropping the oldest turns (never the system message) until prompt + reply room fits.
        The conversation changes only if the result fits."""
        messages = list(self.messages)
        text, ids = self.render(messages)
        dropped = 0
        while len(ids) + self.reply_room() > self.max_context and drop_oldest_turn(messages):
            dropped += 1
            text, ids = self.render(messages)
        if len(ids) >= self.max_context:
            raise LlmcliError(f"the message does not fit: the prompt is {len(ids)} tokens and the context "
                              f"holds {self.max_context} (raise --max-context)")
        notices = []
        if dropped:
            notices.append(f"context full: dropped the {dropped} oldest turn{'s' * (dropped > 1)} "
                           f"({len(ids)} of {self.max_context} tokens now in use)")
        self.messages = messages
        return text, ids, notices

    # turns

    def send(self, text: str) -> Turn:
        """Add a user message and start the reply (a Turn to iterate)."""
        self._settle()
        self.messages.append({"role": "user", "content": text})
        try:
            return self._start()
        except BaseException:
            self.messages.pop()  # a message that cannot be answered leaves the conversation as it was
            raise

    def retry(self) -> Turn:
        """Regenerate the reply to the last user message."""
        self._settle()
        if self.messages and self.messages[-1]["role"] == "assistant":
            removed = self.messages.pop()
            try:
                return self._start()
            except BaseException:
                self.messages.append(removed)
                raise
        if self.messages and self.messages[-1]["role"] == "user":
            return self._start()
        raise LlmcliError("nothing to retry yet")

    def _settle(self) -> None:
        """Record a turn that was started but never run to the end (e.g. Ctrl-C before it began)."""
        if self._active is not None and not self._active.done:
            self._finish(self._active)

    def _start(self) -> Turn:
        text, ids, notices = self._fit()
        # Reuse what the cache holds of this prompt; at least one token must be fed to get logits.
        reuse = min(common_prefix_length(self.cached_ids, ids), len(ids) - 1)
        if not self.runner.model.reuses_cache(self.cache, len(ids)):  # e.g. original Qwen's NTK alpha changed
            reuse = 0
        reuse = self.cache.restorable(reuse)  # a recurrent state returns only to its snapshots
        if reuse == 0:
            self.cache.reset()  # also clears per-sequence state (e.g. original Qwen's NTK alpha)
        else:
            self.cache.crop(reuse)
        self.cached_ids = ids[:reuse]
        sampling = self.sampling
        if sampling.seed is not None:  # reproducible sessions, yet each turn samples differently
            sampling = dataclasses.replace(sampling, seed=(sampling.seed + self.turns_started) % (MAX_SEED + 1))
        generation = Generation(self.runner, self.tokenizer, ids[reuse:], self.max_new_tokens, sampling,
                                stop_ids=self.stop_ids, cache=self.cache)
        self.turns_started += 1
        stats = TurnStats(context_tokens=len(ids), reused_tokens=reuse, prefilled_tokens=len(ids) - reuse)
        self._active = Turn(self, generation, ids, stats, notices, opens_reasoning(text))
        return self._active

    def _finish(self, turn: Turn) -> None:
        if turn.done:
            return
        turn.done = True
        res = turn.generation.result
        # The cache holds a prefix of prompt + generated tokens: generation never feeds the token it
        # sampled last (nor the stop token), and an interrupted forward pass does not advance the length.
        fed = turn.prompt_ids + res.token_ids
        if self.cache.length > len(fed):  # cannot happen; never trust a cache we cannot account for
            self.cache.reset()
        self.cached_ids = fed[:self.cache.length]
        self.cache.mark()  # a turn's end: where the next turn's prompt usually picks up
        # Keep the reply as generated, reasoning included: the template decides what later turns see.
        turn.text = res.text if turn._completed else self.tokenizer.decode(res.token_ids)
        self.messages.append({"role": "assistant", "content": turn.text})
        s = turn.stats
        s.reply_tokens, s.decode_steps = len(res.token_ids), res.decode_steps
        s.prefill_seconds, s.decode_seconds = res.prefill_seconds, res.decode_seconds
        s.finish_reason = res.finish_reason if turn._completed else "interrupted"
        self.last = s

    # commands' state changes

    def reset(self) -> None:
        self.messages = [m for m in self.messages[:1] if m["role"] == "system"]
        self.cache.reset()
        self.cached_ids = []
        self.last = None

    @property
    def system(self) -> str | None:
        return self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else None

    def set_system(self, text: str | None) -> None:
        if self.system is not None:
            self.messages.pop(0)
        if text:
            self.messages.insert(0, {"role": "system", "content": text})

    def save(self, path: str | Path) -> int:
        path = Path(path).expanduser()
        data = {"model": self.loaded.name, "messages": self.messages}
        try:
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as e:
            raise LlmcliError(f"cannot write {path}: {e.strerror or e}") from None
        return len(self.messages)

    def load(self, path: str | Path) -> int:
        """Replace the conversation; the cache stays and is reused where the new prompt matches it."""
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise LlmcliError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
        except json.JSONDecodeError as e:
            raise LlmcliError(f"{path} is not valid JSON: {e.msg} (line {e.lineno})") from None
        self.messages = validate_messages(data, str(path))
        return len(self.messages)

    def stats(self) -> dict:
        per_token = self.cache.bytes_per_token()
        return {
            "messages": len(self.messages),
            "context_tokens": len(self.cached_ids),
            "max_context": self.max_context,
            "cache_bytes_used": per_token * len(self.cached_ids),
            "cache_bytes_allocated": per_token * self.max_context,
            "last": self.last,
        }


# --- in-chat commands -------------------------------------------------------------------------------------


@dataclass
class CommandResult:
    message: str = ""
    exit: bool = False
    turn: Turn | None = None  # /retry starts a reply for the caller to stream


def is_command(line: str) -> bool:
    return line.startswith("/") and not line.startswith("//")


def user_text(line: str) -> str:
    """A leading // escapes a message that really starts with '/'."""
    return line[1:] if line.startswith("//") else line


def run_command(session: ChatSession, line: str, human_bytes: Callable[[float], str] = str) -> CommandResult:
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    name = name.lower()
    if name in ("/exit", "/quit", "/bye"):
        return CommandResult(exit=True)
    if name in ("/help", "/?"):
        return CommandResult("commands:\n" + HELP)
    if name == "/reset":
        session.reset()
        return CommandResult("conversation cleared")
    if name == "/system":
        if not arg:
            return CommandResult(f"system: {session.system}" if session.system is not None else "no system message")
        session.set_system(None if arg == "-" else arg)
        return CommandResult("system message removed" if arg == "-" else "system message set")
    if name in ("/save", "/load"):
        if not arg:
            raise LlmcliError(f"usage: {name} FILE")
        if name == "/save":
            return CommandResult(f"saved {session.save(arg)} messages to {arg}")
        return CommandResult(f"loaded {session.load(arg)} messages from {arg}")
    if name == "/retry":
        return CommandResult(turn=session.retry())
    if name == "/stats":
        return CommandResult(format_stats(session, human_bytes))
    return CommandResult(f"unknown command {name}\ncommands:\n{HELP}")


def format_stats(session: ChatSession, human_bytes: Callable[[float], str] = str) -> str:
    s = session.stats()
    lines = [
        f"messages: {s['messages']}",
        f"context: {s['context_tokens']} of {s['max_context']} tokens",
        f"cache: {human_bytes(s['cache_bytes_used'])} used of {human_bytes(s['cache_bytes_allocated'])} allocated",
    ]
    if s["last"] is not None:
        lines.append("last turn: " + turn_summary(s["last"]))
    return "\n".join(lines)


def turn_summary(t: TurnStats) -> str:
    line = (f"reply {t.reply_tokens} tok, {t.decode_tokens_per_s:.1f} tok/s | prompt {t.prefilled_tokens} new tok "
            f"({t.reused_tokens} reused), {t.prefill_tokens_per_s:.1f} tok/s")
    return line + (f" | {t.finish_reason}" if t.finish_reason != "stop" else "")


# --- multi-line input -------------------------------------------------------------------------------------


def read_message(read: Callable[[str], str], prompt: str = ">>> ", more: str = "... ") -> str:
    """One message from a line reader: a trailing backslash continues the line; a line starting with
    triple quotes collects lines up to the closing triple quotes."""
    first = read(prompt)
    if first.lstrip().startswith('"""'):
        body = first.lstrip()[3:]
        if body.rstrip().endswith('"""'):
            return body.rstrip()[:-3]
        lines = [body] if body else []
        while True:
            line = read(more)
            if line.rstrip().endswith('"""'):
                lines.append(line.rstrip()[:-3])
                break
            lines.append(line)
        return "\n".join(lines).strip("\n")
    lines = []
    line = first
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read(more)
    lines.append(line)
    return "\n".join(lines)
