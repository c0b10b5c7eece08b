"""Routed experts as grouped products (backends/grouped_experts.py) against the expert-by-expert loop: the
same layer on CPU in float32 and bfloat16, experts that get no token, and a DeepSeek-V3 checkpoint against
transformers with LLMCLI_EXPERT_PRODUCTS=grouped."""

from __future__ import annotations

import copy

import pytest
import torch

from llmcli.backends.grouped_experts import GroupedExperts, can_group, expert_offsets, grouped_mm_available
from llmcli.errors import LlmcliError
from llmcli.loader import load_model
from llmcli.models.hooks import RouterChoice
from llmcli.models.layers import Experts
from llmcli.options import Options

pytestmark = pytest.mark.skipif(not grouped_mm_available(), reason="this torch has no torch._grouped_mm")

HIDDEN, INTERMEDIATE, COUNT, K = 64, 32, 8, 3


def experts_layer(dtype: torch.dtype, seed: int = 0) -> Experts:
    torch.manual_seed(seed)
    layer = Experts(COUNT, HIDDEN, INTERMEDIATE)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2)
    for expert in layer:
        expert.fuse_projections()
    return layer.to(dtype).eval()


def choice_for(tokens: int, skip: tuple[int, ...] = (2, 5), seed: int = 1) -> RouterChoice:
    """Each token's K distinct experts, never the ones in `skip` (they get no rows), with weights."""
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(COUNT) if e not in skip])
    experts = torch.stack([allowed[torch.randperm(len(allowed), generator=gen)[:K]] for _ in range(tokens)])
    weights = torch.rand(tokens, K, generator=gen)
    return RouterChoice(experts=experts, weights=weights, scores=torch.zeros(tokens, COUNT))


def reference(layer: Experts, x: torch.Tensor, choice: RouterChoice) -> torch.Tensor:
    """float64, expert by expert."""
    exact = copy.deepcopy(layer).double()
    return Experts.forward(exact, x.double(), choice)


def test_offsets_count_rows_per_expert_including_empty_ones():
    ids = torch.tensor([3, 0, 3, 7, 0, 3])
    assert expert_offsets(ids, 8).tolist() == [2, 2, 2, 5, 5, 5, 5, 6]
    assert expert_offsets(ids, 8).dtype == torch.int32


def test_float32_matches_the_loop():
    layer = experts_layer(torch.float32)
    assert can_group(layer)
    x = torch.randn(11, HIDDEN)
    choice = choice_for(11)
    with torch.inference_mode():
        loop = layer(x, choice)
        grouped = GroupedExperts(copy.deepcopy(layer))(x, choice)
    torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-5)


def test_bfloat16_is_as_close_to_float64_as_the_loop():
    layer = experts_layer(torch.bfloat16)
    x = torch.randn(17, HIDDEN).bfloat16()
    choice = choice_for(17)
    with torch.inference_mode():
        exact = reference(layer, x, choice)
        loop_error = (layer(x, choice).double() - exact).abs().max().item()
        grouped = GroupedExperts(copy.deepcopy(layer))(x, choice)
    assert grouped.dtype == torch.bfloat16
    grouped_error = (grouped.double() - exact).abs().max().item()
    assert grouped_error <= 2 * loop_error + 1e-3, (grouped_error, loop_error)
    assert grouped_error < 0.05 * exact.abs().max().item()


def test_one_expert_takes_every_row():
    """All rows in one group, the other groups empty: offsets [0, .., N*K, ..]."""
    layer = experts_layer(torch.float32, seed=3)
    x = torch.randn(5, HIDDEN)
    choice = RouterChoice(experts=torch.tensor([[4]] * 5), weights=torch.ones(5, 1), scores=torch.zeros(5, COUNT))
    with torch.inference_mode():
        torch.testing.assert_close(GroupedExperts(copy.deepcopy(layer))(x, choice), layer(x, choice),
                                   rtol=1e-5, atol=1e-5)


def test_misaligned_or_quantised_experts_are_not_grouped():
    odd = Experts(2, 60, 30)  # float32 rows of 60 and 30 values: 240 and 120 bytes, the latter not 16-aligned
    for expert in odd:
        expert.fuse_projections()
    assert not can_group(odd)
    unfused = Experts(2, HIDDEN, INTERMEDIATE)  # no gate_up_proj
    assert not can_group(unfused)


def test_unknown_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LLMCLI_EXPERT_PRODUCTS", "fast")
    with pytest.raises(LlmcliError, match="LLMCLI_EXPERT_PRODUCTS must be one of auto, grouped, loop"):
        Options.from_env()


def test_deepseek_v3_grouped_matches_transformers(tmp_path):
    from tests.test_deepseek import CASES, build_reference, prompt_ids

    kind, overrides = CASES["v3"]
    reference_model = build_reference(kind, overrides, tmp_path)
    ids = prompt_ids(tmp_path)
    options = Options.from_env(device="cpu", dtype="float32", expert_products="grouped")
    runner = load_model("v3", tmp_path, options).runner
    grouped = [m for m in runner.model.modules() if isinstance(m, GroupedExperts)]
    assert grouped and all(m.label.startswith("stacked, grouped") for m in grouped)
    with torch.inference_mode():
        cache = runner.make_cache(1, len(ids) + 1)
        ours = runner(torch.tensor([ids]), cache)
        theirs = reference_model(torch.tensor([ids])).logits
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-4, atol=1e-4)
    loop = load_model("v3", tmp_path, options.replace(expert_products="loop")).runner
    assert not any(isinstance(m, GroupedExperts) for m in loop.model.modules())
