"""bfloat16 linears where no bfloat16 path is fast (no native bfloat16 products, llmcli's kernel not built,
no oneDNN prepacking): prompts multiply in float32, few rows stay in bfloat16 (backends/linear.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmcli.backends.int8 import bf16_matmul_is_fast
from llmcli.backends.linear import FLOAT32_PROMPT_ROWS, Float32PromptLinear
from llmcli.backends.prepare import pack_linears
from llmcli.demo import ensure_demo
from llmcli.loader import load_model


def test_prompts_in_float32_few_rows_in_bfloat16():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40).to(torch.bfloat16)
    product = Float32PromptLinear(linear)
    few, many = torch.randn(FLOAT32_PROMPT_ROWS, 96).bfloat16(), torch.randn(37, 96).bfloat16()
    assert torch.equal(product(few), linear(few))
    expected = F.linear(many.float(), linear.weight.float(), linear.bias.float()).bfloat16()
    assert product(many).dtype == torch.bfloat16 and torch.equal(product(many), expected)
    assert (product(many).float() - linear(many).float()).abs().max() <= 2**-7 * linear(many).float().abs().max()


def test_swapped_in_only_where_asked_and_not_for_kept_weights():
    model = nn.ModuleDict({"a": nn.Linear(32, 16).bfloat16(), "kept": nn.Linear(32, 16).bfloat16(),
                           "f32": nn.Linear(32, 16)})
    assert pack_linears(model, kernel=False, prepack=False, keep=lambda name: name == "kept",
                        float32_prompts=True) == 1
    assert isinstance(model["a"], Float32PromptLinear) and type(model["kept"]) is nn.Linear
    assert type(model["f32"]) is nn.Linear
    plain = nn.ModuleDict({"a": nn.Linear(32, 16).bfloat16()})
    assert pack_linears(plain, kernel=False, prepack=False) == 0


@pytest.mark.skipif(bf16_matmul_is_fast(), reason="this CPU multiplies bfloat16 natively: its GEMM is kept")
def test_a_model_without_fast_bfloat16_paths_runs_prompts_in_float32(monkeypatch):
    monkeypatch.setenv("LLMCLI_BF16_KERNEL", "0")
    monkeypatch.setenv("LLMCLI_PREPACK", "0")
    path = ensure_demo("demo-qwen")
    runner = load_model("demo-qwen", path, device="cpu", dtype="bfloat16").runner
    swapped = [m for m in runner.model.modules() if isinstance(m, Float32PromptLinear)]
    assert swapped and all(m.label == "F.linear (prompts in float32)" for m in swapped)
    ids = torch.arange(3, 40)[None]
    with torch.inference_mode():
        logits = runner(ids, runner.make_cache(1, 48))[0].float()
    monkeypatch.setattr("llmcli.backends.prepare.bf16_matmul_is_fast", lambda: True)  # as on AVX512-BF16
    plain = load_model("demo-qwen", path, device="cpu", dtype="bfloat16").runner
    assert not any(isinstance(m, Float32PromptLinear) for m in plain.model.modules())
    with torch.inference_mode():
        expected = plain(ids, plain.make_cache(1, 48))[0].float()
    assert (logits - expected).abs().max() <= 0.05 * expected.abs().max()
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
