"""A first `llmcli generate` on a machine whose CPU kernels are not built yet answers on torch's paths and
leaves the build to a background process started when it ends; other commands (and LLMCLI_KERNEL_BUILD=wait)
wait for the build as before."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import save_hf_model, seeded

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    seeded(0)
    config = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    return save_hf_model(model, tmp_path_factory.mktemp("qwen2-kernels") / "model")


def generate(model: Path, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LLMCLI_KERNEL_BUILD"}  # the command's own default
    env.update(LLMCLI_HOME=str(home), PYTHONPATH=str(ROOT))
    # --quantize int8: the int8 kernel is wanted on every x86 CPU (the bf16 one only where it beats oneDNN)
    return subprocess.run([sys.executable, "-m", "llmcli", "generate", str(model), "-p", "hi", "-n", "2",
                           "--quantize", "int8", "--temperature", "0"], env=env, capture_output=True, text=True,
                          timeout=300)


def stop_builder(extensions: Path) -> None:
    """Kill the background build (the test need not wait 10-50 s for it); a later build cleans up after it."""
    for pid_file in extensions.glob("*.pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_first_answer_does_not_wait_for_the_kernel_build(tiny_qwen2, tmp_path):
    if not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"):
        pytest.skip("the kernels are x86-64 Linux builds")
    home = tmp_path / "home"
    extensions = home / "extensions"
    try:
        first = generate(tiny_qwen2, home)
        assert first.returncode == 0, first.stderr
        assert "CPU kernels are not built yet: this run uses torch's slower paths" in first.stderr, first.stderr
        logs = list(extensions.glob("llmcli_*.log"))
        assert len(logs) == 1, list(extensions.iterdir())
        deadline = time.time() + 60
        while "building in" not in logs[0].read_text():  # the builder started once the answer was given
            assert time.time() < deadline, logs[0].read_text()
            time.sleep(0.2)
        builder = int(logs[0].with_suffix(".pid").read_text())
        os.kill(builder, 0)  # alive: it outlived the run that started it

        second = generate(tiny_qwen2, home)  # while it builds: no second build, the same answer path
        assert second.returncode == 0, second.stderr
        assert "another llmcli process is building the CPU kernels" in second.stderr, second.stderr
        assert int(logs[0].with_suffix(".pid").read_text()) == builder
        assert first.stdout == second.stdout
    finally:
        stop_builder(extensions)


def test_an_unknown_kernel_build_mode_is_one_error_line(run_cli, monkeypatch, tiny_qwen2):
    monkeypatch.setenv("LLMCLI_KERNEL_BUILD", "later")
    code, out, err = run_cli("generate", str(tiny_qwen2), "-p", "hi", "-n", "1")
    assert code == 2 and "LLMCLI_KERNEL_BUILD must be one of wait, background, got 'later'" in err, err
    assert "Traceback" not in err
