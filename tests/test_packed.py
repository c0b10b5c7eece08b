"""oneDNN-prepacked bfloat16 linears on CPU (where llmcli's bfloat16 kernel does not run): same results as
F.linear, bit for bit."""

from __future__ import annotations

import pytest
import torch

from llmcli.backends.linear import PackedLinear, prepacking_available
from llmcli.backends.prepare import pack_linears
from llmcli.demo import ensure_demo
from llmcli.loader import load_model

pytestmark = pytest.mark.skipif(not prepacking_available(), reason="torch build without oneDNN")


@pytest.fixture(autouse=True)
def _without_bf16_kernel(monkeypatch):
    """Where the bfloat16 kernel runs it takes precedence (tests/test_bf16_kernel.py): set it aside."""
    monkeypatch.setenv("LLMCLI_BF16_KERNEL", "0")


def test_packed_linear_is_bit_identical():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 160, bias=True).to(torch.bfloat16)
    for rows in (1, 3, 40):
        x = torch.randn(2, rows, 96, dtype=torch.bfloat16)
        assert torch.equal(PackedLinear(linear)(x), linear(x))


@pytest.mark.parametrize("name", ["demo-qwen", "demo-deepseek"])
def test_packed_model_matches_plain_bfloat16(name, monkeypatch):
    path = ensure_demo(name)
    packed = load_model(name, path, device="cpu", dtype="bfloat16").runner
    assert any(isinstance(m, PackedLinear) for m in packed.model.modules())
    monkeypatch.setenv("LLMCLI_PREPACK", "0")
    prepacking_available.cache_clear()
    try:
        plain = load_model(name, path, device="cpu", dtype="bfloat16").runner
    finally:
        prepacking_available.cache_clear()
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    ids = torch.arange(3, 43)[None]
    with torch.inference_mode():
        a_cache, b_cache = packed.make_cache(1, 48), plain.make_cache(1, 48)
        assert torch.equal(packed(ids, a_cache), plain(ids, b_cache))
        step = torch.tensor([[7]])
        assert torch.equal(packed(step, a_cache), plain(step, b_cache))


def test_tied_and_kept_weights_stay_plain():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "embed": torch.nn.Embedding(10, 8), "head": torch.nn.Linear(8, 10, bias=False),
        "kept": torch.nn.Linear(8, 8), "packed": torch.nn.Linear(8, 8),
    }).to(torch.bfloat16)
    model["head"].weight = model["embed"].weight
    assert pack_linears(model, kernel=False, prepack=True, keep=lambda name: name == "kept") == 1
    assert isinstance(model["packed"], PackedLinear)
    assert isinstance(model["head"], torch.nn.Linear) and isinstance(model["kept"], torch.nn.Linear)


def test_layers_are_reordered_as_they_load(monkeypatch):
    """Each decoder layer is reordered for oneDNN as soon as its tensors are in, so the plain and the
    reordered copies of the whole model never coexist (DeepSeek-V3 shape: peak 1.21x -> 1.11x)."""
    from llmcli.backends.prepare import Preparation

    packed_after_call = []
    original = Preparation.prepare_part

    def spy(self, module, prefix=""):
        original(self, module, prefix)
        packed_after_call.append((prefix, any(isinstance(m, PackedLinear) for m in module.modules())))

    monkeypatch.setattr(Preparation, "prepare_part", spy)
    loaded = load_model("demo-qwen", ensure_demo("demo-qwen"), device="cpu", dtype="bfloat16")
    layers = [call for call in packed_after_call if call[0]]
    assert len(layers) == loaded.config.num_layers and all(packed for _, packed in layers)
