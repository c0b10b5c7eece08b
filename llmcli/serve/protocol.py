"""The OpenAI wire format: request validation and the error, completion and chunk objects.

Every check raises `ApiError`, which the app answers with its status and an OpenAI-style error object
(`{"error": {"message", "type", "param", "code"}}`), so that a bad request is always a 4xx with a reason.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

from llmcli.generate import MAX_SEED, MIN_TEMPERATURE, SamplingParams

MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_STOP_LENGTH = 256
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs (the completions API's logprobs allows up to 5)
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options",
                 "user", "presence_penalty", "frequency_penalty"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "logprobs", "echo", "suffix"}
ROLES = ("system", "user", "assistant", "developer")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def parse_json(body: bytes) -> dict:
    try:
        data = json.loads(body, parse_constant=_not_json)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise bad(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad("the body must be a JSON object", code="invalid_json")
    return data


def clean(text: str) -> str:
    """JSON may carry lone surrogates ("\\ud800"), which no tokenizer encodes: they become U+FFFD."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _not_json(name: str):
    raise ValueError(f"{name} is not a JSON value")


@dataclass
class CompletionParams:
    """A validated request, whichever endpoint it came to."""

    max_tokens: int | None
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    top_logprobs: int | None = None  # None: no logprobs
    messages: list[dict] | None = None  # chat
    prompt: str | list[int] | None = None  # completions: text, or token ids


def _number(data: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = data.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    finite = not isinstance(value, float) or math.isfinite(value)
    if isinstance(value, bool) or not isinstance(value, kinds) or not finite:
        raise bad(f"'{name}' must be {'an integer' if integer else 'a number'}, got {json.dumps(value)}", name)
    if not low <= value <= high:
        raise bad(f"'{name}' must be between {low:g} and {high:g}, got {value}", name)
    return value


def _flag(data: dict, name: str) -> bool:
    value = data.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false, got {json.dumps(value)}", name)
    return value


def _common(data: dict, allowed: set[str]) -> CompletionParams:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise bad(f"Unrecognized request argument supplied: {', '.join(unknown)}", unknown[0])
    if "model" in data and not isinstance(data["model"], str):
        raise bad("'model' must be a string", "model")
    if _number(data, "n", 1, 1, 1, integer=True) != 1:
        raise bad("only n=1 is supported", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(data, name, 0, -2, 2) != 0:
            raise bad(f"'{name}' is not supported (only 0)", name)
    if "user" in data and data["user"] is not None and not isinstance(data["user"], str):
        raise bad("'user' must be a string", "user")
    temperature = _number(data, "temperature", 1.0, 0, 2)
    temperature = 0.0 if temperature < MIN_TEMPERATURE else float(temperature)
    top_p = _number(data, "top_p", 1.0, 0, 1)
    if top_p == 0:
        raise bad("'top_p' must be above 0", "top_p")
    seed = _number(data, "seed", None, -(2**63), 2**63 - 1, integer=True)
    sampling = SamplingParams(temperature=temperature, top_p=float(top_p),
                              seed=None if seed is None else seed % (MAX_SEED + 1))
    stop = data.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("'stop' must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in stop):
        raise bad(f"'stop' takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_LENGTH} characters", "stop")
    stream = _flag(data, "stream")
    options = data.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad("'stream_options' must be an object with 'include_usage'", "stream_options")
        if not stream:
            raise bad("'stream_options' is only allowed with stream: true", "stream_options")
        include_usage = _flag(options, "include_usage")
    return CompletionParams(max_tokens=None, sampling=sampling, stop=[clean(s) for s in stop if s], stream=stream,
                            include_usage=include_usage)


def _max_tokens(data: dict, names: tuple[str, ...], default: int | None) -> int | None:
    for name in names:
        if data.get(name) is not None:
            return _number(data, name, None, 1, 2**31 - 1, integer=True)
    return default


def _content(value, index: int) -> str:
    """A message's content: a string, or a list of text parts (what newer clients send)."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, list):
        parts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{index}].content: only text parts are supported", "messages")
            parts.append(clean(part["text"]))
        return "".join(parts)
    raise bad(f"messages[{index}].content must be a string or a list of text parts", "messages")


def parse_chat(data: dict) -> CompletionParams:
    params = _common(data, CHAT_FIELDS)
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"messages[{i}] needs a role ({', '.join(ROLES)})", "messages")
        extra = set(m) - {"role", "content", "name", "reasoning_content"}
        if extra:
            raise bad(f"messages[{i}]: unsupported field(s) {', '.join(sorted(extra))}", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        content = "" if m.get("content") is None and role == "assistant" else _content(m.get("content"), i)
        out.append({"role": role, "content": content})
    params.messages = out
    params.max_tokens = _max_tokens(data, ("max_completion_tokens", "max_tokens"), None)
    if _flag(data, "logprobs"):
        params.top_logprobs = _number(data, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)
    elif data.get("top_logprobs") is not None:
        raise bad("'top_logprobs' needs logprobs: true", "top_logprobs")
    return params


def parse_completion(data: dict) -> CompletionParams:
    params = _common(data, COMPLETION_FIELDS)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise bad("'prompt' must be a string, or a list of token ids (one prompt per request)", "prompt")
    elif not isinstance(prompt, str) or not prompt:
        raise bad("'prompt' must be a non-empty string", "prompt")
    params.prompt = clean(prompt) if isinstance(prompt, str) else prompt
    params.max_tokens = _max_tokens(data, ("max_tokens",), 16)  # OpenAI's default for completions
    if _flag(data, "echo"):
        raise bad("'echo' is not supported", "echo")
    if data.get("suffix") not in (None, ""):
        raise bad("'suffix' is not supported", "suffix")
    logprobs = data.get("logprobs")
    if logprobs is not None and logprobs is not False:
        params.top_logprobs = _number(data, "logprobs", 0, 0, 5, integer=True)
    return params


# -- responses ---------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprobs(tokens, token_text) -> dict:
    """Chat's logprobs object: per token, its text, bytes, logprob and the top alternatives."""
    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [dict(entry(t.id, t.logprob), top_logprobs=[entry(i, lp) for i, lp in t.top])
                        for t in tokens], "refusal": None}


def completion_logprobs(tokens, token_text, offset: int = 0) -> dict:
    """The legacy completions logprobs object: parallel lists, top_logprobs as {text: logprob}; text_offset
    counts the tokens' own texts from `offset`."""
    texts = [token_text(t.id) for t in tokens]
    offsets, at = [], offset
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{token_text(i): lp for i, lp in t.top} for t in tokens], "text_offset": offsets}


def envelope(kind: str, ident: str, model: str, choices: list, extra: dict | None = None) -> dict:
    out = {"id": ident, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    out.update(extra or {})
    return out
