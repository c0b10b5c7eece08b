"""`llmcli serve`: the real server (the CLI in a subprocess, or the app under an in-thread uvicorn) and the
real `openai` client. Greedy tokens of batched requests must equal those of requests run alone."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

from llmcli import hub
from llmcli.config_deepseek import indexer_settings
from llmcli.generate import Generation, SamplingParams
from llmcli.loader import load_model
from llmcli.serve import batcher
from llmcli.serve.app import Served, create_app
from llmcli.serve.batcher import Done, Engine, Piece, Request
from llmcli.templates import CHATML_TEMPLATE

KEY = "test-key"
STARTUP_S = 180  # generous: CI machines are slow; nothing here is timed


def wait_until(check, what: str, timeout: float = 60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class ServerProcess:
    """`llmcli serve ...` in a subprocess on a free port (--port 0; the banner says which)."""

    def __init__(self, *args: str):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH")]
                                                          if p))
        self.proc = subprocess.Popen([sys.executable, "-m", "llmcli", "serve", *args, "--port", "0"],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        match = wait_until(lambda: next((m for line in self.lines if (m := re.search(r"at (http://\S+)/v1 ", line))),
                                        None) or self.proc.poll() is not None, "the banner", STARTUP_S)
        assert match is not True and self.proc.poll() is None, "".join(self.lines)
        self.url = match.group(1)
        wait_until(lambda: self._healthy(), "/health", STARTUP_S)

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health").status_code == 200
        except httpx.HTTPError:
            return False

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health").json()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(60)
        self.reader.join(10)
        return code


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("demo-qwen", "--api-key", KEY, "--max-batch", "8", "--max-context", "256",
                        "--max-body", "65536")
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local():
    """The same demo model in this process: what a request must give when run alone."""
    resolved = hub.resolve("demo-qwen")
    return load_model(resolved.name, resolved.path, device="cpu")


def chat_prompt_ids(loaded, messages) -> list[int]:
    tok = loaded.tokenizer
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))


def greedy(loaded, ids, n, stop_ids=()) -> Generation:
    gen = Generation(loaded.runner, loaded.tokenizer, ids, n, stop_ids=stop_ids)
    for _ in gen:
        pass
    return gen


# -- the OpenAI client against the CLI's server --------------------------------------------------------


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["demo-qwen"]
    health = server.health()
    assert health["status"] == "ok" and health["model"] == "demo-qwen" and health["max_batch"] == 8
    assert any("curl http://" in line for line in server.lines)  # the startup banner's example


def test_chat_matches_a_local_run(client, local):
    messages = [{"role": "user", "content": "Hello, who are you?"}]
    reply = client.chat.completions.create(model="demo-qwen", messages=messages, max_tokens=12, temperature=0)
    ids = chat_prompt_ids(local, messages)
    alone = greedy(local, ids, 12, stop_ids=local.tokenizer.stop_token_ids(local.config.eos_token_ids))
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == alone.result.text
    assert choice.finish_reason == ("length" if len(alone.result.token_ids) == 12 else "stop")
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == len(alone.result.token_ids)
    assert reply.usage.total_tokens == len(ids) + len(alone.result.token_ids)


def test_completion_with_logprobs(client, local):
    out = client.completions.create(model="demo-qwen", prompt="The cache stores", max_tokens=6, temperature=0,
                                    logprobs=3)
    ids = local.tokenizer.encode_prompt("The cache stores")
    alone = greedy(local, ids, 6)
    choice = out.choices[0]
    assert choice.text == alone.result.text and choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 6
    lp = choice.logprobs
    assert lp.tokens == [local.tokenizer.decode([t]) for t in alone.result.token_ids]
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and chosen <= 0
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the most likely


def test_chat_stream_equals_whole_reply(client):
    kwargs = dict(model="demo-qwen", messages=[{"role": "user", "content": "Count to five"}], max_tokens=10,
                  temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_string_cuts_the_reply(client):
    base = client.completions.create(model="demo-qwen", prompt="Large language models", max_tokens=24,
                                     temperature=0).choices[0].text
    # A stop string from the middle of the reply, of ordinary characters.
    start = next(i for i in range(4, len(base) - 3) if "\ufffd" not in base[i:i + 3] and base[i:i + 3].strip())
    stop = base[start:start + 3]
    cut = client.completions.create(model="demo-qwen", prompt="Large language models", max_tokens=24,
                                    temperature=0, stop=[stop, "never appears"])
    assert cut.choices[0].text == base[:base.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="demo-qwen", prompt="Large language models", max_tokens=24,
                                         temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == base[:base.index(stop)]


def test_sampling_with_a_seed_repeats(client):
    kwargs = dict(model="demo-qwen", prompt="Attention is", max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text


def test_wrong_or_missing_key_is_401(server):
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.chat.completions.create(model="demo-qwen", messages=[{"role": "user", "content": "hi"}])
    for response in (err.value.response, httpx.get(f"{server.url}/v1/models")):  # wrong key, then none
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health").status_code == 200  # health needs no key


def test_parallel_streams_equal_sequential_ones(server, client):
    prompts = [f"Prompt number {i}: " + "tokens " * (i * 3) for i in range(8)]

    def run(prompt: str) -> tuple[str, list[str]]:
        chunks = client.completions.create(model="demo-qwen", prompt=prompt, max_tokens=16 + prompts.index(prompt),
                                           temperature=0, logprobs=0, stream=True)
        text, tokens = "", []
        for chunk in chunks:
            if chunk.choices:
                text += chunk.choices[0].text
                tokens += (chunk.choices[0].logprobs.tokens if chunk.choices[0].logprobs else [])
        return text, tokens

    sequential = [run(p) for p in prompts]
    before = server.health()["decode_steps"]
    results: list = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = run(prompts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results == sequential
    assert all(len(tokens) == 16 + i for i, (_, tokens) in enumerate(results))
    health = server.health()
    assert health["largest_batch"] >= 2  # they did share steps
    # Sharing steps: fewer steps than the requests' tokens added up.
    assert health["decode_steps"] - before < sum(16 + i for i in range(8))


BAD_REQUESTS = [
    # (path, body or raw bytes, status, param or code to find in the error)
    ("/v1/chat/completions", b"{not json", 400, "invalid_json"),
    ("/v1/chat/completions", b"[1, 2]", 400, "invalid_json"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "bogus": 1}, 400, "bogus"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 2}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "9"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": 1.5}, 400, "seed"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 5}, 400, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 400}]}, 400,
     "context_length_exceeded"),
    ("/v1/completions", {"prompt": [5] * 300}, 400, "context_length_exceeded"),
    ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 6}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "temperature": float("nan")}, 400, "invalid_json"),
    ("/v1/completions", {"prompt": "x" * 70000}, 413, "request_too_large"),
    ("/v1/nothing", {"prompt": "hi"}, 404, None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stop": "\ud800"}, 200, None),  # a lone surrogate
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\udcff!"}], "max_tokens": 2}, 200, None),
]


@pytest.mark.parametrize("path,body,status,where", BAD_REQUESTS)
def test_bad_requests_get_an_error_object(server, path, body, status, where):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    if isinstance(body, bytes):
        response = httpx.post(f"{server.url}{path}", content=body, headers=headers)
    else:  # NaN is not JSON: the server must say so, not crash
        response = httpx.post(f"{server.url}{path}", content=_json(body), headers=headers)
    assert response.status_code == status, response.text
    if status == 200:
        assert response.json()["usage"]["completion_tokens"] <= 2
        return
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if where is not None:
        assert where in (error["param"], error["code"]), error
    # ... and the server still answers.
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def _json(body) -> bytes:
    import json

    return json.dumps(body).encode()


# -- the app under an in-thread uvicorn: reasoning split, a full queue, a client that leaves -------------

THINK_TEMPLATE = CHATML_TEMPLATE.replace("{{ '<|im_start|>assistant\\n' }}",
                                         "{{ '<|im_start|>assistant\\n<think>\\n' }}")
THINK_SAMPLING = dict(temperature=0.1, top_p=1.0)


@pytest.fixture(scope="module")
def thinking():
    """demo-qwen with an R1-style template (the generation prompt opens <think>), and </think> made a
    likely reply: a random tiny model mostly repeats its input token A, so </think>'s (tied) embedding
    becomes A's, scaled to a logit 0.05 below A's; sampled at temperature 0.1 the reply then closes its
    reasoning soon. A seed for which it does mid-reply is picked here. One row and no queue."""
    resolved = hub.resolve("demo-qwen")
    loaded = load_model(resolved.name, resolved.path, device="cpu")
    loaded.tokenizer = loaded.tokenizer.with_chat_template(THINK_TEMPLATE)
    tok = loaded.tokenizer
    messages = [{"role": "user", "content": "Think first"}]
    ids = chat_prompt_ids(loaded, messages)
    with torch.inference_mode():
        logits = loaded.runner(torch.tensor([ids]), loaded.runner.make_cache(1, 64))[0, -1]
    top = int(logits.argmax())
    assert logits[top] > 0.5
    with torch.no_grad():
        embed = loaded.model.model.embed_tokens.weight  # tied: lm_head's too
        embed[tok.token_to_id("</think>")] = embed[top] * (1 - 0.05 / float(logits[top]))
    for seed in range(20):
        gen = Generation(loaded.runner, tok, ids, 12, SamplingParams(seed=seed, **THINK_SAMPLING))
        text = "".join(gen)
        reasoning, closed, content = text.partition("</think>")
        if closed and reasoning.strip("\n") and content.lstrip("\n"):
            break
    else:
        pytest.fail("no seed closed the reasoning mid-reply")
    engine = Engine(loaded.runner, tok, max_batch=1, max_context=4096, max_queue=0)
    app = create_app(engine, Served.from_loaded(loaded, 4096))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    engine.start()
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    wait_until(lambda: server.started, "the in-thread server")
    yield url, messages, seed, reasoning.strip("\n"), content.lstrip("\n")
    server.should_exit = True
    thread.join(30)
    engine.stop()
    sock.close()


def test_reasoning_split(thinking):
    url, messages, seed, reasoning, content = thinking
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    kwargs = dict(model="x", messages=messages, max_tokens=12, seed=seed, **THINK_SAMPLING)
    message = client.chat.completions.create(**kwargs).choices[0].message
    assert (message.reasoning_content, message.content) == (reasoning, content)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == reasoning
    assert "".join(d.content or "" for d in deltas) == content


def test_full_queue_is_503_and_a_client_that_leaves_frees_its_row(thinking):
    url = thinking[0]
    # Long enough to be running still when the next request comes: it is cancelled after one chunk.
    body = {"prompt": "Hello", "max_tokens": 4000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as response:
        lines = response.iter_lines()  # kept: a dropped iterator closes the connection
        assert next(lines).startswith("data: ")  # it holds the only row
        busy = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "overloaded"
    # The stream was closed after one chunk: its row is freed and the next request is served.
    wait_until(lambda: httpx.get(f"{url}/health").json()["running"] == 0, "the row to be freed")
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2


# -- the engine directly: batched rows give exactly what runs alone give ------------------------------


@pytest.mark.parametrize("name", ["demo-qwen", "demo-deepseek"])
def test_per_row_positions_step_matches_rows_run_alone(name):
    resolved = hub.resolve(name)
    loaded = load_model(resolved.name, resolved.path, device="cpu")
    runner = loaded.runner
    runner.model.derived_tensors()  # as the engine does: a static step reads them (DeepSeek's absorbed form)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15], [16, 17, 18, 19, 20]]
    with torch.inference_mode():
        cache = runner.make_cache(len(prompts), 32)
        for row, ids in enumerate(prompts):
            runner(torch.tensor([ids]), cache.row_cache(row))
        step_ids = torch.tensor([[21], [22], [23], [24]])
        positions = torch.tensor([[len(p)] for p in prompts])
        view = batcher.StaticView(cache, max(len(p) for p in prompts) + 1, rows=len(prompts))
        batched = runner.model(step_ids, positions, view)[:, -1]
        for row, ids in enumerate(prompts):  # as `generate` runs it: the prompt, then one eager step
            alone = runner.make_cache(1, 32)
            runner(torch.tensor([ids]), alone)
            expected = runner(torch.tensor([[21 + row]]), alone)[0, -1]
            torch.testing.assert_close(batched[row], expected, atol=1e-5, rtol=1e-5)


def engine_case(name: str, tmp_path):
    """A demo model, or one built here: a tiny Qwen3.5 (DeltaNet layers: a recurrent state per row) or DeepSeek-V3.2
    (sparse attention: each row's indexer keys, index_topk 8)."""
    if name == "tiny-qwen3_5":
        from tests.test_qwen_hybrid import build_reference

        build_reference("qwen3_5", tmp_path)
    elif name == "tiny-v32":
        from tests.test_deepseek_v32 import build_reference

        build_reference(tmp_path)
    else:
        resolved = hub.resolve(name)
        return load_model(resolved.name, resolved.path, device="cpu")
    return load_model(name, tmp_path, device="cpu")


def test_a_model_the_server_cannot_batch_is_refused_at_start(tmp_path):
    """DeepSeek-V4's compressed cache does not split into rows: `llmcli serve` says so in one line and exits, where
    every request would fail."""
    from tests.test_deepseek_v4 import build_reference

    build_reference(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "llmcli", "serve", str(tmp_path), "--port", "0", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "DeepSeek-V4 is not served here yet" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["demo-qwen", "demo-deepseek", "tiny-qwen3_5", "tiny-v32"])
def test_engine_joins_and_leaves_keep_greedy_tokens(name, monkeypatch, tmp_path):
    """Three rows for six requests of different lengths: requests queue, join while others decode (their
    prompts prefilled in chunks of 4 tokens, a recurrent state kept from the steps of the others) and leave at
    different steps (rows move, a new sequence's state starts empty). DeepSeek-V3.2's prompts are longer than its
    index_topk: every row's step selects among its keys."""
    monkeypatch.setattr(batcher, "PREFILL_CHUNK", 4)
    loaded = engine_case(name, tmp_path)
    tok = loaded.tokenizer
    prompts = [tok.encode(f"Request {i}: " + "the cache " * i) for i in range(6)]
    if loaded.config.family == "deepseek_v32":
        assert min(len(p) for p in prompts) > indexer_settings(loaded.config).topk
    lengths = [4, 11, 6, 13, 3, 8]
    alone = [greedy(loaded, p, n).result.token_ids for p, n in zip(prompts, lengths, strict=True)]
    engine = Engine(loaded.runner, tok, max_batch=3, max_context=128, max_queue=16)
    engine.start()
    got: list[list[int]] = [[] for _ in prompts]
    reasons: list = [None] * len(prompts)
    done = [threading.Event() for _ in prompts]

    def emit(i):
        def on(event):
            if isinstance(event, Piece):
                got[i].extend(t.id for t in event.tokens)
            else:
                reasons[i] = event.finish_reason if isinstance(event, Done) else event
                done[i].set()
        return on

    try:
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
            engine.submit(Request(p, n, emit(i), top_logprobs=0))
            if i == 1:  # the rest join while the first two decode
                wait_until(lambda: got[0], "the first tokens")
        for event in done:
            assert event.wait(120)
    finally:
        engine.stop()
    assert reasons == ["length"] * len(prompts)
    assert got == alone
    assert engine.max_rows_seen == 3


def test_cancelled_request_frees_its_row(local):
    engine = Engine(local.runner, local.tokenizer, max_batch=1, max_context=1024, max_queue=0)
    engine.start()
    try:
        events: list = []
        first = Request(local.tokenizer.encode("Hello"), 1000, events.append)
        engine.submit(first)
        wait_until(lambda: engine.load["running"] == 1, "the first request to run")
        with pytest.raises(batcher.QueueFull):  # one row, no queue
            engine.submit(Request([5], 4, events.append))
        engine.cancel(first)
        wait_until(lambda: engine.load["running"] == 0, "the row to be freed")
        assert not any(isinstance(e, Done) for e in events)  # a cancelled request is dropped, not finished
        finished = threading.Event()
        engine.submit(Request([5], 4, lambda e: isinstance(e, Done) and finished.set()))
        assert finished.wait(60)
    finally:
        engine.stop()


# -- last: Ctrl-C ---------------------------------------------------------------------------------------


def test_ctrl_c_lets_running_requests_finish(server):
    """Last in this file: it stops the module's server."""
    srv = server
    with httpx.stream("POST", f"{srv.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 20,
                                                                 "temperature": 0, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # running
        code = srv.stop()
        rest = list(lines)
    assert code == 0
    assert [line for line in rest if line][-1] == "data: [DONE]"  # it finished within the drain
    assert any("stopping: 1 request" in line for line in srv.lines)
    assert any("server stopped" in line for line in srv.lines)
