"""The bfloat16 CPU kernel (llmcli/kernels/bf16_gemm.cpp): layout, products, experts, errors, and the
models that use it, eager and compiled."""

from __future__ import annotations

import pytest
import torch

from llmcli.backends import bf16_kernel
from llmcli.backends.experts import StackedExperts
from llmcli.backends.linear import BlockedEmbedding, BlockedLinear, PackedLinear
from llmcli.backends.prepare import pack_linears
from llmcli.demo import ensure_demo
from llmcli.loader import load_model

pytestmark = pytest.mark.skipif(not bf16_kernel.available()[0], reason="no AVX512-BF16 build of the kernel here")


def reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    out = x.double() @ w.double().T
    return out if bias is None else out + bias.double()


def assert_rounded_from(got: torch.Tensor, ref: torch.Tensor) -> None:
    """bf16 output: within rounding (2^-8 relative) of the exact product, plus float32 summation noise."""
    assert got.dtype == torch.bfloat16
    error = (got.double() - ref).abs()
    assert (error <= ref.abs() * 2**-8 + 1e-4 * ref.abs().max()).all(), error.max().item()


def test_blocks_round_trip_and_rows_can_be_looked_up():
    w = torch.randn(192, 96).bfloat16()
    blocks = bf16_kernel.to_blocks(w)
    assert blocks.shape == (3, 48, 64, 2)
    assert torch.equal(blocks[1, 5, 7], w[64 + 7, 10:12])  # panel 1, input pair 5, output 7
    assert torch.equal(bf16_kernel.from_blocks(blocks), w)
    rearranged = w.clone()
    in_place = bf16_kernel.to_blocks(rearranged, in_place=True)
    assert in_place.data_ptr() == rearranged.data_ptr() and torch.equal(in_place, blocks)
    tall = torch.randn(64 * 40, 8).bfloat16()  # more than one step of 16 panels
    assert torch.equal(bf16_kernel.to_blocks(tall.clone(), in_place=True), bf16_kernel.to_blocks(tall))
    ids = torch.tensor([[0, 63, 64, 191], [5, 5, 130, 1]])
    assert torch.equal(bf16_kernel.rows_of(blocks, ids), w[ids])
    assert bf16_kernel.fits((128, 96)) and bf16_kernel.fits((96, 96)) and not bf16_kernel.fits((128, 95))


def test_outputs_are_padded_to_whole_panels():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 80).bfloat16()
    blocked = BlockedLinear(linear)
    assert blocked.weight.shape == (2, 32, 64, 2)
    assert torch.equal(bf16_kernel.from_blocks(blocked.weight, 80), linear.weight)
    x = torch.randn(3, 64).bfloat16()
    got = blocked(x)
    assert got.shape == (3, 80)
    assert_rounded_from(got, reference(x, linear.weight, linear.bias))


@pytest.mark.parametrize("shape", [(128, 96), (64, 4864)])  # 4864 inputs: three passes of 2048 over a panel
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 40])
def test_product_equals_float64_reference(shape, rows):
    torch.manual_seed(rows)
    w, bias = torch.randn(shape).bfloat16(), torch.randn(shape[0]).bfloat16()
    x = torch.randn(2, rows, shape[1]).bfloat16()
    blocks = bf16_kernel.to_blocks(w)
    assert_rounded_from(bf16_kernel.linear(x, blocks), reference(x, w))
    got = bf16_kernel.linear(x, blocks, bias)
    assert got.shape == (2, rows, shape[0])
    assert_rounded_from(got, reference(x, w, bias))


def test_each_row_goes_through_its_own_expert():
    torch.manual_seed(0)
    weights = [torch.randn(128, 64).bfloat16() for _ in range(3)]
    stack = torch.stack([bf16_kernel.to_blocks(w) for w in weights])
    experts = torch.tensor([2, 0, 0, 1, 2, 2, 2, 2, 2, 2, 2, 0])  # runs longer than a 6-row tile too
    x = torch.randn(len(experts), 64).bfloat16()
    got = bf16_kernel.linear(x, stack, experts=experts)
    for row, expert in enumerate(experts.tolist()):
        assert_rounded_from(got[row: row + 1], reference(x[row: row + 1], weights[expert]))


def test_bad_inputs_are_refused_not_read_out_of_bounds():
    blocks = bf16_kernel.to_blocks(torch.zeros(64, 32, dtype=torch.bfloat16))[None]
    with pytest.raises(RuntimeError, match="inputs"):
        torch.ops.llmcli.bf16_linear(torch.zeros(1, 30, dtype=torch.bfloat16), blocks, None, None)
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        torch.ops.llmcli.bf16_linear(torch.zeros(1, 32, dtype=torch.float16), blocks, None, None)
    with pytest.raises(RuntimeError, match="panels"):
        torch.ops.llmcli.bf16_linear(torch.zeros(1, 32, dtype=torch.bfloat16), blocks.float(), None, None)
    with pytest.raises(RuntimeError, match="expert out of range"):
        torch.ops.llmcli.bf16_linear(torch.zeros(1, 32, dtype=torch.bfloat16), blocks, None, torch.tensor([1]))
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.llmcli.bf16_linear(torch.zeros(1, 32, dtype=torch.bfloat16), blocks, torch.zeros(8), None)


def test_compiled_graph_calls_the_kernel():
    torch.manual_seed(0)
    blocks = bf16_kernel.to_blocks(torch.randn(128, 64).bfloat16())
    x = torch.randn(3, 64).bfloat16()
    compiled = torch.compile(lambda x: bf16_kernel.linear(torch.relu(x), blocks) + 1, fullgraph=True)
    assert torch.equal(compiled(x), bf16_kernel.linear(torch.relu(x), blocks) + 1)


def test_portable_loop_gives_the_same_products_and_says_it_is_slow(portable_ops):
    """What CPUs without AVX512-BF16 would run (llmcli does not store panels there)."""
    assert not portable_ops.built_with_avx512_bf16()
    torch.manual_seed(0)
    w, bias = torch.randn(128, 96).bfloat16(), torch.randn(128).bfloat16()
    x = torch.randn(7, 96).bfloat16()
    stack = bf16_kernel.to_blocks(w)[None]
    assert_rounded_from(portable_ops.bf16_linear(x, stack, bias, None), reference(x, w, bias))


def test_a_head_tied_to_the_embedding_shares_one_copy_of_panels():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(130, 32), "head": torch.nn.Linear(32, 130, bias=False),
                                 "other": torch.nn.Linear(32, 32)}).to(torch.bfloat16)
    model["head"].weight = model["embed"].weight
    plain = {name: module.weight.clone() for name, module in model.items()}
    assert pack_linears(model, kernel=True, prepack=False) == 2
    embed, head = model["embed"], model["head"]
    assert isinstance(embed, BlockedEmbedding) and isinstance(head, BlockedLinear)
    assert embed.weight is head.weight and head.weight.shape == (3, 16, 64, 2)  # 130 rows padded to 192
    ids = torch.tensor([[0, 129, 64], [7, 7, 100]])
    assert torch.equal(embed(ids), plain["embed"][ids])
    x = torch.randn(2, 32).bfloat16()
    assert_rounded_from(head(x), reference(x, plain["head"]))


def test_a_weight_shared_beyond_embedding_and_head_stays_plain():
    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(64, 32), "head": torch.nn.Linear(32, 64, bias=False),
                                 "probe": torch.nn.Linear(32, 64, bias=False)}).to(torch.bfloat16)
    model["head"].weight = model["probe"].weight = model["embed"].weight
    assert pack_linears(model, kernel=True, prepack=False) == 0
    assert type(model["embed"]) is torch.nn.Embedding and type(model["head"]) is torch.nn.Linear


@pytest.mark.parametrize("name", ["demo-qwen", "demo-deepseek"])
def test_bfloat16_models_use_the_kernel_and_match_onednn(name, monkeypatch):
    """Every bfloat16 linear but the tied or directly-read ones is stored in panels; logits agree with the
    oneDNN-packed model (bit-identical to F.linear) to bfloat16 rounding."""
    path = ensure_demo(name)
    blocked = load_model(name, path, device="cpu", dtype="bfloat16").runner
    assert any(isinstance(m, BlockedLinear) for m in blocked.model.modules())
    assert not any(isinstance(m, PackedLinear) for m in blocked.model.modules())
    if blocked.config.tie_word_embeddings:
        assert blocked.model.model.embed_tokens.weight is blocked.model.lm_head.weight
    moe = [m for m in blocked.model.modules() if isinstance(m, StackedExperts)]
    assert bool(moe) == blocked.config.is_moe  # eager steps: one call for k experts
    assert all(m.kernel and m.gate_up_proj_weight_stack.dim() == 5 for m in moe)
    monkeypatch.setenv("LLMCLI_BF16_KERNEL", "0")
    packed = load_model(name, path, device="cpu", dtype="bfloat16").runner
    assert not any(isinstance(m, BlockedLinear) for m in packed.model.modules())
    ids = torch.arange(3, 43)[None]
    with torch.inference_mode():
        a_cache, b_cache = blocked.make_cache(1, 48), packed.make_cache(1, 48)
        for step in (ids, torch.tensor([[7]])):  # a prompt, then one decoding step
            a, b = blocked(step, a_cache).float(), packed(step, b_cache).float()
            assert (a - b).abs().max() < 0.05 * b.abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("name, kernel", [("demo-qwen", "1"), ("demo-deepseek", "1"), ("demo-qwen", "0")])
def test_compiled_bfloat16_step_gives_the_eager_tokens(name, kernel, monkeypatch):
    """The compiled step calls the same kernel on the same panels as eager: same greedy tokens. Without the
    kernel (other CPUs), compiled steps keep plain weights and multiply-and-sum loops."""
    from tests.test_compile import decode

    monkeypatch.setenv("LLMCLI_BF16_KERNEL", kernel)
    loaded = load_model(name, ensure_demo(name), device="cpu", dtype="bfloat16", compile=True)
    blocked = [m for m in loaded.model.modules() if isinstance(m, BlockedLinear)]
    assert bool(blocked) == (kernel == "1")
    assert not any(isinstance(m, PackedLinear) for m in loaded.model.modules())
    prompt = torch.randint(0, loaded.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    eager_tokens, eager_logits = decode(loaded.runner, prompt, 12, compiled=False)
    tokens, logits = decode(loaded.runner, prompt, 12, compiled=True)
    assert loaded.runner.compiled.compile_seconds is not None
    assert tokens == eager_tokens
    worst = max((a - b).abs().max().item() for a, b in zip(logits, eager_logits, strict=True))
    assert worst < 0.05 * max(b.abs().max().item() for b in eager_logits), worst


@pytest.mark.slow
def test_moe_batches_compile_when_experts_are_in_panels():
    """The kernel picks each row's expert from the stacked panels, so MoE batches compile too (float32
    MoE models decode batches eagerly: tests/test_compile.py)."""
    from llmcli.backends.compile import experts_in_kernel_blocks
    from llmcli.backends.linear import FEW_ROWS
    from tests.test_compile import decode

    loaded = load_model("demo-deepseek", ensure_demo("demo-deepseek"), device="cpu", dtype="bfloat16", compile=True)
    model = loaded.runner
    assert experts_in_kernel_blocks(model.model) and model.compiled.max_batch == FEW_ROWS
    prompt = torch.randint(0, loaded.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    eager_tokens, _ = decode(model, prompt, 6, compiled=False)
    tokens, _ = decode(model, prompt, 6, compiled=True)
    assert (2, 1) in model.compiled._compiled_shapes
    assert tokens == eager_tokens


@pytest.mark.slow
def test_bench_compiles_a_moe_batch_before_timing_it():
    """The warm-up run that counts a batch's experts is eager (recorders see eager steps only): the batch's
    compiled step must still be built before the timed runs, not inside the first one."""
    from llmcli import bench

    loaded = load_model("demo-deepseek", ensure_demo("demo-deepseek"), device="cpu", dtype="bfloat16", compile=True)
    compiled = loaded.runner.compiled
    backend = bench.LlmcliBackend(loaded.runner, loaded.device)
    shapes_at_timed_runs = []
    original = backend.run

    def run(ids, gen_tokens, recorder=None):
        if recorder is None:
            shapes_at_timed_runs.append(set(compiled._compiled_shapes))
        return original(ids, gen_tokens, recorder=recorder)

    backend.run = run
    settings = bench.BenchSettings([bench.Workload(5, 4, batch=2)], repeat=1, warmup=1)
    bench.run_bench(backend, settings, bandwidth=1e10)
    assert shapes_at_timed_runs and all((2, 1) in shapes for shapes in shapes_at_timed_runs)
