"""The HTTP side of `llmcli serve`: Starlette routes speaking the OpenAI API over the batching engine.

Handlers validate (protocol.py), render the chat template in a worker thread (the sandboxed template can
take a moment), submit to the engine and relay its events, as server-sent events or one JSON object. A
client that goes away cancels its request: the engine frees its row at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from llmcli.chat import THINK_OPEN, ThinkSplitter, chat_stop_ids, chat_tokenizer, opens_reasoning
from llmcli.errors import LlmcliError
from llmcli.serve import protocol
from llmcli.serve.batcher import Done, Engine, Piece, QueueFull
from llmcli.serve.batcher import Request as EngineRequest
from llmcli.serve.protocol import ApiError, CompletionParams, bad

DEFAULT_MAX_BODY = 4 * 1024 * 1024  # bytes of JSON a request may send
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


@dataclass
class Served:
    """What the routes need to know about the model being served."""

    name: str
    tokenizer: object  # the model's tokenizer (raw prompts)
    chat_tokenizer: object | None  # the one whose template renders chats; None: no chat template
    chat_error: str  # why chat is unavailable, when it is
    stop_ids: frozenset[int]  # raw completions
    chat_stop_ids: frozenset[int]
    vocab_size: int
    max_context: int
    reasoning: bool  # the tokenizer knows <think>: split the reply into reasoning_content and content

    @classmethod
    def from_loaded(cls, loaded, max_context: int) -> Served:
        tok = loaded.tokenizer
        stops = tok.stop_token_ids(loaded.config.eos_token_ids)
        try:
            chat_tok, error = chat_tokenizer(tok, loaded.config.family), ""
        except LlmcliError as exc:
            chat_tok, error = None, str(exc)
        template = (chat_tok.chat_template or "") if chat_tok is not None else ""
        return cls(loaded.name, tok, chat_tok, error, frozenset(stops),
                   frozenset(chat_stop_ids(chat_tok, stops) if chat_tok is not None else stops),
                   loaded.config.vocab_size, max_context,
                   tok.token_to_id(THINK_OPEN) is not None or THINK_OPEN in template)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


class Channel:
    """Engine events delivered to the request's event loop (the engine calls `emit` from its thread)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def emit(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is gone
            pass


def create_app(engine: Engine, served: Served, api_key: str | None = None, max_body: int = DEFAULT_MAX_BODY,
               log: Callable[[str], None] | None = None) -> Starlette:
    log = log or (lambda line: None)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "Incorrect API key provided", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def read_json(request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > max_body):
            raise ApiError(413, f"the body is over {max_body} bytes", code="request_too_large")
        body = bytearray()
        try:
            async for part in request.stream():
                body += part
                if len(body) > max_body:
                    raise ApiError(413, f"the body is over {max_body} bytes", code="request_too_large")
        except ClientDisconnect:
            raise ApiError(400, "the client went away") from None
        return protocol.parse_json(bytes(body))

    def budget(prompt_ids: list[int], params: CompletionParams) -> int:
        n = len(prompt_ids)
        if n >= served.max_context:
            raise bad(f"This model's maximum context length is {served.max_context} tokens. However, your "
                      f"prompt has {n} tokens (raise --max-context to serve longer ones)",
                      "messages" if params.messages is not None else "prompt", "context_length_exceeded")
        room = served.max_context - n
        return room if params.max_tokens is None else min(params.max_tokens, room)

    def submit(prompt_ids, params: CompletionParams, stop_ids) -> tuple[EngineRequest, Channel]:
        channel = Channel()
        job = EngineRequest(prompt_ids, budget(prompt_ids, params), channel.emit, stop_ids, params.sampling,
                            params.stop, params.top_logprobs)
        try:
            engine.submit(job)
        except QueueFull:
            raise ApiError(503, "the server is busy: too many requests are waiting; retry shortly",
                           kind="server_error", code="overloaded", headers={"Retry-After": "1"}) from None
        return job, channel

    def log_done(path: str, done: Done) -> None:
        rate = done.completion_tokens / done.seconds if done.seconds else 0.0
        log(f"{path} prompt {done.prompt_tokens} tok, reply {done.completion_tokens} tok in {done.seconds:.2f} s "
            f"({rate:.1f} tok/s), first token after {done.first_token_seconds:.2f} s, {done.finish_reason}"
            + (f": {done.error}" if done.error else ""))

    async def events(request: Request, job: EngineRequest, channel: Channel):
        """The engine's events for `job` until Done; a client that leaves cancels the job. (A streaming
        client that leaves is also noticed when the next chunk cannot be sent: `sse` cancels then.)"""
        finished = False
        try:
            while True:
                if not channel.queue.empty():
                    event = channel.queue.get_nowait()
                else:
                    try:
                        event = await asyncio.wait_for(channel.queue.get(), DISCONNECT_POLL_S)
                    except asyncio.TimeoutError:  # nothing to send for a while (queued, or a long prompt)
                        if await request.is_disconnected():
                            log(f"{request.url.path}: the client went away; request cancelled")
                            return
                        continue
                # Pieces that queued up while the client was being written to go out as one (fewer chunks to
                # encode and parse when many streams share the event loop).
                while isinstance(event, Piece) and not channel.queue.empty():
                    following = channel.queue.get_nowait()
                    if isinstance(following, Done):
                        yield event
                        event = following
                        break
                    event = Piece(event.text + following.text, event.tokens + following.tokens)
                if isinstance(event, Done):
                    finished = True
                    log_done(request.url.path, event)
                yield event
                if finished:
                    return
        finally:
            if not finished:
                engine.cancel(job)

    # -- chat ------------------------------------------------------------------------------------

    async def chat_completions(request: Request):
        check_key(request)
        params = protocol.parse_chat(await read_json(request))
        if served.chat_tokenizer is None:
            raise bad(f"{served.name} cannot chat: {served.chat_error}; use /v1/completions", "messages")

        def render():
            try:
                text = served.chat_tokenizer.apply_chat_template(params.messages, add_generation_prompt=True)
            except LlmcliError as exc:
                raise bad(f"the chat template failed: {exc}", "messages") from None
            return text, served.chat_tokenizer.encode(text)

        text, ids = await run_in_threadpool(render)
        job, channel = submit(ids, params, served.chat_stop_ids)
        splitter = ThinkSplitter(thinking=opens_reasoning(text)) if served.reasoning else None
        ident = protocol.new_id("chatcmpl")
        if params.stream:
            return sse(chat_stream(request, job, channel, params, splitter, ident), lambda: engine.cancel(job))
        return JSONResponse(await chat_whole(request, job, channel, params, splitter, ident))

    def split(splitter: ThinkSplitter | None, text: str, final: bool = False) -> tuple[str, str]:
        """(reasoning, content) of a piece of reply text."""
        if splitter is None:
            return "", text
        parts = splitter.feed(text) + (splitter.flush() if final else [])
        return "".join(t for r, t in parts if r), "".join(t for r, t in parts if not r)

    async def chat_whole(request, job, channel, params, splitter, ident) -> dict:
        reasoning, content, tokens, done = [], [], [], None
        async for event in events(request, job, channel):
            if isinstance(event, Piece):
                r, c = split(splitter, event.text)
                reasoning.append(r)
                content.append(c)
                tokens += event.tokens
            else:
                done = event
        if done is None:  # the client left
            return {}
        r, c = split(splitter, "", final=True)
        reasoning.append(r)
        content.append(c)
        check_done(done)
        message = {"role": "assistant", "content": "".join(content)}
        if "".join(reasoning):
            message["reasoning_content"] = "".join(reasoning)
        choice = {"index": 0, "message": message, "finish_reason": done.finish_reason,
                  "logprobs": protocol.chat_logprobs(tokens, served.token_text) if params.top_logprobs is not None
                  else None}
        return protocol.envelope("chat.completion", ident, served.name, [choice],
                                 {"usage": protocol.usage(done.prompt_tokens, done.completion_tokens)})

    async def chat_stream(request, job, channel, params, splitter, ident):
        def chunk(delta: dict, finish=None, logprobs=None) -> dict:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
            return protocol.envelope("chat.completion.chunk", ident, served.name, [choice])

        yield chunk({"role": "assistant", "content": ""})
        async for event in events(request, job, channel):
            if isinstance(event, Piece):
                r, c = split(splitter, event.text)
                logprobs = (protocol.chat_logprobs(event.tokens, served.token_text)
                            if params.top_logprobs is not None and event.tokens else None)
                if r or c or logprobs:
                    yield chunk({**({"reasoning_content": r} if r else {}), **({"content": c} if c or not r else {})},
                                logprobs=logprobs)
                continue
            r, c = split(splitter, "", final=True)
            if r or c:
                yield chunk({**({"reasoning_content": r} if r else {}), **({"content": c} if c else {})})
            if event.finish_reason == "error":
                yield protocol.error_body(f"generation failed: {event.error}", "server_error")
                return
            yield chunk({}, finish=event.finish_reason)
            if params.include_usage:
                yield protocol.envelope("chat.completion.chunk", ident, served.name, [],
                                        {"usage": protocol.usage(event.prompt_tokens, event.completion_tokens)})

    # -- completions -------------------------------------------------------------------------------

    async def completions(request: Request):
        check_key(request)
        params = protocol.parse_completion(await read_json(request))
        if isinstance(params.prompt, list):
            if any(not 0 <= t < served.vocab_size for t in params.prompt):
                raise bad(f"token ids must be in [0, {served.vocab_size})", "prompt")
            ids = params.prompt
        else:
            ids = await run_in_threadpool(served.tokenizer.encode_prompt, params.prompt)
            if not ids:
                raise bad("the prompt is empty once tokenized", "prompt")
        job, channel = submit(ids, params, served.stop_ids)
        ident = protocol.new_id("cmpl")
        if params.stream:
            return sse(completion_stream(request, job, channel, params, ident), lambda: engine.cancel(job))
        text, tokens, done = [], [], None
        async for event in events(request, job, channel):
            if isinstance(event, Piece):
                text.append(event.text)
                tokens += event.tokens
            else:
                done = event
        if done is None:
            return JSONResponse({})
        check_done(done)
        choice = {"index": 0, "text": "".join(text), "finish_reason": done.finish_reason,
                  "logprobs": protocol.completion_logprobs(tokens, served.token_text)
                  if params.top_logprobs is not None else None}
        return JSONResponse(protocol.envelope("text_completion", ident, served.name, [choice],
                                              {"usage": protocol.usage(done.prompt_tokens, done.completion_tokens)}))

    async def completion_stream(request, job, channel, params, ident):
        offset = 0
        async for event in events(request, job, channel):
            if isinstance(event, Piece):
                logprobs = (protocol.completion_logprobs(event.tokens, served.token_text, offset)
                            if params.top_logprobs is not None else None)
                offset += sum(len(served.token_text(t.id)) for t in event.tokens)
                yield protocol.envelope("text_completion", ident, served.name,
                                        [{"index": 0, "text": event.text, "finish_reason": None, "logprobs": logprobs}])
                continue
            if event.finish_reason == "error":
                yield protocol.error_body(f"generation failed: {event.error}", "server_error")
                return
            yield protocol.envelope("text_completion", ident, served.name,
                                    [{"index": 0, "text": "", "finish_reason": event.finish_reason, "logprobs": None}])
            if params.include_usage:
                yield protocol.envelope("text_completion", ident, served.name, [],
                                        {"usage": protocol.usage(event.prompt_tokens, event.completion_tokens)})

    # -- the rest ----------------------------------------------------------------------------------

    def check_done(done: Done) -> None:
        if done.finish_reason == "error":
            raise ApiError(500, f"generation failed: {done.error}", kind="server_error")

    async def models(request: Request):
        check_key(request)
        return JSONResponse({"object": "list", "data": [
            {"id": served.name, "object": "model", "created": started, "owned_by": "llmcli",
             "max_context": served.max_context}]})

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": served.name, **engine.load})

    async def api_error(request: Request, exc: ApiError):
        if exc.status >= 400:
            log(f"{request.method} {request.url.path} {exc.status}: {exc.message}")
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def http_error(request: Request, exc: HTTPException):
        message = "not found" if exc.status_code == 404 else exc.detail
        return JSONResponse(protocol.error_body(f"{request.method} {request.url.path}: {message}"),
                            status_code=exc.status_code, headers=exc.headers)

    async def internal_error(request: Request, exc: Exception):
        log(f"{request.method} {request.url.path} 500: {type(exc).__name__}: {exc}")
        return JSONResponse(protocol.error_body(f"internal error: {type(exc).__name__}", "server_error"),
                            status_code=500)

    started = int(time.time())
    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={ApiError: api_error, HTTPException: http_error,
                                                        Exception: internal_error})


def sse(chunks, on_close: Callable[[], None]) -> StreamingResponse:
    """Server-sent events: one `data: JSON` per chunk, then `data: [DONE]`. `on_close` runs however the
    stream ends (a finished job ignores it)."""

    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            on_close()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
