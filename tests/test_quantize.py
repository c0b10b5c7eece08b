"""Weight-only int8: reconstruction error, closeness to bfloat16, the size `show` reports."""

from __future__ import annotations

import json

import pytest
import torch

from llmcli.backends import int8_kernel
from llmcli.backends.int8 import Int8Linear, quantize_weight, weight_bytes
from llmcli.demo import ensure_demo
from llmcli.loader import load_model


def test_reconstruction_error_is_within_half_a_step():
    w = torch.randn(64, 300, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    error = (q.float() * scale[:, None] - w).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()  # rounding to the nearest of 255 levels per row
    assert torch.allclose(q.float().abs().amax(1), torch.full((64,), 127.0))  # each row uses the full range


def test_blocked_quantisation_in_chunks_equals_whole_matrix_blocks():
    from llmcli.backends.int8_kernel import to_blocks

    w = torch.randn(56, 32, generator=torch.Generator().manual_seed(1))
    q, scale = quantize_weight(w)
    q_blocks, scale_blocks = quantize_weight(w, blocked=True, chunk_elements=24 * 32)  # 3 chunks of 24 rows
    assert torch.equal(q_blocks, to_blocks(q)) and torch.equal(scale_blocks, scale)
    assert torch.equal(quantize_weight(w, chunk_elements=100)[0], q)  # chunks smaller than a block


def test_layers_are_quantised_as_they_load(monkeypatch):
    """Each decoder layer is fused and quantised once, as soon as its tensors are in, so the whole model is
    never held in bfloat16; what is outside the layers (the head) is done at the end."""
    from llmcli.backends.prepare import Preparation

    calls = []
    original = Preparation.prepare_part

    def spy(self, module, prefix=""):
        linears = sum(isinstance(m, torch.nn.Linear) and not isinstance(m, Int8Linear) for m in module.modules())
        calls.append((prefix, linears))
        original(self, module, prefix)

    monkeypatch.setattr(Preparation, "prepare_part", spy)
    loaded = load_model("demo-qwen", ensure_demo("demo-qwen"), device="cpu", dtype="bfloat16", quantize="int8")
    layers = loaded.config.num_layers
    assert [prefix for prefix, _ in calls] == sorted(f"model.layers.{i}." for i in range(layers)) + [""]
    assert all(linears > 0 for _, linears in calls[:-1])
    assert calls[-1][1] == 1  # at the end only the head is left to quantise
    assert not any(type(m) is torch.nn.Linear for m in loaded.model.modules())


@pytest.mark.parametrize("rows", [1, 5, 15, 40])  # 1, 5: decoding (the int8 kernel); 15, 40: prompts
@pytest.mark.parametrize("out_features", [96, 100])  # 100 rows do not fit the kernel's blocks of 8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_equals_the_dequantised_product(dtype, out_features, rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, out_features, bias=True).to(dtype)
    kernel = int8_kernel.available()[0]
    layer = Int8Linear(linear, kernel=kernel)
    assert layer.blocked == (kernel and out_features % 8 == 0)
    assert layer.int8_weight().shape == (out_features, 128)
    x = torch.randn(1, rows, 128, dtype=dtype)
    dequantised = (layer.int8_weight().float() * layer.scales.float()[:, None])
    expected = x.float() @ dequantised.T + linear.bias.float()
    tolerance = 1e-5 if dtype == torch.float32 else 0.02
    assert (layer(x).float() - expected).abs().max() <= tolerance * expected.abs().max()


@pytest.mark.parametrize("name", ["demo-qwen", "demo-deepseek"])
def test_int8_model_stays_close_to_bfloat16(name, monkeypatch):
    monkeypatch.setenv("LLMCLI_PREPACK", "0")  # plain tensors, so weight_bytes can count them
    from llmcli.backends.linear import prepacking_available

    prepacking_available.cache_clear()
    path = ensure_demo(name)
    try:
        bf16 = load_model(name, path, device="cpu", dtype="bfloat16").runner
        int8 = load_model(name, path, device="cpu", dtype="bfloat16", quantize="int8").runner
    finally:
        prepacking_available.cache_clear()
    assert any(isinstance(m, Int8Linear) for m in int8.model.modules())
    assert weight_bytes(int8.model) < 0.7 * weight_bytes(bf16.model)
    ids = torch.arange(3, 43)[None]
    with torch.inference_mode():
        a, b = bf16(ids, bf16.make_cache(1, 40)), int8(ids, int8.make_cache(1, 40))
    cosine = torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0)
    assert cosine > 0.99


def test_show_reports_the_int8_size(run_cli, monkeypatch):
    monkeypatch.setenv("LLMCLI_PREPACK", "0")
    from llmcli.backends.linear import prepacking_available

    prepacking_available.cache_clear()
    try:
        model = load_model("demo-qwen", ensure_demo("demo-qwen"), device="cpu", dtype="float32", quantize="int8").model
    finally:
        prepacking_available.cache_clear()
    code, out, err = run_cli("show", "demo-qwen", "--json")
    assert code == 0, err
    sizes = json.loads(out)["weight_bytes"]
    buffers = {n: b for n, b in model.named_buffers() if n != "inv_freq"}  # rope frequencies are not weights
    actual = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(buffers.values()))
    assert sizes["int8"] == actual
    from safetensors.torch import load_file

    checkpoint = load_file(ensure_demo("demo-qwen") / "model.safetensors")
    assert sizes["float32"] == sum(t.numel() * 4 for t in checkpoint.values())


def test_moe_experts_are_quantised_one_by_one_before_their_layer(monkeypatch):
    """A DeepSeek-V3 MoE layer is 22 GB in bfloat16: each expert is quantised as soon as it is loaded."""
    from llmcli.backends.prepare import Preparation

    calls = []
    original = Preparation.prepare_part

    def spy(self, module, prefix=""):
        calls.append(prefix)
        original(self, module, prefix)

    monkeypatch.setattr(Preparation, "prepare_part", spy)
    loaded = load_model("demo-deepseek", ensure_demo("demo-deepseek"), device="cpu", dtype="bfloat16", quantize="int8")
    cfg = loaded.config
    for layer in range(cfg.num_layers):
        prefix = f"model.layers.{layer}."
        experts = [c for c in calls if c.startswith(prefix + "mlp.experts.")]
        if cfg.is_moe_layer(layer):
            assert sorted(experts) == sorted(f"{prefix}mlp.experts.{e}." for e in range(cfg.n_routed_experts))
            assert max(calls.index(e) for e in experts) < calls.index(prefix)  # all experts, then the layer
        else:
            assert experts == []


def test_weight_bytes_counts_shared_storage_once():
    """Experts viewing into a stack (the compiled MoE step) and tied heads hold no memory of their own."""
    module = torch.nn.Module()
    stack = torch.zeros(4, 8)
    module.register_buffer("stack", stack)
    module.first, module.second = torch.nn.Parameter(stack[0]), torch.nn.Parameter(stack[1])
    module.other = torch.nn.Parameter(torch.zeros(3))
    assert weight_bytes(module) == (32 + 3) * 4
