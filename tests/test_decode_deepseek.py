"""DeepSeek's fused decode ops (backends/decode_ops.py) against the model's torch path: the one-token latent
attention (whole models with and without q_lora, probabilities recorded beside the op, the cases that must
fall back) and the router (each routing method, on many random tokens)."""

from __future__ import annotations

import pytest
import torch

from llmcli.backends import decode_ops
from llmcli.backends.decode_ops import FusedMLAttention, FusedRouter, FusedStackedExperts, FusedSwiGLU
from llmcli.backends.experts import StackedExperts
from llmcli.loader import load_model
from llmcli.models.layers import SwiGLU
from tests.test_decode_ops import Probs, assert_long_context_decodes_alike, decode, step

pytestmark = pytest.mark.skipif(not decode_ops.available(), reason="llmcli's CPU kernels could not be built here")


@pytest.fixture(scope="module", params=["v2-greedy", "v3"])  # no q_lora, pairs split in halves; q_lora, YaRN
def mla_case(request, tmp_path_factory):
    from tests.test_deepseek import CASES, build_reference

    kind, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, build_reference(kind, overrides, path)


def models(case, dtype):
    name, path, _ = case
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
        # and against transformers' own model, run over the whole sequence at once
        with torch.inference_mode():
            theirs = mla_case[2](torch.tensor([prompt + tokens])).logits[0, len(prompt):].float()
        assert (logits - theirs).abs().max().item() < 1e-4 * scale
    else:
        assert tokens[:4] == plain_tokens[:4]
        assert (logits[:4] - plain_logits[:4]).abs().max().item() < 0.05 * scale


def test_mla_decodes_like_the_torch_path_over_a_long_context(mla_case):
    """Past 300 tokens every head goes through the latent rows in chunks, merged per head."""
    fused, plain = models(mla_case, "float32")
    assert_long_context_decodes_alike(fused, plain, mla_case[2], mla_case[2].config.vocab_size)


def test_mla_probabilities_are_recorded_beside_the_op(mla_case):
    """A recorder asking for attention probabilities gets the torch path's; the logits stay those of a step
    without a recorder, bit for bit."""
    fused, plain = models(mla_case, "bfloat16")
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mla_op_over_a_long_context_against_float64(kernel_build, dtype):
    """Every head over 301 latent rows in chunks on four threads, rows of 96 (bfloat16: AVX512-BF16's pairs where
    the CPU has them), against float64 attention over the rows the op wrote, from the op's rounded queries; in each
    build this CPU runs."""
    torch.manual_seed(3)
    heads, rank, rope, nope, v_dim, position, scale = 8, 64, 32, 16, 16, 300, 0.2
    q = torch.randn(2, heads, nope + rope).to(dtype)
    kv, norm = torch.randn(2, rank + rope).to(dtype), (torch.rand(rank) + 0.5).to(dtype)
    cos, sin = torch.randn(rope // 2).to(dtype), torch.randn(rope // 2).to(dtype)
    cache = torch.randn(320, 2, rank + rope).to(dtype)
    wkv_b = (torch.randn(heads, nope + v_dim, rank) * 0.3).to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        out = kernel_build.mla_decode(q, kv, norm, 1e-6, cos, sin, cache, position, wkv_b, v_dim, scale, False)
    finally:
        torch.set_num_threads(threads)
    half = rope // 2
    x1, x2 = q[..., nope:nope + half], q[..., nope + half:]
    q_pe = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)  # rotated in the dtype, as the op rounds
    w = wkv_b.double()
    latent = torch.einsum("bhn,hnr->bhr", q[..., :nope].double(), w[:, :nope]).to(dtype)
    query = torch.cat((latent, q_pe), -1).double()  # [B, H, rank + rope]
    rows = cache[:position + 1].double().transpose(0, 1)  # [B, n, rank + rope]
    probs = (torch.einsum("bhr,bnr->bhn", query, rows) * scale).softmax(-1)
    mixed = torch.einsum("bhn,bnr->bhr", probs, rows[..., :rank]).to(dtype).double()
    expected = torch.einsum("bhr,hvr->bhv", mixed, w[:, nope:]).reshape(2, heads * v_dim)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mla_attend_with_rows_at_their_own_positions_against_float64(kernel_build, dtype):
    """The static step's op: queries already rotated, the latent rows a [B, L, rank + rope] view of the cache, row b
    seeing rows up to its position (some ending chunks before the others), four threads, in each build this CPU
    runs."""
    torch.manual_seed(5)
    heads, rank, rope, nope, v_dim, scale, ends = 8, 64, 32, 16, 16, 0.2, [7, 300, 120]
    q_nope = torch.randn(3, heads, 1, nope).to(dtype)
    q_pe = torch.randn(3, 1, heads, rope).to(dtype).transpose(1, 2)  # a strided view, as the model hands it over
    cache = torch.randn(320, 3, rank + rope).to(dtype)
    wkv_b = (torch.randn(heads, nope + v_dim, rank) * 0.3).to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        out = kernel_build.mla_attend(q_nope, q_pe, cache.transpose(0, 1), wkv_b, v_dim, scale,
                                      torch.tensor(ends)[:, None] - 1)
    finally:
        torch.set_num_threads(threads)
    assert out.shape == (3, heads, 1, v_dim) and out.dtype == dtype
    w = wkv_b.double()
    latent = torch.einsum("bhn,hnr->bhr", q_nope[:, :, 0].double(), w[:, :nope]).to(dtype)
    query = torch.cat((latent, q_pe[:, :, 0]), -1).double()  # [B, H, rank + rope]
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for b, end in enumerate(ends):
        rows = cache[:end, b].double()  # [n, rank + rope]
        probs = (torch.einsum("hr,nr->hn", query[b], rows) * scale).softmax(-1)
        mixed = torch.einsum("hn,nr->hr", probs, rows[:, :rank]).to(dtype).double()
        expected = torch.einsum("hr,hvr->hv", mixed, w[:, nope:])
        torch.testing.assert_close(out[b, :, 0].double(), expected, rtol=tolerance,
                                   atol=tolerance * expected.abs().max().item())


def counted(op, calls: list):
    """`op` as it is, noting each call in `calls`."""
    def call(*args):
        calls.append(1)
        return op(*args)
    return call


def test_mla_batch_rows_at_their_own_positions_step_like_the_torch_path(mla_case, monkeypatch):
    """The server's step (prompts of 40, 300 and 120 tokens), each layer through `mla_attend`."""
    from tests.test_one_query_attention import assert_server_step_alike, server_prompts, server_step

    name, path, reference = mla_case
    prompts = server_prompts(reference.config.vocab_size)
    calls = []
    fused_runner = load_model(name, path, device="cpu", dtype="float32").runner
    monkeypatch.setattr(torch.ops.llmcli, "mla_attend", counted(torch.ops.llmcli.mla_attend, calls))
    fused = server_step(fused_runner, prompts)
    monkeypatch.undo()
    assert len(calls) == reference.config.num_hidden_layers
    plain = server_step(load_model(name, path, device="cpu", dtype="float32", fused_decode=False).runner, prompts)
    assert_server_step_alike(fused, plain, reference, prompts)


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


ROUTERS = {  # method, scoring, experts, groups, kept groups, k, normalise, scaling
    "v2-lite greedy": ("greedy", "softmax", 64, 1, 1, 6, False, 1.0),
    "v2 group-limited": ("group_limited_greedy", "softmax", 160, 8, 3, 6, False, 16.0),
    "v3 noaux_tc": ("noaux_tc", "sigmoid", 256, 8, 4, 8, True, 2.5),
}


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_router_op_chooses_like_the_torch_router(name):
    """Experts and groups equal the torch router's; weights and scores equal too, or within a float32 step
    where the order of a sum differs."""
    from types import SimpleNamespace

    from llmcli.models.deepseek import Router

    method, scoring, experts, groups, kept, k, normalise, scaling = ROUTERS[name]
    cfg = SimpleNamespace(num_experts_per_tok=k, topk_method=method, scoring_func=scoring, n_group=groups,
                          topk_group=kept, norm_topk_prob=normalise, routed_scaling_factor=scaling,
                          n_routed_experts=experts, hidden_size=64)
    torch.manual_seed(experts)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.normal_()
        if method == "noaux_tc":
            router.e_score_correction_bias.normal_(std=0.1)
    x = torch.randn(16, 64).bfloat16()
    for tokens in (x[:1], x):
        router.__class__ = Router
        want = router(tokens)
        router.__class__ = FusedRouter
        got = router(tokens)
        assert torch.equal(got.experts, want.experts)
        assert torch.equal(got.scores, want.scores)
        torch.testing.assert_close(got.weights, want.weights, rtol=2e-7, atol=0)
        assert (got.groups is None) == (want.groups is None)
        if want.groups is not None:
            assert torch.equal(got.groups, want.groups)
    with pytest.raises(RuntimeError, match="do not fit"):
        torch.ops.llmcli.route(x, router.weight, None, experts + 1, 0, 1, 1, True, True, 1.0)


def test_models_use_the_router_op(mla_case):
    fused, plain = models(mla_case, "float32")
    assert any(isinstance(m, FusedRouter) for m in fused.model.modules())
    assert not any(isinstance(m, FusedRouter) for m in plain.model.modules())


@pytest.mark.parametrize("quantize", ["int8", "int5", "int4"])
def test_integer_mlps_and_experts_as_one_op_equal_the_torch_path(mla_case, quantize):
    """Dense and shared MLPs and a decode step's routed experts on the integer kernels, each one op call: bit for
    bit the modules' own products and torch ops."""
    name, path, _ = mla_case
    runner = load_model(name, path, device="cpu", dtype="bfloat16", quantize=quantize).runner
    mlps = [m for m in runner.model.modules() if isinstance(m, FusedSwiGLU)]
    experts = [m for m in runner.model.modules() if isinstance(m, FusedStackedExperts)]
    if not mlps:
        pytest.skip(f"{quantize} products are not on the integer kernels on this CPU")
    assert experts
    torch.manual_seed(0)
    with torch.inference_mode():
        for mlp in mlps:
            x = torch.randn(2, 1, 64).bfloat16()
            fused = mlp(x)
            mlp.__class__ = SwiGLU
            assert torch.equal(fused, mlp(x))
            mlp.__class__ = FusedSwiGLU
        for module in experts:
            x = torch.randn(3, 64).bfloat16()
            choice = module_router(runner, module)(x)
            fused = module(x, choice)
            module.__class__ = StackedExperts
            assert torch.equal(fused, module(x, choice))
            module.__class__ = FusedStackedExperts


def test_an_mlp_mixing_int4_and_int5_stays_one_op(mla_case):
    """A 4-bit file's ffn_down in Q6_K runs int5 beside an int4 gate_up: the MLP is still one op, bit for bit the
    modules' own products."""
    from llmcli.backends import int_dot
    from llmcli.backends.int4 import Int5Linear

    name, path, _ = mla_case
    runner = load_model(name, path, device="cpu", dtype="bfloat16", quantize="int4").runner
    mlps = [m for m in runner.model.modules() if isinstance(m, FusedSwiGLU)]
    if not mlps:
        pytest.skip("int4 products are not on the integer kernels on this CPU")
    torch.manual_seed(0)
    with torch.inference_mode():
        for mlp in mlps:
            down = mlp.down_proj
            five = Int5Linear.__new__(Int5Linear)
            five.__dict__.update(down.__dict__)  # the same module, its blocks in int5's layout
            five._buffers = dict(zip(("packed", "scales_and_mins"),
                                     int_dot.int5_from_int4(down.packed, down.scales_and_mins), strict=True))
            mlp.down_proj = five
            assert FusedSwiGLU.takes(mlp)
            x = torch.randn(2, 1, 64).bfloat16()
            fused = mlp(x)
            mlp.__class__ = SwiGLU
            assert torch.equal(fused, mlp(x))
            mlp.__class__ = FusedSwiGLU


def module_router(runner, experts):
    return next(m.gate for m in runner.model.modules() if getattr(m, "experts", None) is experts)


@pytest.mark.parametrize("quantize", ["int4", "int5"])
def test_prompts_go_through_integer_expert_stacks_in_one_call(mla_case, quantize, monkeypatch):
    """A prompt's routed experts on integer stacks: one kernel call per projection, each expert's rows together
    (the kernel sorts rows by expert), giving the expert-by-expert loop's logits up to the mix's rounding."""
    from llmcli.backends import experts as experts_module

    name, path, _ = mla_case
    runner = load_model(name, path, device="cpu", dtype="bfloat16", quantize=quantize).runner
    stacks = [m for m in runner.model.modules() if isinstance(m, StackedExperts)]
    if not stacks or not all(m.integer and isinstance(m, FusedStackedExperts) for m in stacks):
        pytest.skip(f"{quantize} experts are not on the integer kernels on this CPU")
    calls, fused_stacked = [], FusedStackedExperts._stacked
    monkeypatch.setattr(FusedStackedExperts, "_stacked", lambda self, x, choice: calls.append(x.shape[0]) or
                        fused_stacked(self, x, choice))
    prompt = torch.randint(0, runner.model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        stacked = runner(prompt, runner.make_cache(1, 32))
        assert calls and set(calls) == {24}
        monkeypatch.setattr(experts_module, "STACKED_PROMPT_ROWS", 0)
        loop = runner(prompt, runner.make_cache(1, 32))
    assert len(calls) == len(stacks)  # the loop made no stacked call
    torch.testing.assert_close(stacked.float(), loop.float(), rtol=0.02, atol=0.02 * loop.abs().max().item())
    assert torch.equal(stacked.argmax(-1), loop.argmax(-1))
