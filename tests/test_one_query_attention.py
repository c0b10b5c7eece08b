"""The one-query attention op (`one_query_attention`, kernels/attention_chunks.cpp) behind the models' eager decode
step where the model's own code rotates the query and writes the cache: original Qwen in bfloat16 (float32 RoPE),
partial RoPE, Qwen3-Next / Qwen3.5 gated attention. The op against a float64 reference on awkward shapes and cache
views, and whole models against their torch path."""

from __future__ import annotations

import pytest
import torch

from llmcli.backends import decode_ops
from llmcli.backends.decode_ops import FusedQwenLayer, OneQueryAttention, OneQueryGatedAttention
from llmcli.loader import load_model
from llmcli.models.cache import StaticView
from tests.test_decode_ops import decode

pytestmark = pytest.mark.skipif(not decode_ops.available(), reason="llmcli's CPU kernels could not be built here")


def cache_views(keys: int, kv: int, dk: int, dv: int, dtype, first: int = 0):
    """k and v as a model's cache hands them over: [B, KV, n, D] views of [L, B, KV, D] storage (rows past the
    written ones, and before `first`, outside the view)."""
    length = keys + 5
    k = torch.randn(length, 2, kv, dk).to(dtype).permute(1, 2, 0, 3)
    v = torch.randn(length, 2, kv, dv).to(dtype).permute(1, 2, 0, 3)
    return k[:, :, first:keys], v[:, :, first:keys]


def float64_attention(q, k, v, scale: float) -> torch.Tensor:
    """[B, H, 1, Dv]: query head h over kv head h / (H / KV)."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    return ((q.double() @ k.transpose(-1, -2)) * scale).softmax(dim=-1) @ v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("heads", "kv", "dk", "dv", "keys", "first"), [
    (8, 1, 64, 64, 334, 0),  # one GQA group over several chunks
    (6, 3, 20, 20, 70, 0),  # a head size off the 8 lanes
    (4, 4, 32, 48, 1, 0),  # one key; values wider than keys
    (16, 2, 256, 256, 97, 40),  # Qwen3.5's head size, a window's last keys
])
def test_op_against_float64(kernel_build, dtype, heads, kv, dk, dv, keys, first):
    """In every build this CPU runs, on four threads (whatever the machine has), q a strided [B, H, 1, D] view."""
    torch.manual_seed(3)
    k, v = cache_views(keys, kv, dk, dv, dtype, first)
    q = torch.randn(2, 1, heads, dk).to(dtype).transpose(1, 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        with torch.inference_mode():
            out = kernel_build.one_query_attention(q, k, v, 0.3)
    finally:
        torch.set_num_threads(threads)
    expected = float64_attention(q, k, v, 0.3)
    assert out.shape == (2, heads, 1, dv) and out.dtype == dtype and out.is_contiguous()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [0, 50])
def test_op_with_rows_at_their_own_positions(kernel_build, dtype, window):
    """`positions`: row b sees keys up to positions[b], the last `window` of them (a static step of rows at their own
    positions), some rows' keys ending chunks before the others'."""
    torch.manual_seed(4)
    heads, kv, d, keys, ends = 6, 2, 64, 334, [5, 334, 100]
    k = torch.randn(keys + 5, 3, kv, d).to(dtype).permute(1, 2, 0, 3)[:, :, :keys]
    v = torch.randn(keys + 5, 3, kv, d).to(dtype).permute(1, 2, 0, 3)[:, :, :keys]
    q = torch.randn(3, 1, heads, d).to(dtype).transpose(1, 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        with torch.inference_mode():
            out = kernel_build.one_query_attention(q, k, v, 0.3, torch.tensor(ends)[:, None] - 1, window)
    finally:
        torch.set_num_threads(threads)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for b, end in enumerate(ends):
        first = max(0, end - window) if window else 0
        expected = float64_attention(q[b:b + 1], k[b:b + 1, :, first:end], v[b:b + 1, :, first:end], 0.3)
        torch.testing.assert_close(out[b:b + 1].double(), expected, rtol=tolerance, atol=tolerance)


def test_op_rejects_what_it_cannot_take():
    q = torch.randn(1, 6, 1, 8)
    k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8)
    with pytest.raises(RuntimeError, match="KV dividing"):
        torch.ops.llmcli.one_query_attention(q, k, v, 1.0)
    with pytest.raises(RuntimeError, match="n > 0"):
        torch.ops.llmcli.one_query_attention(q, k[:1, :2, :0], v[:1, :2, :0], 1.0)
    with pytest.raises(RuntimeError, match="q's dtype"):
        torch.ops.llmcli.one_query_attention(q, k[:, :2].bfloat16(), v[:, :2], 1.0)
    with pytest.raises(RuntimeError, match="position 5 is outside 0..4"):
        torch.ops.llmcli.one_query_attention(q, k[:, :2], v[:, :2], 1.0, torch.tensor([5]))
    with pytest.raises(RuntimeError, match="position -1 is outside 0..4"):
        torch.ops.llmcli.one_query_attention(q, k[:, :2], v[:, :2], 1.0, torch.tensor([-1]))
    with pytest.raises(RuntimeError, match="one per row or one for all"):
        torch.ops.llmcli.one_query_attention(q, k[:, :2], v[:, :2], 1.0, torch.tensor([3, 4]))
    with pytest.raises(RuntimeError, match="last dim contiguous"):
        torch.ops.llmcli.one_query_attention(q, torch.randn(1, 2, 8, 5).transpose(2, 3), v[:, :2], 1.0)


class Counted:
    """`decode_ops.attended_by_op` as it is, counting the calls the op answered."""

    def __init__(self):
        self.calls = 0
        self.real = decode_ops.attended_by_op

    def __call__(self, *args, **kwargs):
        out = self.real(*args, **kwargs)
        self.calls += out is not None
        return out


def assert_decodes_like_the_torch_path(fused, plain, dtype: str, vocab: int, monkeypatch, op_calls: bool = True
                                       ) -> None:
    """After a 300-token prompt: float32 the same tokens and logits within 1e-4; bfloat16 (whose rounding of the
    weights for the values' sum differs) the first tokens and their logits within 5%. The one-query op answered
    each step (`op_calls`), or never did: the fused ops took every step."""
    counted = Counted()
    monkeypatch.setattr(decode_ops, "attended_by_op", counted)
    prompt = [(7 * i) % (vocab - 12) + 3 for i in range(300)]
    tokens, logits = decode(fused, prompt, 4)
    assert counted.calls >= 4 if op_calls else counted.calls == 0
    monkeypatch.undo()
    plain_tokens, plain_logits = decode(plain, prompt, 4)
    scale = plain_logits.abs().max().item()
    if dtype == "float32":
        assert tokens == plain_tokens
        assert (logits - plain_logits).abs().max().item() < 1e-4 * scale
    else:
        assert tokens[:2] == plain_tokens[:2]
        assert (logits[:2] - plain_logits[:2]).abs().max().item() < 0.05 * scale


@pytest.mark.parametrize(("dtype", "overrides"), [
    ("bfloat16", {}),  # float32 RoPE in a bfloat16 model: the fused layer op rotates in float32 as the model does
    ("float32", {"rotary_pct": 0.5}),  # partial RoPE: the one-query op
    ("bfloat16", {"rotary_pct": 0.5}),
])
def test_original_qwen_decodes_like_its_torch_path(tmp_path, monkeypatch, dtype, overrides):
    """LogN and dynamic NTK act far past the tiny checkpoint's 16-token training length; layer windows of 3 and 5
    keys (the ops see the window's last keys) beside a full layer."""
    from tests.test_qwen1 import VOCAB, qwen1_tensors, random_weights, write_qwen1

    path = write_qwen1(tmp_path / "qwen1", qwen1_tensors(random_weights()), **overrides)
    runners = []
    for fused_decode in (True, False):
        loaded = load_model("tiny-qwen1", path, device="cpu", dtype=dtype, fused_decode=fused_decode)
        loaded.model.set_attention_options(windows=[3, 5, None])
        runners.append(loaded.runner)
    partial = "rotary_pct" in overrides
    layer_op = any(isinstance(m, FusedQwenLayer) for m in runners[0].model.modules())
    assert any(isinstance(m, OneQueryAttention) for m in runners[0].model.modules())
    assert layer_op == (not partial) and not any(isinstance(m, OneQueryAttention) for m in runners[1].model.modules())
    assert_decodes_like_the_torch_path(*runners, dtype, VOCAB - 208, monkeypatch, op_calls=partial)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qwen3_5_decodes_like_its_torch_path(tmp_path, monkeypatch, dtype):
    """The gated full-attention layers (one in four) of a tiny Qwen3.5, and in float32 transformers' logits over
    the whole sequence as well."""
    from tests.test_decode_ops import assert_long_context_decodes_alike
    from tests.test_qwen_hybrid import build_reference

    reference = build_reference("qwen3_5", tmp_path)
    fused = load_model("qwen3_5", tmp_path, device="cpu", dtype=dtype).runner
    plain = load_model("qwen3_5", tmp_path, device="cpu", dtype=dtype, fused_decode=False).runner
    assert any(isinstance(m, OneQueryGatedAttention) for m in fused.model.modules())
    vocab = reference.config.get_text_config().vocab_size
    assert_decodes_like_the_torch_path(fused, plain, dtype, vocab, monkeypatch)
    if dtype == "float32":
        assert_long_context_decodes_alike(fused, plain, reference, vocab)


def test_original_qwen_records_attention_probabilities_beside_the_fused_op(tmp_path):
    """bfloat16 with float32 RoPE: the recorded probabilities are the torch path's, and the step's logits those of a
    step without a recorder."""
    from tests.test_decode_ops import assert_probabilities_recorded_beside_the_op
    from tests.test_qwen1 import qwen1_tensors, random_weights, write_qwen1

    path = write_qwen1(tmp_path / "qwen1", qwen1_tensors(random_weights()))
    fused, plain = (load_model("tiny-qwen1", path, device="cpu", dtype="bfloat16", fused_decode=f).runner
                    for f in (True, False))
    assert_probabilities_recorded_beside_the_op(fused, plain)


SERVER_TOKENS = [7, 8, 9]  # each row's new token in the server's step


def server_prompts(vocab: int) -> list[list[int]]:
    return [[(5 * i + r) % (vocab - 12) + 3 for i in range(n)] for r, n in enumerate((40, 300, 120))]


def server_step(runner, prompts: list[list[int]], cache=None) -> torch.Tensor:
    """The server's step: each prompt prefilled alone into its row of one batch cache (`cache`, for a test that looks
    into it after, or a new one), then one static step of all rows at their own positions: float32 logits [rows,
    vocab]."""
    runner.model.derived_tensors()  # as the server's engine does before its static steps
    cache = runner.make_cache(len(prompts), 320) if cache is None else cache
    with torch.inference_mode():
        for row, prompt in enumerate(prompts):
            runner(torch.tensor([prompt]), cache.row_cache(row), last_only=True)
        positions = torch.tensor([[len(p)] for p in prompts])
        view = StaticView(cache, int(positions.max()) + 1, rows=len(prompts))
        return runner.model(torch.tensor([[t] for t in SERVER_TOKENS]), positions, view)[:, -1].float()


def assert_server_step_alike(fused: torch.Tensor, plain: torch.Tensor, reference, prompts) -> None:
    """float32 logits within 1e-4 of llmcli's torch path, and of transformers' model over each row's whole sequence."""
    scale = plain.abs().max().item()
    assert (fused - plain).abs().max().item() < 1e-4 * scale
    with torch.inference_mode():
        for row, prompt in enumerate(prompts):
            theirs = reference(torch.tensor([prompt + [SERVER_TOKENS[row]]])).logits[0, -1].float()
            assert (fused[row] - theirs).abs().max().item() < 1e-4 * scale


@pytest.mark.parametrize("name", ["qwen2-sliding", "qwen3", "qwen3_5"])
def test_a_batch_of_rows_at_their_own_positions_steps_like_the_torch_path(tmp_path, monkeypatch, name):
    """The server's step (prompts of 40, 300 and 120 tokens) through the one-query op: a sliding window of 16 in
    qwen2-sliding, gated attention beside DeltaNet layers in qwen3_5."""
    from tests.test_qwen_parity import CASES as PARITY
    from tests.test_qwen_parity import build_reference

    if name == "qwen3_5":
        from tests.test_qwen_hybrid import build_reference as build_hybrid

        reference = build_hybrid(name, tmp_path)
    else:
        kind, overrides = PARITY[name]
        reference = build_reference(kind, overrides, tmp_path)
    prompts = server_prompts(reference.config.get_text_config().vocab_size)
    counted = Counted()
    monkeypatch.setattr(decode_ops, "attended_by_op", counted)
    fused = server_step(load_model(name, tmp_path, device="cpu", dtype="float32").runner, prompts)
    monkeypatch.undo()
    assert counted.calls > 0
    plain = server_step(load_model(name, tmp_path, device="cpu", dtype="float32", fused_decode=False).runner, prompts)
    assert_server_step_alike(fused, plain, reference, prompts)
