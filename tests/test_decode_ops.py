"""The fused eager CPU ops of backends/decode_ops.py: RMSNorm and one-token attention against the torch code
they replace, on the op and on whole models (Qwen2 with GQA and biases, a sliding window, Qwen3's q/k norms),
and the cases that must fall back to the torch path."""

from __future__ import annotations

import pytest
import torch

from llmcli.backends import decode_ops
from llmcli.backends.decode_ops import FusedDecodeAttention, FusedRMSNorm
from llmcli.loader import load_model
from llmcli.models.hooks import ATTN_PROBS
from llmcli.models.layers import RMSNorm
from llmcli.models.rope import rotate

pytestmark = pytest.mark.skipif(not decode_ops.available(), reason="llmcli's CPU kernels could not be built here")


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of the dtype lie between a and b (same-signed finite values)."""
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[a.dtype]
    return (a.view(bits).long() - b.view(bits).long()).abs()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 896), (3, 5, 64), (2, 100)])
def test_rms_norm_rounds_like_the_torch_path(dtype, shape):
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
    norm = norm.to(dtype)
    x = (torch.randn(shape) * 3).to(dtype)
    with torch.inference_mode():
        expected = norm(x)
        fused = torch.ops.llmcli.rms_norm(x.contiguous(), norm.weight, norm.eps)
    assert fused.dtype == dtype and fused.shape == x.shape
    if dtype == torch.float32:  # the sum of squares is added in another order: a few float32 ulps
        assert ulps_apart(fused, expected).max().item() <= 8
    else:  # which shows in a 16-bit result as a rare one-step difference
        assert ulps_apart(fused, expected).max().item() <= 1
        assert (fused == expected).float().mean().item() > 0.98


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_zero_centred_rms_norm_rounds_like_the_torch_path(dtype):
    """The hybrids' x_hat * (1 + w), all in float32 then cast: the same bits but for the order of the sum."""
    from llmcli.models.gated_attention import ZeroCentredRMSNorm

    torch.manual_seed(1)
    norm = ZeroCentredRMSNorm(1024, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(0, 0.3)
    norm = norm.to(dtype)
    x = (torch.randn(3, 1, 1024) * 3).to(dtype)
    with torch.inference_mode():
        expected = norm(x)
        fused = torch.ops.llmcli.zero_centred_rms_norm(x.contiguous(), norm.weight, norm.eps)
    assert fused.dtype == dtype and fused.shape == x.shape
    assert ulps_apart(fused, expected).max().item() <= (8 if dtype == torch.float32 else 1)
    assert dtype == torch.float32 or (fused == expected).float().mean().item() > 0.98


def torch_decode_attention(qkv, cos, sin, k_cache, v_cache, position, heads, window, scale):
    """The reference: torch ops, RoPE in cos's dtype as the model rotates (rounded to the dtype after), then float64
    attention."""
    b, _, d = qkv.shape
    kv = (qkv.shape[1] - heads) // 2
    qk = rotate(qkv[:, :heads + kv].to(cos.dtype), cos, sin).to(qkv.dtype)
    k_cache[position], v_cache[position] = qk[:, heads:], qkv[:, heads + kv:]
    first = max(0, position - window + 1) if window else 0
    keys = k_cache[first:position + 1].double().permute(1, 2, 0, 3)  # [B, KV, n, D]
    values = v_cache[first:position + 1].double().permute(1, 2, 0, 3)
    q = qk[:, :heads].double().view(b, kv, heads // kv, d)
    probs = (q @ keys.transpose(-1, -2) * scale).softmax(-1)
    return (probs @ values).reshape(b, heads * d)


@pytest.mark.parametrize(("dtype", "rope_dtype"), [
    (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32), (torch.float16, torch.float32),  # original Qwen rotates in float32
])
@pytest.mark.parametrize("window", [0, 5])
def test_decode_attention_op_against_torch(dtype, rope_dtype, window):
    torch.manual_seed(1)
    batch, heads, kv, d, length, position = 2, 6, 2, 32, 20, 13
    qkv = torch.randn(batch, heads + 2 * kv, d).to(dtype)
    cos, sin = torch.randn(d).to(rope_dtype), torch.randn(d).to(rope_dtype)
    caches = [torch.randn(length, batch, kv, d).to(dtype) for _ in range(2)]
    theirs = [c.clone() for c in caches]
    with torch.inference_mode():
        out = torch.ops.llmcli.decode_attention(qkv, cos, sin, caches[0], caches[1], position, heads, window, 0.3)
        expected = torch_decode_attention(qkv, cos, sin, theirs[0], theirs[1], position, heads, window, 0.3)
    assert torch.equal(caches[0], theirs[0]) and torch.equal(caches[1], theirs[1])  # rotated keys, bit for bit
    assert out.dtype == dtype and out.shape == (batch, heads * d)
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3}.get(dtype, 1e-2)
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("d", "window"), [(64, 0), (64, 100), (20, 0)])  # 20: not a multiple of 8 lanes
def test_decode_attention_op_over_long_contexts(kernel_build, dtype, d, window):
    """Hundreds of keys, split into chunks that every thread takes a share of (four threads here, whatever the
    machine has), merged per head: the same attention as the float64 reference, in each build this CPU runs."""
    torch.manual_seed(2)
    heads, kv, length, position = 8, 1, 400, 333
    qkv = torch.randn(1, heads + 2 * kv, d).to(dtype)
    cos, sin = torch.randn(d).to(dtype), torch.randn(d).to(dtype)
    caches = [torch.randn(length, 1, kv, d).to(dtype) for _ in range(2)]
    theirs = [c.clone() for c in caches]
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        with torch.inference_mode():
            out = kernel_build.decode_attention(qkv, cos, sin, caches[0], caches[1], position, heads, window, 0.3)
    finally:
        torch.set_num_threads(threads)
    expected = torch_decode_attention(qkv, cos, sin, theirs[0], theirs[1], position, heads, window, 0.3)
    assert torch.equal(caches[0], theirs[0]) and torch.equal(caches[1], theirs[1])
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


def test_decode_attention_rejects_bad_shapes():
    qkv = torch.randn(1, 7, 8)  # 7 heads cannot be 4 q heads and equal k and v heads
    cache = torch.zeros(4, 1, 1, 8)
    with pytest.raises(RuntimeError, match="do not split"):
        torch.ops.llmcli.decode_attention(qkv, torch.ones(8), torch.ones(8), cache, cache.clone(), 0, 4, 0, 1.0)
    qkv = torch.randn(1, 6, 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.llmcli.decode_attention(qkv, torch.ones(8), torch.ones(8), cache, cache.clone(), 4, 4, 0, 1.0)


CASES = ["qwen2-untied", "qwen2-sliding", "qwen3"]


@pytest.fixture(scope="module", params=CASES)
def case(request, tmp_path_factory):
    from tests.test_qwen_parity import CASES as PARITY
    from tests.test_qwen_parity import build_reference

    kind, overrides = PARITY[request.param]
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, build_reference(kind, overrides, path)  # transformers' model as the third


def decode(runner, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    cache = runner.make_cache(1, len(prompt) + steps + 1)
    tokens, kept = [], []
    with torch.inference_mode():
        logits = runner(torch.tensor([prompt]), cache, last_only=True)
        for _ in range(steps):
            tokens.append(int(logits[0, -1].argmax()))
            logits = runner(torch.tensor([[tokens[-1]]]), cache)
            kept.append(logits[0, -1].float())
    return tokens, torch.stack(kept)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_models_decode_like_the_torch_path(case, dtype):
    name, path, _ = case
    fused = load_model(name, path, device="cpu", dtype=dtype).runner
    plain = load_model(name, path, device="cpu", dtype=dtype, fused_decode=False).runner
    assert any(isinstance(m, FusedDecodeAttention) for m in fused.model.modules())
    assert any(isinstance(m, FusedRMSNorm) for m in fused.model.modules())
    assert not any(isinstance(m, (FusedDecodeAttention, FusedRMSNorm)) for m in plain.model.modules())
    prompt = list(range(3, 23))  # longer than the sliding window
    tokens, logits = decode(fused, prompt, 12)
    plain_tokens, plain_logits = decode(plain, prompt, 12)
    scale = plain_logits.abs().max().item()
    if dtype == "float32":
        assert tokens == plain_tokens
        assert (logits - plain_logits).abs().max().item() < 1e-4 * scale
    else:  # teacher-forced on the same tokens would be stricter; the first tokens cannot drift apart yet
        assert tokens[:4] == plain_tokens[:4]
        assert (logits[:4] - plain_logits[:4]).abs().max().item() < 0.05 * scale


def assert_long_context_decodes_alike(fused, plain, reference, vocab: int) -> None:
    """Four tokens after a 300-token prompt, float32: the same tokens as llmcli's torch path, and logits within 1e-4 of
    its logits and of transformers' model (`reference`) over the whole sequence at once."""
    prompt = [(7 * i) % (vocab - 12) + 3 for i in range(300)]
    tokens, logits = decode(fused, prompt, 4)
    plain_tokens, plain_logits = decode(plain, prompt, 4)
    scale = plain_logits.abs().max().item()
    assert tokens == plain_tokens
    assert (logits - plain_logits).abs().max().item() < 1e-4 * scale
    with torch.inference_mode():
        theirs = reference(torch.tensor([prompt + tokens])).logits[0, len(prompt):].float()
    assert (logits - theirs).abs().max().item() < 1e-4 * scale


def test_models_decode_like_the_torch_path_over_a_long_context(case):
    """Past 300 tokens the attention op splits the keys into chunks."""
    name, path, reference = case
    fused = load_model(name, path, device="cpu", dtype="float32").runner
    plain = load_model(name, path, device="cpu", dtype="float32", fused_decode=False).runner
    assert_long_context_decodes_alike(fused, plain, reference, reference.config.vocab_size)


def test_batch_rows_of_a_cache_use_the_torch_path(case):
    """A cache holding some rows of a batch (not contiguous) is served by the model's own code."""
    name, path, _ = case
    runner = load_model(name, path, device="cpu", dtype="float32").runner
    attention = next(m for m in runner.model.modules() if isinstance(m, FusedDecodeAttention))
    cache = runner.make_cache(2, 12)
    rows = cache.layers[attention.index].rows_view(1, 2)
    assert not rows.k.is_contiguous()
    x = torch.zeros(1, 1, 64)
    cos = torch.zeros(1, attention.head_dim)
    span = cache.span(1)
    assert not attention._fits(x, cos, rows, span, None, None)
    assert attention._fits(x, cos, cache.layers[attention.index], span, None, None)


class Probs:
    """A recorder that asks for attention probabilities and keeps them."""

    optional_points = (ATTN_PROBS,)

    def __init__(self):
        self.seen = []

    def record(self, layer, what, value):
        if what == ATTN_PROBS:
            self.seen.append(value.probs)


def step(runner, recorder=None):
    """A 17-token prompt, then one decode step's logits."""
    cache = runner.make_cache(1, 24)
    with torch.inference_mode():
        runner(torch.tensor([list(range(3, 20))]), cache)
        return runner(torch.tensor([[7]]), cache, recorder=recorder)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_attention_probabilities_are_recorded_beside_the_op(case, dtype):
    """A recorder asking for attention probabilities gets the torch path's, and the step's logits are those of
    a step without a recorder."""
    name, path, _ = case

    fused = load_model(name, path, device="cpu", dtype=dtype).runner
    plain = load_model(name, path, device="cpu", dtype=dtype, fused_decode=False).runner
    assert_probabilities_recorded_beside_the_op(fused, plain)


def assert_probabilities_recorded_beside_the_op(fused, plain) -> None:
    """One decode step with a recorder: the torch path's probabilities (within 1e-3), and the logits of the step
    without one."""
    fused_probs, torch_probs = Probs(), Probs()
    assert torch.equal(step(fused, fused_probs), step(fused))
    step(plain, torch_probs)
    assert len(fused_probs.seen) == len(torch_probs.seen) > 0
    for a, b in zip(fused_probs.seen, torch_probs.seen, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_switch_off_from_the_environment(case, monkeypatch):
    name, path, _ = case
    monkeypatch.setenv("LLMCLI_FUSED_DECODE", "0")
    runner = load_model(name, path, device="cpu", dtype="float32").runner
    assert not any(isinstance(m, (FusedDecodeAttention, FusedRMSNorm)) for m in runner.model.modules())
