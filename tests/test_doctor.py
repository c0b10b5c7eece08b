"""`llmcli doctor`, `run`, `pull`, shell completion, --help examples and the lone positional prompt."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from llmcli.backends import int_dot
from llmcli.cli.app import app
from llmcli.cli.examples import EXAMPLES
from llmcli.errors import LlmcliError
from llmcli.hub import model_and_prompt


def test_doctor_json_has_every_section(run_cli):
    code, out, err = run_cli("doctor", "--json")
    assert code == 0, err
    report = json.loads(out)
    for key in ("cpu", "compiler", "kernel_cache", "torch", "products", "memory", "bandwidth", "storage", "models",
                "findings"):
        assert key in report, key
    assert set(report["products"]) == {"float32", "bfloat16", "int8", "int5", "int4"}
    int5 = report["products"]["int5"]["products"]
    assert any(label.startswith("int5 kernel") for label in int5) == int_dot.runs_fast()
    assert report["bandwidth"]["bytes_per_s"] > 0
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    assert report["cpu"]["features"]["avx2"] == (" avx2 " in flags.replace("\n", " "))
    assert all(f["topic"] and f["fact"] for f in report["findings"])


def test_doctor_second_run_uses_the_cached_bandwidth(run_cli):
    run_cli("doctor", "--json")
    code, out, _ = run_cli("doctor", "--json")
    assert code == 0
    bandwidth = json.loads(out)["bandwidth"]
    assert bandwidth["source"] == "cached" and bandwidth["measured_at"]


@pytest.mark.parametrize("precision", ["bfloat16", "int8", "int4"])
def test_doctor_products_agree_with_bench(precision):
    """The labels doctor reports per precision are those `bench` counts on a loaded model."""
    from llmcli import bench, doctor
    from llmcli.demo import ensure_demo
    from llmcli.loader import load_model

    quantize = precision if precision.startswith("int") else None
    loaded = load_model("demo-qwen", ensure_demo("demo-qwen"), device="cpu", dtype="bfloat16", quantize=quantize)
    expected = set(bench.product_paths(loaded.runner))
    assert set(doctor.product_paths(loaded.device)[precision]["products"]) == expected


def test_doctor_table(run_cli):
    code, out, _ = run_cli("doctor")
    assert code == 0
    for topic in ("cpu", "compiler", "bfloat16 products", "int8 products", "int4 products", "bandwidth", "memory",
                  "models"):
        assert topic in out


@pytest.mark.parametrize(("products", "failed"), [
    ({"int8 kernel": 97}, False),
    ({"int8 kernel (x int8 activations, AVX2 + VNNI)": 97}, False),  # the kernel's integer path
    ({"torch int8": 97}, True),
])
def test_doctor_says_the_int8_kernel_failed_only_when_no_product_runs_it(monkeypatch, products, failed):
    from llmcli import doctor

    paths = {"int8": {"products": products, "notes": []}}
    monkeypatch.setattr(doctor, "product_paths", lambda device, remeasure: paths)
    report = doctor.Report()
    doctor.products_section(report, torch.device("cpu"))
    (finding,) = report.findings
    assert ("the int8 kernel did not build" in finding.advice) == failed, finding


@pytest.mark.parametrize(("model", "prompt", "expected"), [
    ("What is 2+2?", None, (None, "What is 2+2?")),
    ("Hello", None, (None, "Hello")),
    ("demo-qwen", None, ("demo-qwen", None)),
    ("Qwen/Qwen2.5-0.5B-Instruct", None, ("Qwen/Qwen2.5-0.5B-Instruct", None)),
    ("qwen2.5-0.5b-instruct", None, ("qwen2.5-0.5b-instruct", None)),
    ("model.gguf", None, ("model.gguf", None)),
    ("ollama:qwen2.5:7b", None, ("ollama:qwen2.5:7b", None)),
    ("demo-qwen", "Hi", ("demo-qwen", "Hi")),
])
def test_a_lone_positional_that_cannot_be_a_model_is_the_prompt(model, prompt, expected):
    assert model_and_prompt(model, prompt) == expected


def test_an_existing_directory_is_a_model(tmp_path):
    assert model_and_prompt(str(tmp_path), None) == (str(tmp_path), None)


def test_a_near_miss_of_an_alias_is_an_error_not_a_prompt():
    with pytest.raises(LlmcliError, match="did you mean 'qwen2.5-0.5b-instruct'"):
        model_and_prompt("qwen2.5-0.5b-instruc", None)


def test_generate_takes_the_prompt_alone(run_cli, monkeypatch):
    monkeypatch.setenv("LLMCLI_MODEL", "demo-qwen")
    code, out, err = run_cli("generate", "Say something", "-n", "5", "--json")
    assert code == 0, err
    alone = json.loads(out)
    code, out, err = run_cli("generate", "demo-qwen", "Say something", "-n", "5", "--json")
    assert code == 0, err
    assert json.loads(out)["token_ids"] == alone["token_ids"] and alone["model"] == "demo-qwen"


def test_run_with_a_prompt_answers_once_as_generate_does(run_cli):
    code, run_out, err = run_cli("run", "demo-qwen", "Tell me", "-n", "6")
    assert code == 0, err
    code, gen_out, err = run_cli("generate", "demo-qwen", "Tell me", "-n", "6")
    assert code == 0, err
    assert run_out == gen_out and run_out.strip()


def test_run_without_a_prompt_chats(run_cli, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nAgain\n"))
    code, run_out, err = run_cli("run", "demo-qwen", "-n", "4")
    assert code == 0, err
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nAgain\n"))
    code, chat_out, err = run_cli("chat", "demo-qwen", "-n", "4")
    assert code == 0, err
    assert run_out == chat_out and len(run_out.strip().splitlines()) >= 2


def test_pull_is_download(run_cli):
    code, out, err = run_cli("pull", "demo-qwen")
    assert code == 0, err
    assert "built in" in err and out.strip()


def test_every_command_help_ends_with_examples(run_cli):
    names = [info.name for info in app.registered_commands]
    assert {"doctor", "run", "pull"} <= set(names)
    for name in names:
        code, out, _ = run_cli(name, "--help")
        assert code == 0
        tail = out[out.rindex("Examples:"):]
        assert EXAMPLES[name][0] in " ".join(tail.split()), name


def test_shell_completion_script_and_answers(tmp_path):
    # `--show-completion` prints the script of the shell it detects among the parent processes (none under some
    # launchers); the completion variable names the shell outright.
    script = subprocess.run([sys.executable, "-m", "llmcli"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "_LLMCLI_COMPLETE": "source_bash"})
    assert script.returncode == 0, script.stderr
    assert "_LLMCLI_COMPLETE" in script.stdout and "complete" in script.stdout
    env = {**os.environ, "_LLMCLI_COMPLETE": "complete_bash", "COMP_WORDS": "llmcli do", "COMP_CWORD": "1"}
    answer = subprocess.run([sys.executable, "-m", "llmcli"], capture_output=True, text=True, timeout=120, env=env)
    assert {"doctor", "download"} <= set(answer.stdout.split()), answer.stderr

