"""`llmcli serve`: an OpenAI-compatible HTTP server for one model (uvicorn + Starlette, `llmcli.serve`)."""

from __future__ import annotations

import socket
import time

import typer

from llmcli.cli.app import app
from llmcli.cli.common import (
    DEVICE_OPT,
    DTYPE_OPT,
    FORCE_OPT,
    MODEL_ARG,
    QUANTIZE_OPT,
    YES_OPT,
    Device,
    DType,
    Quantize,
    err_console,
    human_bytes,
    load_model,
)
from llmcli.errors import LlmcliError

DEFAULT_CONTEXT = 4096  # tokens per request when --max-context is not given (the model's own, if smaller)
DRAIN_SECONDS = 5  # Ctrl-C lets running requests finish for this long


def serving_context(loaded, requested: int | None) -> int:
    """Tokens per sequence: --max-context, else min(model, 4096). Original Qwen stays within its training
    length: past it, dynamic NTK picks a RoPE base per prompt length, which rows of one batch cannot share."""
    limit = loaded.runner.context_limit
    if loaded.config.family == "qwen" and loaded.config.seq_length:
        limit = min(limit, int(loaded.config.seq_length))
    if requested is None:
        return min(limit, DEFAULT_CONTEXT)
    if not 2 <= requested <= limit:
        raise LlmcliError(f"--max-context must be between 2 and {limit} for this model", exit_code=2)
    return requested


def listen(host: str, port: int) -> socket.socket:
    """Bind before loading the server, so a busy port is one clear error (and --port 0 picks a free one)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise LlmcliError(f"cannot resolve --host {host}: {exc.strerror}", exit_code=2) from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise LlmcliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def log_line(text: str) -> None:
    err_console.print(f"{time.strftime('%H:%M:%S')} {text}", style="dim", markup=False)


@app.command("serve")
def serve_command(
    model: str | None = MODEL_ARG,
    host: str = typer.Option("127.0.0.1", "--host",
                             help="Address to listen on; 0.0.0.0 exposes the server to the network (use --api-key)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0 picks a free one)."),
    api_key: str | None = typer.Option(None, "--api-key",
                                       help="Require 'Authorization: Bearer KEY' on /v1 requests (401 otherwise)."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, max=256,
                                  help="Requests decoded together in one step; more wait in the queue."),
    max_context: int | None = typer.Option(None, "--max-context", min=2,
                                           help="Tokens per request, prompt + reply (default: min(model, 4096))."),
    max_queue: int = typer.Option(64, "--max-queue", min=0,
                                  help="Requests waiting for a free batch slot; beyond it, 503 with Retry-After."),
    max_body: int = typer.Option(4 * 1024 * 1024, "--max-body", min=1024, help="Largest request body in bytes (413)."),
    device: Device = DEVICE_OPT,
    dtype: DType = DTYPE_OPT,
    yes: bool = YES_OPT,
    quantize: Quantize | None = QUANTIZE_OPT,
    force: bool = FORCE_OPT,
) -> None:
    """Serve a model over the OpenAI API: /v1/chat/completions, /v1/completions, /v1/models, /health.

    Concurrent requests share decode steps (continuous batching). Examples:

      llmcli serve qwen2.5-0.5b-instruct --port 8000

      llmcli serve demo-qwen --host 0.0.0.0 --api-key secret --max-batch 16

    Then point any OpenAI client at http://127.0.0.1:8000/v1 (e.g. base_url= in the openai package)."""
    import uvicorn

    from llmcli.serve.app import Served, create_app
    from llmcli.serve.batcher import Engine

    sock = listen(host, port)
    try:
        loaded = load_model(model, device, dtype, yes=yes, quantize=quantize, force=force, answers=True)
        context = serving_context(loaded, max_context)
        engine = Engine(loaded.runner, loaded.tokenizer, max_batch=max_batch, max_context=context,
                        max_queue=max_queue, log=log_line)
        served = Served.from_loaded(loaded, context)
        server = draining_server(uvicorn.Config(
            create_app(engine, served, api_key, max_body, log_line), log_level="warning", access_log=False,
            timeout_graceful_shutdown=DRAIN_SECONDS, lifespan="off"), engine)
        bound_host, bound_port = sock.getsockname()[:2]
        url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        url = f"http://{url_host}:{bound_port}"
        cache_bytes = engine.cache.bytes_per_token() * context * max_batch
        err_console.print(f"serving {loaded.name} at {url}/v1 (batch {max_batch}, context {context} tokens, "
                          f"KV cache {human_bytes(cache_bytes)}, {loaded.device.type}, "
                          f"{str(loaded.dtype).removeprefix('torch.')})", markup=False)
        auth = f' -H "Authorization: Bearer {api_key}"' if api_key else ""
        err_console.print(f"try: curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
                          f"-d '{{\"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'",
                          markup=False, style="dim")
        if served.chat_tokenizer is None:
            err_console.print(f"note: no chat template ({served.chat_error}); /v1/completions only",
                              style="yellow", markup=False)
        err_console.print("Ctrl-C stops (running requests get a few seconds to finish)", style="dim")
        engine.start()
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: stopping is the normal end here
            pass
        finally:
            engine.stop()
    finally:
        sock.close()
    err_console.print("server stopped", style="dim")


def draining_server(config, engine):
    """A uvicorn server that says, on Ctrl-C, how many requests it lets finish."""
    import uvicorn

    class Draining(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                load = engine.load
                busy = load["running"] + load["waiting"]
                err_console.print(f"stopping: {busy} request{'s' * (busy != 1)} in flight get up to "
                                  f"{DRAIN_SECONDS} s to finish (Ctrl-C again to quit now)", style="yellow")
            super().handle_exit(sig, frame)

    return Draining(config)
