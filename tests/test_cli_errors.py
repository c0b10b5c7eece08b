"""Bad input: one line on stderr, a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmcli import __version__
from llmcli.demo import ensure_demo


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def demo_copy(tmp_path):
    """A private copy of the demo checkpoint that a test may damage."""
    target = tmp_path / "model"
    shutil.copytree(ensure_demo("demo-qwen"), target)
    return target


def test_help_lists_commands_and_version(run_cli):
    code, out, _ = run_cli("--help")
    assert code == 0
    for command in ("download", "generate", "chat", "trace", "bench"):
        assert command in out
    code, out, _ = run_cli("--version")
    assert code == 0 and __version__ in out


def test_nonexistent_path(run_cli, tmp_path):
    code, _, err = run_cli("generate", str(tmp_path / "nope"), "-p", "hi")
    assert_one_line_error(code, err, "nope")


def test_directory_without_config(run_cli, tmp_path):
    code, _, err = run_cli("generate", str(tmp_path), "-p", "hi")
    assert_one_line_error(code, err, "config.json")


def test_truncated_safetensors(run_cli, demo_copy):
    weights = demo_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    code, _, err = run_cli("generate", str(demo_copy), "-p", "hi")
    assert_one_line_error(code, err, "model.safetensors")


def test_garbage_safetensors(run_cli, demo_copy):
    (demo_copy / "model.safetensors").write_bytes(b"\x00not a safetensors file at all")
    code, _, err = run_cli("generate", str(demo_copy), "-p", "hi")
    assert_one_line_error(code, err, "model.safetensors")


def test_unknown_model_type_lists_supported(run_cli, demo_copy):
    config = json.loads((demo_copy / "config.json").read_text())
    config["model_type"] = "mistral"  # (llama is supported since GGUF support: Qwen2's layout without q/k/v bias)
    (demo_copy / "config.json").write_text(json.dumps(config))
    line = assert_one_line_error(*run_cli("generate", str(demo_copy), "-p", "hi")[::2], "mistral")
    assert "qwen2" in line and "qwen3" in line


def test_missing_tensor_is_named(run_cli, demo_copy):
    tensors = load_file(demo_copy / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, demo_copy / "model.safetensors")
    code, _, err = run_cli("generate", str(demo_copy), "-p", "hi")
    assert_one_line_error(code, err, "model.layers.1.mlp.up_proj.weight")


def test_misshaped_tensor_names_tensor_and_file(run_cli, demo_copy):
    tensors = load_file(demo_copy / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, demo_copy / "model.safetensors")
    code, _, err = run_cli("generate", str(demo_copy), "-p", "hi")
    assert_one_line_error(code, err, "model.norm.weight", "model.safetensors", "(7,)")


def test_unexpected_tensor(run_cli, demo_copy):
    tensors = load_file(demo_copy / "model.safetensors")
    tensors["model.layers.9.extra.weight"] = torch.ones(3)
    save_file(tensors, demo_copy / "model.safetensors")
    code, _, err = run_cli("generate", str(demo_copy), "-p", "hi")
    assert_one_line_error(code, err, "model.layers.9.extra.weight")


def test_prompt_longer_than_context(run_cli, demo_copy):
    config = json.loads((demo_copy / "config.json").read_text())
    config["max_position_embeddings"] = 16
    (demo_copy / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli("generate", str(demo_copy), "--raw", "-p", "word " * 40)
    assert_one_line_error(code, err, "context")


@pytest.mark.parametrize("flag,value", [("--device", "tpu"), ("--dtype", "float8"), ("--temperature", "hot")])
def test_bad_flag_values(run_cli, flag, value):
    code, _, err = run_cli("generate", "-p", "hi", flag, value)
    assert code == 2
    assert_one_line_error(code, err, flag)


def test_unknown_option(run_cli):
    code, _, err = run_cli("generate", "--frobnicate")
    assert code == 2
    assert_one_line_error(code, err, "--frobnicate")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(run_cli):
    code, _, err = run_cli("generate", "-p", "hi", "--device", "cuda")
    assert code == 2
    assert_one_line_error(code, err, "CUDA")


def test_unknown_alias(run_cli):
    code, _, err = run_cli("generate", "no-such-model-alias", "-p", "hi")
    assert_one_line_error(code, err, "no-such-model-alias")


def test_pickle_only_directory_is_refused(run_cli, demo_copy):
    (demo_copy / "model.safetensors").rename(demo_copy / "pytorch_model.bin")
    code, _, err = run_cli("generate", str(demo_copy), "-p", "hi")
    assert_one_line_error(code, err, "pickle")
