"""The int8 decode kernel (llmcli/kernels/int8_gemv.cpp): layout, products, per-row experts, errors."""

from __future__ import annotations

import pytest
import torch

from llmcli.backends import int8_kernel
from llmcli.backends.int8 import quantize_weight

pytestmark = pytest.mark.skipif(not int8_kernel.available()[0], reason="the int8 kernel cannot be built here")


def test_blocks_round_trip_and_are_stored_in_reading_order():
    w = torch.randint(-127, 128, (24, 48), dtype=torch.int8)
    blocks = int8_kernel.to_blocks(w)
    assert blocks.shape == (3, 3, 8, 16) and blocks.is_contiguous()
    assert torch.equal(int8_kernel.from_blocks(blocks), w)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):  # converted in the same pass (prompts)
        assert torch.equal(int8_kernel.from_blocks(blocks, dtype), w.to(dtype))
    # the first 128 bytes are the first 16 inputs of rows 0..7, then the next 16 inputs of the same rows
    assert torch.equal(blocks.flatten()[:128].view(8, 16), w[:8, :16])
    assert torch.equal(blocks.flatten()[128:256].view(8, 16), w[:8, 16:32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8, 16])
def test_product_equals_float64_reference(dtype, rows):
    torch.manual_seed(rows)
    q, scale = quantize_weight(torch.randn(200, 336))
    scale = scale.to(dtype)
    x = torch.randn(rows, 336).to(dtype)
    got = int8_kernel.gemv(x, int8_kernel.to_blocks(q), scale)
    expected = (x.double() @ q.double().T) * scale.double()
    assert got.dtype == dtype and got.shape == (rows, 200)
    rounding = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    assert ((got.double() - expected).abs() <= rounding * expected.abs() + 1e-5 * expected.abs().max()).all()


@pytest.mark.parametrize("rows", [1, 4, 7, 40])
@pytest.mark.parametrize("shape", [(200, 336), (64, 4864)])
def test_many_row_product_equals_float64_reference(shape, rows):
    """`int8_gemm` (bfloat16 rows, prompts and batches): within bfloat16 rounding of the exact product."""
    if not int8_kernel.gemm_available():
        pytest.skip("int8_gemm needs AVX512-BF16")
    torch.manual_seed(rows)
    q, scale = quantize_weight(torch.randn(shape))
    scale, bias = scale.bfloat16(), torch.randn(shape[0]).bfloat16()
    x = torch.randn(2, rows, shape[1]).bfloat16()
    got = int8_kernel.gemm(x, int8_kernel.to_blocks(q), scale, bias)
    expected = (x.double() @ q.double().T) * scale.double() + bias.double()
    assert got.dtype == torch.bfloat16 and got.shape == (2, rows, shape[0])
    assert ((got.double() - expected).abs() <= 2**-8 * expected.abs() + 1e-4 * expected.abs().max()).all()


def test_int8_linear_takes_the_many_row_product_from_four_bfloat16_rows(monkeypatch):
    from llmcli.backends.int8 import GEMM_ROWS, Int8Linear

    if not int8_kernel.gemm_available():
        pytest.skip("int8_gemm needs AVX512-BF16")
    layer = Int8Linear(torch.nn.Linear(64, 128).bfloat16(), kernel=True, gemm=True)
    calls = []
    monkeypatch.setattr(int8_kernel, "gemm", lambda *a: calls.append(a[0].shape) or torch.zeros(1))
    for rows in (GEMM_ROWS - 1, GEMM_ROWS, 40):
        layer(torch.randn(rows, 64).bfloat16())
    layer(torch.randn(40, 64))  # float32 rows: not this product
    assert calls == [(GEMM_ROWS, 64), (40, 64)]


# consecutive rows through the same expert share one pass over its blocks (up to 3 at a time)
@pytest.mark.parametrize("choice", [[[3, 0], [1, 3]], [[3, 3], [3, 1]], [[2, 2], [2, 2]]])
def test_each_row_goes_through_its_own_expert(choice):
    torch.manual_seed(0)
    weights = [quantize_weight(torch.randn(64, 32)) for _ in range(4)]
    stack = torch.stack([int8_kernel.to_blocks(q) for q, _ in weights])
    scales = torch.stack([s for _, s in weights])
    experts = torch.tensor(choice)  # 2 tokens x 2 experts each
    x = torch.randn(2, 2, 32)
    got = int8_kernel.gemv(x, stack, scales, experts.reshape(-1))
    assert got.shape == (2, 2, 64)
    for t in range(2):
        for j in range(2):
            q, s = weights[experts[t, j]]
            assert torch.allclose(got[t, j], (x[t, j] @ q.float().T) * s, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_refused_not_read_out_of_bounds():
    q = int8_kernel.to_blocks(torch.zeros(16, 32, dtype=torch.int8))[None]
    scales = torch.ones(1, 16)
    with pytest.raises(RuntimeError, match="inputs"):
        torch.ops.llmcli.int8_gemv(torch.ones(1, 48), q, scales, None)
    with pytest.raises(RuntimeError, match="expert out of range"):
        torch.ops.llmcli.int8_gemv(torch.ones(1, 32), q, scales, torch.tensor([1]))
    with pytest.raises(RuntimeError, match="scales"):
        torch.ops.llmcli.int8_gemv(torch.ones(1, 32), q, scales.double(), None)


@pytest.mark.slow
def test_compiled_int8_batch_gives_the_eager_tokens():
    """A compiled step of 4 sequences goes through the many-row product (bfloat16 activations)."""
    from llmcli.demo import ensure_demo
    from llmcli.loader import load_model
    from tests.test_compile import decode

    loaded = load_model("demo-qwen", ensure_demo("demo-qwen"), device="cpu", dtype="bfloat16", quantize="int8",
                        compile=True)
    prompt = torch.randint(0, loaded.config.vocab_size, (4, 7), generator=torch.Generator().manual_seed(2))
    eager_tokens, _ = decode(loaded.runner, prompt, 5, compiled=False)
    tokens, _ = decode(loaded.runner, prompt, 5, compiled=True)
    assert (4, 1) in loaded.runner.compiled._compiled_shapes
    assert tokens == eager_tokens


def test_many_row_product_refuses_bad_inputs():
    q = int8_kernel.to_blocks(torch.zeros(16, 32, dtype=torch.int8))
    scales = torch.ones(16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="inputs"):
        torch.ops.llmcli.int8_gemm(torch.zeros(4, 48, dtype=torch.bfloat16), q, scales, None)
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.llmcli.int8_gemm(torch.zeros(4, 32), q, scales, None)
    with pytest.raises(RuntimeError, match="scales"):
        torch.ops.llmcli.int8_gemm(torch.zeros(4, 32, dtype=torch.bfloat16), q, scales[:8], None)


def test_compiled_graph_calls_the_kernel():
    q, scale = quantize_weight(torch.randn(64, 32))
    blocks = int8_kernel.to_blocks(q)
    x = torch.randn(1, 32)
    compiled = torch.compile(lambda x: int8_kernel.gemv(torch.relu(x), blocks, scale) + 1, fullgraph=True)
    assert torch.allclose(compiled(x), int8_kernel.gemv(torch.relu(x), blocks, scale) + 1)


def test_disabled_kernel_leaves_row_major_weights(monkeypatch):
    from llmcli.backends.int8 import Int8Linear
    from llmcli.demo import ensure_demo
    from llmcli.loader import load_model

    monkeypatch.setenv("LLMCLI_INT8_KERNEL", "0")
    loaded = load_model("demo-qwen", ensure_demo("demo-qwen"), device="cpu", dtype="float32", quantize="int8")
    assert not loaded.options.int8_kernel and any("disabled" in note for note in loaded.notes)
    layers = [m for m in loaded.model.modules() if isinstance(m, Int8Linear)]
    assert layers and not any(layer.blocked for layer in layers)
    assert all(layer.weight.shape == (layer.out_features, layer.in_features) for layer in layers)


def test_without_a_compiler_int8_still_runs_and_says_why(tmp_path):
    """A fresh cache and no usable C++ compiler: the build fails, the note names the fallback, and
    generation gives the same tokens as with the kernel (greedy, float32)."""
    import json
    import os
    import subprocess
    import sys

    from llmcli.demo import ensure_demo

    path = str(ensure_demo("demo-qwen"))
    args = [sys.executable, "-m", "llmcli", "generate", path, "-p", "a b c", "-n", "8", "--raw", "--json",
            "--quantize", "int8", "--dtype", "float32"]
    env = dict(os.environ, LLMCLI_HOME=str(tmp_path / "home"), CXX="/nonexistent/c++")
    broken = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert broken.returncode == 0, broken.stderr
    assert "CPU kernels unavailable" in broken.stderr and "slower paths" in broken.stderr
    working = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert working.returncode == 0, working.stderr
    assert "unavailable" not in working.stderr
    assert json.loads(broken.stdout)["token_ids"] == json.loads(working.stdout)["token_ids"]
    bf16 = [*args[:-4], "--dtype", "bfloat16"]  # no int8: bfloat16 linears fall back to oneDNN's layout
    broken = subprocess.run(bf16, capture_output=True, text=True, env=env, timeout=300)
    assert broken.returncode == 0 and "CPU kernels unavailable" in broken.stderr, broken.stderr
    assert len(json.loads(broken.stdout)["token_ids"]) == 8


def test_portable_loop_for_cpus_without_avx512_gives_the_same_products(portable_ops):
    """The kernel's plain C++ loops (what CPUs without AVX-512 run)."""
    torch.manual_seed(0)
    weights = [quantize_weight(torch.randn(40, 96)) for _ in range(3)]
    stack = torch.stack([int8_kernel.to_blocks(q) for q, _ in weights])
    scales = torch.stack([s for _, s in weights])
    x, experts = torch.randn(5, 96), torch.tensor([2, 0, 1, 1, 2])
    portable = portable_ops.int8_gemv(x, stack, scales, experts)
    assert torch.allclose(portable, torch.ops.llmcli.int8_gemv(x, stack, scales, experts), rtol=1e-5, atol=1e-5)
    q, scale = weights[0]
    x = torch.randn(9, 96).bfloat16()
    expected = (x.double() @ q.double().T) * scale.bfloat16().double()
    portable = portable_ops.int8_gemm(x, stack[0], scale.bfloat16(), None)
    assert ((portable.double() - expected).abs() <= 2**-8 * expected.abs() + 1e-4 * expected.abs().max()).all()
