"""Sampling, stopping, streaming and the `generate` command's input/output modes."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch

from llmcli.demo import ensure_demo
from llmcli.generate import SamplingParams, apply_repetition_penalty, sample_next

transformers = pytest.importorskip("transformers")


def generate_json(run_cli, *args):
    code, out, err = run_cli("generate", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert sample_next(logits, SamplingParams()) == int(logits.argmax())
    gen = torch.Generator().manual_seed(1)
    assert sample_next(logits, SamplingParams(temperature=5.0, top_k=1), gen) == int(logits.argmax())
    assert sample_next(logits, SamplingParams(temperature=5.0, top_p=1e-6), gen) == int(logits.argmax())
    assert sample_next(logits, SamplingParams(temperature=5.0, min_p=0.999), gen) == int(logits.argmax())


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    gen = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, SamplingParams(temperature=1.0, top_k=2), gen) for _ in range(300)}
    assert draws == {0, 1}
    probs = torch.softmax(logits, -1)  # 0.64, 0.24, 0.09, ...: top_p 0.8 keeps the first two
    assert probs[0] < 0.8 < probs[0] + probs[1]
    draws = {sample_next(logits, SamplingParams(temperature=1.0, top_p=0.8), gen) for _ in range(300)}
    assert draws == {0, 1}


def test_sampling_is_reproducible_with_a_seed():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=1.0)
    a = [sample_next(logits, params, torch.Generator().manual_seed(7)) for _ in range(5)]
    b = [sample_next(logits, params, torch.Generator().manual_seed(7)) for _ in range(5)]
    assert a == b


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(4))
    history = torch.tensor([[3, 17, 17, 42, 99]])
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits[0], history[0], 1.3), expected[0])


@pytest.mark.parametrize("bad", [["--temperature", "-1"], ["--top-p", "0"], ["--min-p", "1.5"],
                                 ["--repetition-penalty", "0"]])
def test_bad_sampling_values(run_cli, bad):
    code, _, err = run_cli("generate", "-p", "hi", *bad)
    assert code == 2 and err.startswith("error: ") and bad[0] in err


def test_stop_string_truncates_and_reports_stop(run_cli):
    full = generate_json(run_cli, "--raw", "-p", "The cache stores", "-n", "24")
    text = full["text"]
    assert len(text) > 6
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = generate_json(run_cli, "--raw", "-p", "The cache stores", "-n", "24", "--stop", stop)
    assert cut["text"] == text[: text.index(stop)]
    assert cut["finish_reason"] == "stop"


def test_streamed_text_equals_json_text(run_cli):
    full = generate_json(run_cli, "demo-deepseek", "--raw", "-p", "Hello", "-n", "16")
    code, out, err = run_cli("generate", "demo-deepseek", "--raw", "-p", "Hello", "-n", "16")
    assert code == 0
    assert out == full["text"] + "\n"
    assert "tok/s" in err and "peak memory" in err  # the stats footer goes to stderr
    assert "random weights" in err  # the demo notice


def test_eos_stops_generation(run_cli, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(ensure_demo("demo-qwen"), model)
    first = generate_json(run_cli, model, "--raw", "-p", "Hello", "-n", "4")["token_ids"][0]
    config = json.loads((model / "config.json").read_text())
    config["eos_token_id"] = first
    (model / "config.json").write_text(json.dumps(config))
    result = generate_json(run_cli, model, "--raw", "-p", "Hello", "-n", "4")
    assert result["token_ids"] == [] and result["finish_reason"] == "stop"


def test_prompt_from_stdin_and_chat_default(run_cli, monkeypatch):
    raw = generate_json(run_cli, "--raw", "-p", "Hello", "-n", "2")
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello"))
    piped = generate_json(run_cli, "--raw", "-p", "-", "-n", "2")
    assert piped["token_ids"] == raw["token_ids"]
    chat = generate_json(run_cli, "-p", "Hello", "-n", "2")  # the demo has a template: chat is the default
    assert chat["prompt_tokens"] > raw["prompt_tokens"]
    system = generate_json(run_cli, "-p", "Hello", "-n", "2", "--system", "Be brief.")
    assert system["prompt_tokens"] != chat["prompt_tokens"]


def test_json_fields(run_cli):
    result = generate_json(run_cli, "-p", "Hi", "-n", "3")
    assert set(result) >= {"model", "prompt_tokens", "generated_tokens", "token_ids", "text", "finish_reason",
                           "prefill_tokens_per_s", "decode_tokens_per_s", "peak_memory_bytes"}
    assert result["generated_tokens"] == len(result["token_ids"]) == 3
    assert result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0


def test_demo_model_is_deterministic(tmp_path, monkeypatch):
    """Two fresh builds of the demo checkpoint are byte-identical."""
    first = ensure_demo("demo-qwen")
    monkeypatch.setenv("LLMCLI_HOME", str(tmp_path))
    second = ensure_demo("demo-qwen")
    assert first != second
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
