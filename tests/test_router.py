"""Qwen MoE routers in the bfloat16 kernel's panels (backends/router.PanelRouter): where they are swapped in, that
their logits are torch's within one bfloat16 step, and that they pick the experts torch's product picks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from llmcli.backends import bf16_kernel
from llmcli.backends.router import PanelRouter, op_weight, swap_routers
from llmcli.loader import load_model
from llmcli.models.qwen_moe import TopKRouter
from tests.test_decode_layer import reference

needs_kernel = pytest.mark.skipif(not bf16_kernel.available()[0], reason="llmcli's bfloat16 kernel does not run here")


def router(experts: int, hidden: int, dtype=torch.bfloat16, scale: float = 0.5) -> TopKRouter:
    cfg = SimpleNamespace(hidden_size=hidden, n_routed_experts=experts, num_experts_per_tok=4, norm_topk_prob=True)
    module = TopKRouter(cfg)
    with torch.no_grad():
        module.weight.copy_(torch.randn(experts, hidden, generator=torch.Generator().manual_seed(experts)) * scale)
    return module.to(dtype)


@needs_kernel
@pytest.mark.parametrize("experts,hidden,rows", [(128, 2048, 1), (60, 96, 3), (8, 64, 17), (130, 32, 2)])
def test_panel_logits_are_torchs_within_one_bfloat16_step(experts, hidden, rows):
    """Whole and padded panels (60, 8 and 130 experts), one row to a prompt's worth."""
    plain = router(experts, hidden)
    x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(1)).bfloat16()
    panels = PanelRouter(plain)
    ours, torchs = panels.logits(x), F.linear(x, plain.weight)
    assert ours.shape == torchs.shape == (rows, experts) and ours.dtype == torch.bfloat16
    exact = (x.double() @ plain.weight.double().T)
    # one bfloat16 step at that size, and float32's rounding of the sum's terms (where they cancel)
    step = torch.finfo(torch.bfloat16).eps * exact.abs() + 1e-5 * (x.double().abs() @ plain.weight.double().abs().T)
    assert ((ours.double() - exact).abs() <= step).all()
    assert (ours == torchs).float().mean() >= 0.95  # the order of the float32 sums rarely shows after rounding


@needs_kernel
def test_panel_router_picks_torchs_experts():
    plain = router(128, 256, scale=1.0)  # a sharp router: no near-ties for rounding to flip
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)).bfloat16()
    ours, torchs = PanelRouter(plain)(x), plain(x)
    assert torch.equal(ours.experts, torchs.experts)
    torch.testing.assert_close(ours.weights, torchs.weights, rtol=0.02, atol=0)


@needs_kernel
def test_swap_takes_bfloat16_cpu_routers_only():
    model = torch.nn.ModuleDict({"a": router(16, 64), "b": router(16, 64, dtype=torch.float32),
                                 "c": torch.nn.ModuleDict({"gate": router(8, 64)})})
    assert swap_routers(model) == 2
    assert type(model["a"]) is PanelRouter and type(model["c"]["gate"]) is PanelRouter
    assert type(model["b"]) is TopKRouter  # float32: the kernel holds bfloat16 only
    panels, count = op_weight(model["c"]["gate"])
    assert panels.dim() == 4 and count == 8
    weight, count = op_weight(model["b"])
    assert weight is model["b"].weight and count == 16


@needs_kernel
def test_loaded_bfloat16_moe_models_route_through_panels(tmp_path_factory):
    name, path = reference("tests.test_qwen_moe", "qwen3_moe", {}, tmp_path_factory)
    bf16 = load_model(name, path, device="cpu", dtype="bfloat16").runner.model
    gates = [m.mlp.gate for m in bf16.modules() if getattr(m, "is_moe", False)]
    assert gates and all(type(g) is PanelRouter for g in gates)
    fp32 = load_model(name, path, device="cpu", dtype="float32").runner.model
    assert all(type(m.mlp.gate) is TopKRouter for m in fp32.modules() if getattr(m, "is_moe", False))
