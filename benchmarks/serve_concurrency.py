"""Load test for `llmcli serve`: one client against 16 concurrent streaming clients.

Starts `llmcli serve MODEL --port 0 --max-batch N` in a subprocess and drives it with the openai client:

1. sequential: each prompt alone, one after the other (decode throughput of one client; reference tokens);
2. concurrent: all prompts at once, streaming (total decode throughput; every stream must be complete and
   its tokens equal to the sequential run's);
3. time to first token of a new request while the others decode, against the same request alone.

    python benchmarks/serve_concurrency.py                      # demo-qwen, 16 clients
    python benchmarks/serve_concurrency.py qwen2.5-0.5b-instruct --clients 16 --tokens 64
    python benchmarks/serve_concurrency.py --engine             # also the engine alone, without HTTP
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time

import openai


def start_server(model: str, batch: int, context: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "llmcli", "serve", model, "--port", "0", "--max-batch", str(batch),
                             "--max-context", str(context), *extra], stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        match = re.search(r"at (http://\S+)/v1 ", line)
        if match:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep draining
            return proc, match.group(1)
    raise SystemExit("the server did not start")


def stream(client, prompt: str, tokens: int, first: list | None = None) -> tuple[list[str], str, float]:
    """One streaming greedy completion: (tokens, finish reason, seconds from the first token to the end)."""
    start = time.perf_counter()
    got, finish, t_first = [], None, None
    for chunk in client.completions.create(model="m", prompt=prompt, max_tokens=tokens, temperature=0, logprobs=0,
                                           stream=True):
        choice = chunk.choices[0]
        if choice.logprobs and choice.logprobs.tokens:
            if t_first is None:
                t_first = time.perf_counter()
                if first is not None:
                    first.append(t_first - start)
            got += choice.logprobs.tokens
        finish = choice.finish_reason or finish
    return got, finish, time.perf_counter() - (t_first or start)


def engine_only(model: str, n: int, tokens: int) -> None:
    """The batching engine in this process, without HTTP: what batching itself gives (the HTTP run adds the
    server's event loop and the clients, on the same machine)."""
    from llmcli import hub
    from llmcli.loader import load_model
    from llmcli.serve.batcher import Done, Engine, Request

    resolved = hub.resolve(model)
    loaded = load_model(resolved.name, resolved.path)
    engine = Engine(loaded.runner, loaded.tokenizer, max_batch=n, max_context=1024)
    engine.start()

    def run(count: int) -> float:
        done = [threading.Event() for _ in range(count)]
        start = time.perf_counter()
        for i in range(count):
            ids = loaded.tokenizer.encode(f"Request {i}: tell me about caches")
            engine.submit(Request(ids, tokens, lambda e, d=done[i]: isinstance(e, Done) and d.set()))
        for d in done:
            d.wait()
        return count * tokens / (time.perf_counter() - start)

    run(1)
    one, many = run(1), run(n)
    engine.stop()
    print(f"engine only ({model}): one request {one:.1f} tok/s, {n} at once {many:.1f} tok/s total: "
          f"{many / one:.1f}x (prefill included, EOS ignored)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="demo-qwen")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per reply")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `llmcli serve` flag (repeatable)")
    parser.add_argument("--engine", action="store_true", help="also measure the engine alone, in this process")
    args = parser.parse_args()
    n = args.clients
    if args.engine:
        engine_only(args.model, n, args.tokens)
    prompts = [f"Request {i}: tell me about caches and attention " + "and tokens " * (i % 5) for i in range(n)]
    proc, url = start_server(args.model, n, 1024, args.serve_arg)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    try:
        stream(client, "warm up", 4)
        t0 = time.perf_counter()
        sequential = [stream(client, p, args.tokens) for p in prompts]
        seq_seconds = time.perf_counter() - t0
        one_client = sum(len(s[0]) for s in sequential) / sum(s[2] for s in sequential)

        results: list = [None] * n
        barrier = threading.Barrier(n + 1)

        def worker(i: int) -> None:
            barrier.wait()
            results[i] = stream(client, prompts[i], args.tokens)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        total = sum(len(r[0]) for r in results)
        complete = all(r[1] in ("length", "stop") for r in results)
        equal = [r[0] for r in results] == [s[0] for s in sequential]

        alone: list[float] = []
        stream(client, prompts[0], 8, alone)
        busy_first: list[float] = []
        started: list[float] = []
        others = [threading.Thread(target=stream, args=(client, p, args.tokens * 4, started)) for p in prompts[1:]]
        for t in others:
            t.start()
        while len(started) < n - 1:  # all of them decoding
            time.sleep(0.01)
        stream(client, prompts[0], 8, busy_first)
        for t in others:
            t.join()
    finally:
        proc.terminate()
        proc.wait(30)

    print(f"model {args.model}, {n} clients, {args.tokens} tokens each (greedy)")
    print(f"one client:  {one_client:7.1f} tok/s decode ({seq_seconds:.1f} s for {n} requests in turn)")
    print(f"{n} clients: {total / wall:7.1f} tok/s total ({wall:.1f} s, {total} tokens): "
          f"{total / wall / one_client:.1f}x one client")
    print(f"every stream complete: {complete}; tokens equal to sequential greedy runs: {equal}")
    print(f"time to first token: {alone[0] * 1000:.0f} ms alone, {busy_first[0] * 1000:.0f} ms while {n - 1} decode")


if __name__ == "__main__":
    main()
