"""Weights moved into one 2 MiB-paged buffer at the end of preparation (`llmcli.backends.weight_arena`): the same
outputs, every weight in the buffer, tied weights and views kept, no old storage left alive, and no storage's worth
added to the load's peak."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmcli import machine
from llmcli.backends import weight_arena
from llmcli.demo import ensure_demo
from llmcli.loader import load_model

pytestmark = pytest.mark.skipif(machine.thp_mode() not in ("always", "madvise"),
                                reason="this kernel gives no transparent huge pages: the weights are not moved")


def arena_range(model) -> tuple[int, int]:
    mapping = model._weight_arena
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    return whole.data_ptr(), whole.data_ptr() + len(mapping)


def logits(model, ids) -> torch.Tensor:
    cache = model.make_cache(1, ids.shape[1] + 4)
    with torch.inference_mode():
        first = model(ids, cache.span(ids.shape[1]).positions, cache)
        step = model(first[:, -1:].argmax(-1), cache.span(1).positions, cache)
    return torch.cat([first, step], dim=1)


@pytest.mark.parametrize("dtype,quantize", [("bfloat16", None), ("bfloat16", "int8"), ("bfloat16", "int4"),
                                            ("float32", None)])
def test_a_loaded_model_reads_its_weights_from_the_arena_and_computes_the_same(monkeypatch, dtype, quantize):
    path = ensure_demo("demo-qwen")
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")  # the documented way to turn huge pages off: no arena
    plain = load_model("demo-qwen", path, device="cpu", dtype=dtype, quantize=quantize).model
    assert not hasattr(plain, "_weight_arena")
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE")
    moved = load_model("demo-qwen", path, device="cpu", dtype=dtype, quantize=quantize).model
    start, end = arena_range(moved)
    groups = weight_arena.weight_tensors(moved)
    assert len(groups) == 1  # one storage: nothing left on an old one
    for tensors in groups.values():
        for t in tensors:
            assert start <= t.data_ptr() < end
    assert "hg" in machine.mapping_fields(start + (2 << 20))["VmFlags"].split()  # asked for 2 MiB pages
    head, embedding = moved.lm_head, moved.model.embed_tokens
    if moved.config.tie_word_embeddings and dtype == "bfloat16" and quantize is None:
        assert next(head.buffers()).data_ptr() == embedding.weight.data_ptr()  # still tied
    torch.testing.assert_close(logits(moved, ids), logits(plain, ids), rtol=0, atol=0)


def test_views_and_their_bases_move_together():
    weight = torch.randn(64, 256)
    module = nn.Module()
    module.register_buffer("panels", weight.view(16, 4, 256))  # a view whose base holds the storage
    module.attribute = (weight[8:],)  # a tensor kept as an attribute, as an op's gathered arguments are
    expected = weight.clone()
    weight_arena.move_into_arena(module)
    start, end = arena_range(module)
    for t in (module.panels, module.panels._base, module.attribute[0]):
        assert start <= t.data_ptr() < end
    assert torch.equal(module.panels.reshape(64, 256), expected)
    assert torch.equal(module.attribute[0], expected[8:])


def test_pages_someone_else_still_reads_are_not_handed_back(monkeypatch):
    monkeypatch.setattr(weight_arena, "SLICE", 1 << 16)
    module = nn.Module()
    module.weight = nn.Parameter(torch.randn(1 << 18), requires_grad=False)  # 1 MiB
    unknown = module.weight.detach()[100:]  # a holder the pass cannot see
    expected = unknown.clone()
    weight_arena.move_into_arena(module)
    assert torch.equal(unknown, expected)  # its pages kept
    assert torch.equal(module.weight[100:], expected)


def test_moving_adds_a_slice_not_a_storage_to_the_peak(monkeypatch):
    monkeypatch.setattr(weight_arena, "SLICE", 8 << 20)
    module = nn.Module()
    module.weight = nn.Parameter(torch.randn(24 << 20), requires_grad=False)  # 96 MiB
    expected = module.weight[::4096].clone()
    peak = machine.PeakMemory(torch.device("cpu"))
    peak.start()
    weight_arena.move_into_arena(module)
    _, added = peak.stop()
    if peak.method != "rss_hwm":
        pytest.skip("the peak resident memory cannot be reset here")
    assert added < 40 << 20, f"moving 96 MiB raised the peak by {added >> 20} MiB"
    assert torch.equal(module.weight[::4096], expected)
