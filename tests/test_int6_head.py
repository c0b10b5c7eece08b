"""An int4 run's head in 6 bits (llmcli/backends/int6.py, kernels/int6_dot.cpp): the quantisation, the storage, the
product against a float64 reference of the same quantised math on every build this CPU runs, and which runs take
it."""

from __future__ import annotations

import pytest
import torch

from llmcli.backends import int8_kernel, int_dot
from llmcli.backends.int6 import Int6Linear, quantize_int6
from tests.test_int_kernels import close, dequantised_rows, load_demo

pytestmark = pytest.mark.skipif(not int8_kernel.available()[0], reason="llmcli's CPU kernels cannot be built here")


def int6_weight(n: int, k: int, seed: int = 0):
    """A random 6-bit weight: (q, scale, min) and the float64 weight they stand for."""
    torch.manual_seed(seed)
    q, scale, low = quantize_int6(torch.randn(n, k) * torch.logspace(-2, 1, n)[:, None])
    weight = q.double() * scale.double().repeat_interleave(64, 1) + low.double().repeat_interleave(64, 1)
    return (q, scale, low), weight


def test_quantisation_is_within_half_a_step_on_the_stored_grid():
    torch.manual_seed(0)
    w = torch.randn(16, 192) * 3
    w[3, :64] = 0.25  # a constant group: one level
    q, scale, low = quantize_int6(w)
    assert q.dtype == torch.uint8 and int(q.max()) <= 63 and scale.shape == (16, 3)
    assert torch.equal(scale, scale.half().float()) and torch.equal(low, low.half().float())  # what is stored
    rebuilt = q.float() * scale.repeat_interleave(64, 1) + low.repeat_interleave(64, 1)
    assert ((rebuilt - w).abs() <= scale.repeat_interleave(64, 1) * 0.5 + 1e-6).all()
    assert torch.equal(rebuilt[3, :64], w[3, :64])


def test_storage_round_trips_and_holds_the_high_bits_where_the_kernel_reads_them():
    (q, scale, low), weight = int6_weight(24, 128)
    packed, sm = int_dot.int6_blocks(q, scale, low)
    assert packed.shape == (3, 4, 192) and packed.dtype == torch.uint8 and sm.shape == (3, 2, 2, 8)
    assert torch.equal(int_dot.int6_unblock(packed, sm).double(), weight)
    # the first block's first group: stored rows 2 and 3 are rows 1 and 5 (int4's order); their high bits share
    # the unit at bytes 128 + 16 .. 128 + 32, byte b < 8 holding row 1's q[b], q[b + 16], row 5's q[b], q[b + 16]
    unit, high = packed[0, 0, 144:160].long(), q.long() >> 4
    assert torch.equal(unit[:8], high[1, :8] | high[1, 16:24] << 2 | high[5, :8] << 4 | high[5, 16:24] << 6)
    assert torch.equal(unit[8:], high[1, 8:16] | high[1, 24:32] << 2 | high[5, 8:16] << 4 | high[5, 24:32] << 6)
    assert torch.equal(packed[0, 0, 32:48].long(), (q[1, :16] & 15) | (q[1, 16:32] & 15) << 4)  # stored row 2


@pytest.fixture(params=["native", "baseline", "avx2"])
def build(request):
    """The build llmcli loads here, then the x86-64 baseline's plain loops and the AVX2 build."""
    if request.param == "native":
        return torch.ops.llmcli
    return request.getfixturevalue("portable_ops" if request.param == "baseline" else "avx2_ops")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_product_equals_the_quantised_reference_on_every_build(build, dtype):
    """Outputs not a multiple of 16 (200), inputs of one group of 64 and of 76 (the 0.5B down projection's
    4864), 1 to 17 rows (tiles of 4, then what is left)."""
    for n, k in ((200, 64), (8, 4864)):
        (q, scale, low), weight = int6_weight(n, k, seed=n)
        packed, sm = int_dot.int6_blocks(q, scale, low)
        for rows in range(1, 18):
            x = torch.randn(rows, k).to(dtype)
            got = build.int6_dot(x, packed, sm, None)
            assert got.dtype == dtype and got.shape == (rows, n)
            assert close(got, dequantised_rows(x) @ weight.T, 1e-5 if dtype == torch.float32 else 2**-8)
        assert torch.equal(build.int6_unblock(packed, sm, torch.float32).double(), weight)


def test_rows_in_tiles_equal_rows_one_at_a_time_and_builds_agree_bit_for_bit(avx2_ops):
    """Each row's sums are the one-row product's whatever the tile; the native build (VNNI where the CPU has it)
    equals the AVX2 build exactly: the integer sums are exact either way."""
    (q, scale, low), _ = int6_weight(48, 320, seed=3)
    packed, sm = int_dot.int6_blocks(q, scale, low)
    bias = torch.randn(48)
    for rows in (9, 6, 3):
        x = torch.randn(rows, 320)
        together = int_dot.int6_dot(x, packed, sm)
        assert torch.equal(together, torch.cat([int_dot.int6_dot(x[i:i + 1], packed, sm) for i in range(rows)]))
        assert torch.equal(together, avx2_ops.int6_dot(x, packed, sm, None))
        assert torch.equal(torch.ops.llmcli.int6_dot(x, packed, sm, bias), together + bias)


def test_bad_storage_is_refused():
    (q, scale, low), _ = int6_weight(16, 128)
    packed, sm = int_dot.int6_blocks(q, scale, low)
    with pytest.raises(RuntimeError, match="sm must be float16"):
        int_dot.int6_dot(torch.randn(1, 128), packed, sm.float())
    with pytest.raises(RuntimeError, match="inputs"):
        int_dot.int6_dot(torch.randn(1, 64), packed, sm)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        int_dot.int6_dot(torch.randn(1, 96), packed[:, :3].contiguous(), sm)
    assert not int_dot.int6_fits((16, 96)) and not int_dot.int6_fits((12, 128)) and int_dot.int6_fits((16, 128))


def test_the_head_module_takes_few_rows_through_the_kernel_and_many_through_a_gemm():
    from llmcli.backends.int4 import INTEGER_PROMPT_ROWS

    torch.manual_seed(0)
    head = Int6Linear(torch.nn.Linear(128, 64, bias=False).bfloat16())
    x = torch.randn(3, 128).bfloat16()
    assert torch.equal(head(x), torch.ops.llmcli.int6_dot(x, head.packed, head.scales_and_mins, None))
    many = torch.randn(INTEGER_PROMPT_ROWS + 1, 128).float()
    weight = int_dot.int6_unblock(head.packed, head.scales_and_mins)
    assert torch.equal(head(many), torch.nn.functional.linear(many, weight))


def test_the_head_is_quantised_a_few_rows_at_a_time_with_the_same_bytes():
    """Loading quantises the head in chunks of rows (the load's peak memory): the same storage as all at once."""
    torch.manual_seed(1)
    linear = torch.nn.Linear(128, 40, bias=False)
    whole, chunked = Int6Linear(linear), Int6Linear(linear, chunk_rows=16)  # 16, 16, then the last 8 rows
    packed, sm = int_dot.int6_blocks(*quantize_int6(linear.weight.detach()))
    assert torch.equal(whole.packed, packed) and torch.equal(whole.scales_and_mins, sm)
    assert torch.equal(chunked.packed, packed) and torch.equal(chunked.scales_and_mins, sm)


def test_int4_runs_put_the_head_in_6_bits_where_the_integer_kernels_run():
    from llmcli.backends.head import returns_float32

    if not int_dot.runs_fast():
        pytest.skip(f"the integer kernels need AVX2 (built here: {int_dot.isa()})")
    for name in ("demo-qwen", "demo-deepseek"):
        head = load_demo("int4", name=name).model.lm_head
        assert isinstance(head, Int6Linear) and returns_float32(head), name
        assert head.label == f"int6 kernel (x int8 activations, {int_dot.isa_label()}, groups of 64)"
    assert not isinstance(load_demo("int4", int_dot=False).model.lm_head, Int6Linear)
    assert not isinstance(load_demo("int8").model.lm_head, Int6Linear)
