"""The fused one-token latent attention op (DeepSeek's absorbed MLA, backends/decode_ops.py) against the model's
torch path: whole models with and without q_lora, probabilities recorded beside the op, and the cases that
must fall back to the torch path."""

from __future__ import annotations

import pytest
import torch

from llmcli.backends import decode_ops
from llmcli.backends.decode_ops import FusedMLAttention
from llmcli.loader import load_model
from llmcli.models.hooks import ATTN_PROBS
from tests.test_decode_ops import decode

pytestmark = pytest.mark.skipif(not decode_ops.available(), reason="llmcli's CPU kernels could not be built here")


@pytest.fixture(scope="module", params=["v2-greedy", "v3"])  # no q_lora, pairs split in halves; q_lora, YaRN
def mla_case(request, tmp_path_factory):
    from tests.test_deepseek import CASES, build_reference

    kind, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    build_reference(kind, overrides, path)
    return request.param, path


def models(case, dtype):
    name, path = case
    fused = load_model(name, path, device="cpu", dtype=dtype).runner
    plain = load_model(name, path, device="cpu", dtype=dtype, fused_decode=False).runner
    assert any(isinstance(m, FusedMLAttention) for m in fused.model.modules())
    assert not any(isinstance(m, FusedMLAttention) for m in plain.model.modules())
    return fused, plain


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mla_decodes_like_the_torch_path(mla_case, dtype):
    fused, plain = models(mla_case, dtype)
    prompt = list(range(3, 23))
    tokens, logits = decode(fused, prompt, 10)
    plain_tokens, plain_logits = decode(plain, prompt, 10)
    scale = plain_logits.abs().max().item()
    if dtype == "float32":
        assert tokens == plain_tokens
        assert (logits - plain_logits).abs().max().item() < 1e-4 * scale
    else:
        assert tokens[:4] == plain_tokens[:4]
        assert (logits[:4] - plain_logits[:4]).abs().max().item() < 0.05 * scale


class Probs:
    optional_points = (ATTN_PROBS,)

    def __init__(self):
        self.seen = []

    def record(self, layer, what, value):
        if what == ATTN_PROBS:
            self.seen.append(value.probs)


def test_mla_probabilities_are_recorded_beside_the_op(mla_case):
    """A recorder asking for attention probabilities gets the torch path's; the logits stay those of a step
    without a recorder, bit for bit."""
    fused, plain = models(mla_case, "bfloat16")

    def step(runner, recorder=None):
        cache = runner.make_cache(1, 24)
        with torch.inference_mode():
            runner(torch.tensor([list(range(3, 20))]), cache)
            return runner(torch.tensor([[7]]), cache, recorder=recorder)

    fused_probs, torch_probs = Probs(), Probs()
    assert torch.equal(step(fused, fused_probs), step(fused))
    step(plain, torch_probs)
    assert len(fused_probs.seen) == len(torch_probs.seen) == 3
    for a, b in zip(fused_probs.seen, torch_probs.seen, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_mla_falls_back_where_the_op_does_not_apply(mla_case):
    """Rows of a batch's cache (not contiguous), a prompt of several tokens and the expanded form run the
    model's own code."""
    fused, _ = models(mla_case, "float32")
    attention = next(m for m in fused.model.modules() if isinstance(m, FusedMLAttention))
    cache = fused.make_cache(2, 12)
    layer = cache.layers[attention.index]
    x, cos = torch.zeros(1, 1, 64), torch.zeros(1, attention.rope // 2)
    assert attention._fits(x, cos, layer, cache.span(1))
    assert not attention._fits(x, cos, layer.rows_view(1, 2), cache.span(1))
    assert not attention._fits(torch.zeros(1, 2, 64), cos, layer, cache.span(2))
    calls = []
    original = torch.ops.llmcli.mla_decode
    try:
        torch.ops.llmcli.mla_decode = lambda *a: calls.append(1) or original(*a)
        fused.model.attention_form = "expanded"
        decode(fused, [3, 4, 5], 2)
        assert not calls
        fused.model.attention_form = "auto"
        decode(fused, [3, 4, 5], 2)
        assert calls
    finally:
        torch.ops.llmcli.mla_decode = original
        fused.model.attention_form = "auto"


def test_mla_op_rejects_bad_shapes():
    q, kv, norm = torch.randn(1, 2, 24), torch.randn(1, 40), torch.ones(32)
    cache, w = torch.zeros(4, 1, 40), torch.randn(2, 32, 32)
    cos = sin = torch.ones(4)
    out = torch.ops.llmcli.mla_decode(q, kv, norm, 1e-6, cos, sin, cache, 0, w, 16, 0.1, True)
    assert out.shape == (1, 32) and cache[0].abs().sum() > 0 and cache[1:].abs().sum() == 0
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.llmcli.mla_decode(q, kv, norm, 1e-6, cos, sin, cache, 4, w, 16, 0.1, True)
    with pytest.raises(RuntimeError, match="wkv_b must be"):
        torch.ops.llmcli.mla_decode(q, kv, norm, 1e-6, cos, sin, cache, 0, w[:1], 16, 0.1, True)
