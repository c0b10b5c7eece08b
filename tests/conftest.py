"""Shared test fixtures: an isolated llmcli cache, in-process CLI runs, tiny checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from llmcli.cli import main

_SAVED_ENVIRON: dict[str, str] = {}
_TEST_FILES: list[Path] = []  # the session's temporary folder


def pytest_configure(config):
    """Before collection: test modules ask at import whether llmcli's kernels build (their skip marks), which
    builds them, and that must happen in the test home, not the user's cache (where the test processes then
    built them a second time)."""
    _SAVED_ENVIRON.update(os.environ)
    base = Path(tempfile.mkdtemp(prefix="llmcli-tests-"))
    _TEST_FILES.append(base)
    # LLMCLI_KERNEL_BUILD=wait: every test runs the kernels this CPU has, not torch's paths while they build;
    # LLMCLI_CROSSOVER=fixed: products leave the kernels at the same row counts on every machine, unmeasured
    os.environ.update({"LLMCLI_HOME": str(base / "llmcli-home"), "HF_HOME": str(base / "hf-home"),
                       "HF_HUB_OFFLINE": "1", "LLMCLI_KERNEL_BUILD": "wait",
                       "LLMCLI_CROSSOVER": "fixed"})
    for name in ("LLMCLI_MODEL", "HF_TOKEN"):
        os.environ.pop(name, None)


def pytest_unconfigure(config):
    os.environ.clear()
    os.environ.update(_SAVED_ENVIRON)
    for base in _TEST_FILES:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def llmcli_home() -> Path:
    """The whole session's llmcli home (set before collection, see pytest_configure)."""
    return Path(os.environ["LLMCLI_HOME"])


@pytest.fixture(scope="session")
def hf_home() -> Path:
    return Path(os.environ["HF_HOME"])


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, llmcli_home, hf_home):
    """Every test uses a private llmcli cache (shared within the session so demos build once)
    and an empty Hugging Face cache, with no model chosen by the environment."""
    monkeypatch.setenv("LLMCLI_HOME", str(llmcli_home))
    monkeypatch.setenv("HF_HOME", str(hf_home))
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
        # -O1: these tests check the loops' results, not their speed (-O3 took 37 s to build here, -O1 26)
        cpu_kernels.compile_library("llmcli_portable_test", ["-O1", "-march=x86-64", "-fopenmp"])
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
    AMD before Zen 4 and Intel client CPUs run (the native build, on such a CPU). Skipped where this CPU cannot
    run them."""
    import platform

    from llmcli.backends import cpu_kernels
    from llmcli.doctor import cpu_flags

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64-v3 is an x86 target")
    missing = {"avx2", "fma", "bmi2", "movbe"} - cpu_flags()
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(sorted(missing))}: it cannot run x86-64-v3 code")
    if "avx512f" not in cpu_flags() and cpu_kernels.load_once()[0]:
        # Without AVX-512 the native build takes the same paths (the kernels choose by __AVX2__, __FMA__, __F16C__
        # and __AVX512F__): a second build would test nothing more, and costs half a minute.
        return torch.ops.llmcli
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


@pytest.fixture(params=["native", "baseline", "avx2"])
def kernel_build(request):
    """The kernels llmcli loads here, then the baseline (plain C++ loops) and AVX2 builds: ops in their namespaces."""
    if request.param == "native":
        from llmcli.backends import cpu_kernels

        built, note = cpu_kernels.load_once()
        if not built:
            pytest.skip(f"llmcli's CPU kernels could not be built here: {note}")
        return torch.ops.llmcli
    return request.getfixturevalue("portable_ops" if request.param == "baseline" else "avx2_ops")
