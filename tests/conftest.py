"""Shared test fixtures: an isolated llmcli cache, in-process CLI runs, tiny checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from llmcli.cli import main


@pytest.fixture(scope="session", autouse=True)
def llmcli_home(tmp_path_factory) -> Path:
    """Set for the whole session, so module-scoped fixtures never touch the user's real caches."""
    home = tmp_path_factory.mktemp("llmcli-home")
    saved = dict(os.environ)
    # LLMCLI_KERNEL_BUILD=wait: every test runs the kernels this CPU has, not torch's paths while they build
    os.environ.update({"LLMCLI_HOME": str(home), "HF_HOME": str(tmp_path_factory.getbasetemp() / "hf-home"),
                       "HF_HUB_OFFLINE": "1", "LLMCLI_KERNEL_BUILD": "wait"})
    for name in ("LLMCLI_MODEL", "HF_TOKEN"):
        os.environ.pop(name, None)
    yield home
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, llmcli_home, tmp_path_factory):
    """Every test uses a private llmcli cache (shared within the session so demos build once)
    and an empty Hugging Face cache, with no model chosen by the environment."""
    monkeypatch.setenv("LLMCLI_HOME", str(llmcli_home))
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LLMCLI_MODEL", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture(scope="session")
def portable_ops():
    """llmcli's CPU kernels built for the x86-64 baseline (SSE2), as torch.ops.llmcli_portable_test: the
    plain C++ loops that CPUs without AVX2 (or another ISA the kernels know) run."""
    import platform

    from llmcli.backends import cpu_kernels

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 is an x86 target")
    try:
        cpu_kernels.compile_library("llmcli_portable_test", ["-O3", "-march=x86-64", "-fopenmp"])
    except cpu_kernels.KernelBuildError as exc:
        pytest.skip(f"no baseline x86-64 build: {exc}")
    return torch.ops.llmcli_portable_test


@pytest.fixture
def run_cli(capsys):
    """Run `llmcli ARGS...` in-process: returns (exit_code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session")
def avx2_ops():
    """llmcli's CPU kernels built for x86-64-v3 (AVX2 + FMA, no AVX-512), as torch.ops.llmcli_avx2_test: what
    AMD before Zen 4 and Intel client CPUs run. Skipped where this CPU cannot run them."""
    import platform

    from llmcli.backends import cpu_kernels
    from llmcli.doctor import cpu_flags

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64-v3 is an x86 target")
    missing = {"avx2", "fma", "bmi2", "movbe"} - cpu_flags()
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(sorted(missing))}: it cannot run x86-64-v3 code")
    try:
        cpu_kernels.compile_library("llmcli_avx2_test", ["-O3", "-march=x86-64-v3", "-fopenmp"])
    except cpu_kernels.KernelBuildError as exc:
        pytest.skip(f"no x86-64-v3 build: {exc}")
    return torch.ops.llmcli_avx2_test


def write_byte_tokenizer(directory: Path, vocab_size: int, chat_template: str | None = None) -> None:
    """A tokenizer.json whose ids all fit in `vocab_size`: the demo's byte-level BPE, trained smaller."""
    from llmcli.demo import build_demo_tokenizer, write_tokenizer
    from llmcli.templates import CHATML_TEMPLATE

    tok = build_demo_tokenizer(vocab_size=min(vocab_size, 512))
    write_tokenizer(directory, tok, chat_template or CHATML_TEMPLATE)


def save_hf_model(model, directory: Path, vocab_size: int | None = None) -> Path:
    """Save a transformers model as safetensors with a small tokenizer next to it."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    write_byte_tokenizer(directory, vocab_size or model.config.vocab_size)
    # transformers writes generation_config.json with eos ids we did not ask for: keep tests explicit.
    gen = directory / "generation_config.json"
    if gen.exists():
        data = json.loads(gen.read_text())
        data.pop("eos_token_id", None)
        gen.write_text(json.dumps(data))
    return directory


def seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)
