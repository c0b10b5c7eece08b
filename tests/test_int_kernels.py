"""The integer dot-product kernels (llmcli/backends/kernels/int_dot.cpp): int8 and int4 weights times
activations quantised to int8 per group of 32, against a float64 reference of the same quantised math;
the storage of int4 weights; which layers get them; bad inputs."""

from __future__ import annotations

import pytest
import torch

from llmcli.backends import int8_kernel, int_dot
from llmcli.backends.int4 import quantize_int4
from llmcli.backends.int8 import quantize_weight

pytestmark = pytest.mark.skipif(not int8_kernel.available()[0], reason="llmcli's CPU kernels cannot be built here")


def dequantised_rows(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels see it: q * d per group of 32, in float64."""
    q, d = int_dot.quantize_rows(x)
    return (q.double().reshape(*q.shape[:-1], -1, 32) * d.double()[..., None]).reshape(x.shape)


def int4_weight(n: int, k: int, seed: int = 0):
    """A random int4 weight: (q, scale, min) with float16-representable scales, and the float64 weight."""
    torch.manual_seed(seed)
    q, scale, zero = quantize_int4(torch.randn(n, k))
    scale, low = scale.half().float(), (zero - 8 * scale).half().float()
    weight = q.double() * scale.double().repeat_interleave(32, 1) + low.double().repeat_interleave(32, 1)
    return (q, scale, low), weight


def close(got: torch.Tensor, expected: torch.Tensor, relative: float) -> bool:
    """Within float32 summation (or the output dtype's) rounding of the exact result."""
    return bool(((got.double() - expected).abs() <= relative * expected.abs() + 1e-5 * expected.abs().max()).all())


def test_activation_quantisation_is_within_half_a_step_per_group():
    x = torch.randn(3, 96) * torch.tensor([0.01, 1.0, 100.0])[:, None]
    x[1, 32:64] = 0  # a zero group: step 0, all zeros
    q, d = int_dot.quantize_rows(x)
    assert q.dtype == torch.int8 and d.shape == (3, 3) and d[1, 1] == 0 and q.abs().max() == 127
    assert ((dequantised_rows(x) - x.double()).abs() <= d.double().repeat_interleave(32, -1) / 2 + 1e-12).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 17])
def test_int8_product_equals_the_quantised_reference(dtype, rows):
    """Outputs not a multiple of 16 (200), inputs 3 groups of 32 and 152 groups (the 0.5B down projection)."""
    for n, k in ((200, 96), (16, 4864)):
        torch.manual_seed(rows)
        q, scale = quantize_weight(torch.randn(n, k))
        x = torch.randn(rows, k).to(dtype)
        got = int_dot.int8_dot(x, int8_kernel.to_blocks(q), scale)
        expected = (dequantised_rows(x) @ q.double().T) * scale.double()
        assert got.dtype == dtype and got.shape == (rows, n)
        assert close(got, expected, 1e-5 if dtype == torch.float32 else 2**-8)


def test_int8_rows_go_through_their_own_expert():
    torch.manual_seed(0)
    weights = [quantize_weight(torch.randn(24, 64)) for _ in range(3)]
    stack = torch.stack([int8_kernel.to_blocks(q) for q, _ in weights])
    scales = torch.stack([s for _, s in weights])
    x, experts = torch.randn(4, 64), torch.tensor([2, 0, 2, 1])
    got = int_dot.int8_dot(x, stack, scales, experts)
    for row, e in enumerate(experts.tolist()):
        q, s = weights[e]
        assert close(got[row], (dequantised_rows(x[row]) @ q.double().T) * s.double(), 1e-5)


def test_bias_inside_the_op_rounds_as_a_separate_add():
    """A linear's bias is added inside the products (one op call per decode product): bit for bit the product
    in x's dtype, then a separate bf16 add; x of any leading shape, not contiguous; scales in bf16."""
    torch.manual_seed(1)
    q, scale = quantize_weight(torch.randn(40, 96))
    blocks, bias = int8_kernel.to_blocks(q), torch.randn(40).bfloat16()
    x = torch.randn(3, 96, 2).bfloat16().transpose(1, 2)  # [3, 2, 96], not contiguous
    plain = int_dot.int8_dot(x.contiguous(), blocks, scale.bfloat16().float())
    assert torch.equal(torch.ops.llmcli.int8_dot(x, blocks, scale.bfloat16(), None, bias), plain + bias)
    (q4, s4, low), _ = int4_weight(40, 96)
    packed, sm = int_dot.int4_blocks(q4, s4, low)
    assert torch.equal(torch.ops.llmcli.int4_dot(x, packed, sm, None, bias),
                       int_dot.int4_dot(x.contiguous(), packed, sm) + bias)
    with pytest.raises(RuntimeError, match="bias must be"):
        torch.ops.llmcli.int8_dot(x, blocks, scale, None, bias.float())


def test_int4_storage_round_trips_and_is_read_in_order():
    (q, scale, low), weight = int4_weight(24, 64)
    packed, sm = int_dot.int4_blocks(q, scale, low)
    assert packed.shape == (3, 2, 8, 16) and packed.dtype == torch.uint8 and sm.shape == (3, 2, 2, 8)
    assert torch.equal(int_dot.int4_unblock(packed, sm).double(), weight)
    # rows in lanes: 32 bytes per 4 inputs (j), 4 bytes a row (r); byte i holds inputs 4j + i and 16 + 4j + i
    group = packed[1, 1].reshape(4, 8, 4).long()  # block 1 (rows 8..15), group 1 (inputs 32..63)
    assert torch.equal(group[0, 0], q[8, 32:36] | (q[8, 48:52] << 4))
    assert torch.equal(group[3, 6], q[14, 44:48] | (q[14, 60:64] << 4))
    codes = torch.cat([group & 15, group >> 4], 0).permute(1, 0, 2).reshape(8, 32)
    assert torch.equal(codes, q[8:16, 32:64].long())
    assert torch.equal(sm[0, 1, 0].float(), scale[:8, 1]) and torch.equal(sm[0, 1, 1].float(), low[:8, 1])


@pytest.mark.parametrize("rows", [1, 2, 7, 17])
def test_int4_product_equals_the_quantised_reference(rows):
    for n, k in ((40, 96), (8, 4864)):
        (q, scale, low), weight = int4_weight(n, k, seed=rows)
        packed, sm = int_dot.int4_blocks(q, scale, low)
        x = torch.randn(2, rows, k)
        got = int_dot.int4_dot(x, packed, sm)
        assert got.shape == (2, rows, n)
        assert close(got, dequantised_rows(x) @ weight.T, 1e-5)


def test_int4_rows_in_tiles_equal_rows_one_at_a_time():
    """Prompts run up to four rows at once over each unpacked block: every row's result is bit for bit the
    one-row product's (9 rows: tiles of 4, 4 and 1; 6 rows: 4 and 2; 3 rows: one tile of 3)."""
    (q, scale, low), _ = int4_weight(48, 160, seed=3)
    packed, sm = int_dot.int4_blocks(q, scale, low)
    for rows in (9, 6, 3):
        x = torch.randn(rows, 160)
        together = int_dot.int4_dot(x, packed, sm)
        assert torch.equal(together, torch.cat([int_dot.int4_dot(x[i:i + 1], packed, sm) for i in range(rows)]))


def assert_rows_go_through_their_own_experts(parts: list[tuple[torch.Tensor, torch.Tensor]]):
    """Rows naming their experts in a stack of `parts` (the kernel sorts them by expert and tiles each expert's
    rows): bit for bit each matrix's own one-row product. Returns the stack and a few rows."""
    packed, sm = torch.stack([p for p, _ in parts]), torch.stack([m for _, m in parts])
    x, experts = torch.randn(5, parts[0][0].shape[1] * 32), torch.tensor([2, 0, 2, 1, 0])
    got = int_dot.int4_dot(x, packed, sm, experts)
    for row, e in enumerate(experts.tolist()):
        assert torch.equal(got[row], int_dot.int4_dot(x[row:row + 1], *parts[e])[0])
    return packed, sm, x


def test_int4_rows_go_through_their_own_expert():
    """A stack of int4 matrices with each row's expert named: bit for bit each matrix's own one-row product."""
    packed, sm, x = assert_rows_go_through_their_own_experts(
        [int_dot.int4_blocks(*int4_weight(24, 64, seed=e)[0]) for e in range(3)])
    with pytest.raises(RuntimeError, match="expert out of range"):
        int_dot.int4_dot(x[:1], packed, sm, torch.tensor([3]))
    with pytest.raises(RuntimeError, match="needs experts"):
        int_dot.int4_dot(x[:1], packed, sm)


def test_q4_0_scales_alone_give_the_products_of_their_widened_form():
    """Q4_0 (w = (q - 8) * scale) is stored with scales alone, 4.5 bits a weight: the unblocked weight is bit for
    bit that of the same weights with min = -8 * scale stored; products, tiles of rows and expert stacks agree
    with it within float32 rounding (scale * (d_x * dot - 8 * d_x * sum) is summed in one step fewer)."""
    torch.manual_seed(5)
    q = torch.randint(0, 16, (40, 160), dtype=torch.int32)
    scale = (torch.rand(40, 5) * 0.1).half().float()
    packed, sm = int_dot.int4_blocks(q, scale, None)
    assert sm.shape == (5, 5, 1, 8)
    widened = int_dot.int4_with_mins(sm)
    assert widened.shape == (5, 5, 2, 8) and torch.equal(widened, int_dot.int4_blocks(q, scale, -8 * scale)[1])
    weight = (q.double() - 8) * scale.double().repeat_interleave(32, 1)
    assert torch.equal(int_dot.int4_unblock(packed, sm).double(), weight)
    for rows in (1, 3, 6, 9):
        x = torch.randn(rows, 160)
        got = int_dot.int4_dot(x, packed, sm)
        assert close(got, dequantised_rows(x) @ weight.T, 1e-5)
        assert close(int_dot.int4_dot(x, packed, widened), got.double(), 1e-5)
        assert torch.equal(got, torch.cat([int_dot.int4_dot(x[i:i + 1], packed, sm) for i in range(rows)]))
    stack, terms = torch.stack([packed, packed.flip(0)]), torch.stack([sm, sm.flip(0)])
    x, experts = torch.randn(3, 160), torch.tensor([1, 0, 1])
    got = int_dot.int4_dot(x, stack, terms, experts)
    for row, e in enumerate(experts.tolist()):
        assert torch.equal(got[row], int_dot.int4_dot(x[row:row + 1], stack[e], terms[e])[0])
    with pytest.raises(RuntimeError, match="S = 2 .scales, mins. or 1"):
        int_dot.int4_dot(x, packed, torch.cat([widened, sm], -2))


def int5_weight(n: int, k: int, seed: int = 0, symmetric: bool = False):
    """A random int5 weight: (q, scale, low) with float16 scales (low None: Q5_0's -16 * scale), the float64 weight."""
    torch.manual_seed(seed)
    q = torch.randint(0, 32, (n, k), dtype=torch.int32)
    scale = (torch.rand(n, k // 32) * 0.1).half().float()
    low = None if symmetric else (torch.randn(n, k // 32) * 0.1).half().float()
    offset = -16 * scale if symmetric else low
    weight = q.double() * scale.double().repeat_interleave(32, 1) + offset.double().repeat_interleave(32, 1)
    return (q, scale, low), weight


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 7, 17])
def test_int5_product_equals_the_quantised_reference(rows, symmetric):
    """5-bit codes (int4's nibbles plus a high bit each): products of every row count against float64, in tiles of
    four rows bit for bit the one-row products, and the unblocked weight equal to q * scale + low in float32."""
    for n, k in ((40, 96), (8, 4864)):
        (q, scale, low), weight = int5_weight(n, k, seed=rows, symmetric=symmetric)
        packed, sm = int_dot.int5_blocks(q, scale, low)
        assert packed.shape == (n // 8, k // 32, 160) and sm.shape == (n // 8, k // 32, 1 if symmetric else 2, 8)
        assert int_dot.bits_of(packed) == 5
        x = torch.randn(2, rows, k)
        got = int_dot.int4_dot(x, packed, sm)
        assert got.shape == (2, rows, n) and close(got, dequantised_rows(x) @ weight.T, 1e-5)
        one_by_one = torch.stack([torch.cat([int_dot.int4_dot(x[b, i:i + 1], packed, sm) for i in range(rows)])
                                  for b in range(2)])
        assert torch.equal(got, one_by_one)
        assert torch.allclose(int_dot.int4_unblock(packed, sm).double(), weight, rtol=2**-23, atol=0)


def test_int5_experts_and_int4_weights_in_its_layout():
    """A stack of int5 matrices runs each row through its own expert; an int4 weight in int5's layout (high bits
    0, minimums stored) gives its own matrix and products."""
    assert_rows_go_through_their_own_experts([int_dot.int5_blocks(*int5_weight(24, 64, seed=e)[0]) for e in range(3)])
    torch.manual_seed(2)
    q4, scale = torch.randint(0, 16, (16, 96), dtype=torch.int32), (torch.rand(16, 3) * 0.1).half().float()
    four = int_dot.int4_blocks(q4, scale, None)  # Q4_0: scales alone
    five = int_dot.int5_from_int4(*four)
    assert five[1].shape[-2] == 2 and torch.equal(five[0], int_dot.int5_blocks(q4, scale, -8 * scale)[0])
    assert torch.equal(int_dot.int4_unblock(*five), int_dot.int4_unblock(*four))
    x = torch.randn(3, 96)
    assert close(int_dot.int4_dot(x, *five), int_dot.int4_dot(x, *four).double(), 1e-5)
    with pytest.raises(RuntimeError, match="int4.*int5.*int8 per 32"):
        int_dot.int4_dot(x, five[0][..., :150].contiguous(), five[1])


def test_int4_experts_stack_for_decode_with_the_same_logits():
    """int4 MoE experts in the integer kernel's blocks are stacked: a decode step reads its k experts with
    one call per projection, and gives the logits of running them one module each, bit for bit."""
    from llmcli.backends.experts import StackedExperts
    from llmcli.models.layers import Experts

    if not int_dot.runs_fast():
        pytest.skip(f"int4 experts take the integer kernel with AVX2 (built here: {int_dot.isa()})")
    stacked, plain = load_demo("int4", name="demo-deepseek"), load_demo("int4", name="demo-deepseek")
    modules = [m for m in stacked.model.modules() if isinstance(m, StackedExperts)]
    assert modules and all(m.label == "stacked, int4 kernel" for m in modules)
    for module in plain.model.modules():
        if isinstance(module, StackedExperts):
            module.forward = Experts.forward.__get__(module)  # expert by expert, the views into the stacks
    ids = torch.tensor([5, 9, 13, 2, 7, 11])
    assert torch.equal(decode_logits(stacked.runner, ids), decode_logits(plain.runner, ids))


def test_bad_inputs_are_refused_not_read_out_of_bounds():
    q, scale = quantize_weight(torch.randn(16, 48))  # 48 inputs: not whole groups of 32
    with pytest.raises(RuntimeError, match="multiple of 32"):
        int_dot.int8_dot(torch.randn(1, 48), int8_kernel.to_blocks(q), scale)
    q, scale = quantize_weight(torch.randn(16, 64))
    with pytest.raises(RuntimeError, match="inputs"):
        int_dot.int8_dot(torch.randn(1, 32), int8_kernel.to_blocks(q), scale)
    with pytest.raises(RuntimeError, match="expert out of range"):
        int_dot.int8_dot(torch.randn(1, 64), int8_kernel.to_blocks(q)[None], scale[None], torch.tensor([1]))
    with pytest.raises(RuntimeError, match="with a stack of weights"):
        int_dot.int8_dot(torch.randn(1, 64), int8_kernel.to_blocks(q), scale, torch.tensor([0]))
    (q4, s4, low), _ = int4_weight(16, 64)
    packed, sm = int_dot.int4_blocks(q4, s4, low)
    with pytest.raises(RuntimeError, match="float16"):
        int_dot.int4_dot(torch.randn(1, 64), packed, sm.float())


def test_avx2_and_portable_builds_compute_the_same_products(portable_ops, avx2_ops):
    """The AVX2 code (x86-64-v3, what CPUs without AVX-512 run) and the plain C++ loops (the fallback)."""
    assert str(portable_ops.int_dot_isa()) == "portable" and str(avx2_ops.int_dot_isa()) == "avx2"
    torch.manual_seed(0)
    q, scale = quantize_weight(torch.randn(40, 96))
    blocks = int8_kernel.to_blocks(q)[None]
    x = torch.randn(7, 96)  # int4: a tile of 4 rows, then one of 3
    expected = (dequantised_rows(x) @ q.double().T) * scale.double()
    for ops in (portable_ops, avx2_ops):
        assert close(ops.int8_dot(x, blocks, scale[None], None), expected, 1e-5)
    (q4, s4, low), weight = int4_weight(40, 96)
    packed, sm = int_dot.int4_blocks(q4, s4, low)
    for ops in (portable_ops, avx2_ops):
        assert close(ops.int4_dot(x, packed, sm), dequantised_rows(x) @ weight.T, 1e-5)
        assert torch.equal(ops.int4_unblock(packed, sm, torch.float32).double(), weight)
    for symmetric in (False, True):  # int5 (the high bits: AVX2 widens its sums before they overflow int16)
        (q5, s5, low5), weight5 = int5_weight(40, 96, symmetric=symmetric)
        packed, sm = int_dot.int5_blocks(q5, s5, low5)
        for ops in (portable_ops, avx2_ops):
            assert close(ops.int4_dot(x, packed, sm), dequantised_rows(x) @ weight5.T, 1e-5)
            assert torch.allclose(ops.int4_unblock(packed, sm, torch.float32).double(), weight5, rtol=2**-23, atol=0)


def test_vnni_build_gives_the_avx2_builds_bits(avx2_ops):
    """VNNI's byte dot products add the same exact integer sums as AVX2's maddubs and madd: the native build, where
    the CPU has VNNI, equals the AVX2 build bit for bit (one matrix and expert stacks, tiles of 1 to 4 rows)."""
    if int_dot.isa() != "avx2_vnni":
        pytest.skip(f"the kernels built here have no VNNI path ({int_dot.isa()})")
    assert str(avx2_ops.int_dot_isa()) == "avx2"
    torch.manual_seed(0)
    int8_weights = [quantize_weight(torch.randn(48, 4864)) for _ in range(3)]
    blocks = torch.stack([int8_kernel.to_blocks(q) for q, _ in int8_weights])
    scales = torch.stack([scale for _, scale in int8_weights])
    int4_weights = [int_dot.int4_blocks(*int4_weight(48, 4864, seed)[0]) for seed in range(3)]
    packed, sm = torch.stack([p for p, _ in int4_weights]), torch.stack([s for _, s in int4_weights])
    for rows in (1, 3, 6, 9):
        x = torch.randn(rows, 4864).bfloat16()
        experts = torch.randint(0, 3, (rows,))
        for args in ((x, blocks[:1], scales[:1], None), (x, blocks, scales, experts)):
            assert torch.equal(torch.ops.llmcli.int8_dot(*args), avx2_ops.int8_dot(*args))
        for args in ((x, packed[:1], sm[:1], None), (x, packed, sm, experts)):
            assert torch.equal(torch.ops.llmcli.int4_dot(*args), avx2_ops.int4_dot(*args))
        for symmetric in (False, True):  # int5, and Q5_0's scales alone (tiles of 8 rows natively, 4 in AVX2)
            five = int_dot.int5_blocks(*int5_weight(48, 4864, rows, symmetric=symmetric)[0])
            assert torch.equal(torch.ops.llmcli.int4_dot(x, *five), avx2_ops.int4_dot(x, *five))


def load_demo(quantize: str, name: str = "demo-qwen", **options):
    from llmcli.demo import ensure_demo
    from llmcli.loader import load_model
    from llmcli.options import Options

    opts = Options(device="cpu", dtype="float32", quantize=quantize, **options)
    return load_model(name, ensure_demo(name), options=opts)


def layer_kinds(model) -> set[str]:
    from llmcli.backends.linear import label_of

    return {label_of(m) for m in model.modules() if label_of(m) is not None}


def test_dispatch_picks_the_integer_kernels_by_cpu_feature_and_option():
    if not int_dot.runs_fast():
        pytest.skip(f"the integer kernels need AVX2 (built here: {int_dot.isa()})")
    int8 = layer_kinds(load_demo("int8").model)
    built = int_dot.isa_label()  # "AVX2", or "AVX2 + VNNI" where the CPU has VNNI
    assert f"int8 kernel (x int8 activations, {built})" in int8, int8  # AVX-512 CPUs too (prepare.py: measured)
    int4 = layer_kinds(load_demo("int4").model)
    assert f"int4 kernel (x int8 activations, {built}, groups of 32)" in int4, int4
    off = layer_kinds(load_demo("int4", int_dot=False).model) | layer_kinds(load_demo("int8", int_dot=False).model)
    assert not any("x int8 activations" in kind for kind in off) and "torch int4 (groups of 32)" in off


def decode_logits(runner, ids: torch.Tensor) -> torch.Tensor:
    """Logits [T, vocab] feeding `ids` one token at a time (the decode path: one-row products)."""
    cache = runner.make_cache(1, ids.numel())
    with torch.inference_mode():
        return torch.cat([runner(ids[None, i:i + 1], cache)[0] for i in range(ids.numel())]).float()


def test_quantised_activations_keep_the_float_paths_logits_and_tokens():
    """On the tiny demo model (random weights, float32): the integer kernels' logits stay within 3% of the
    logits' range of the float int8/int4 paths, and pick the same next token at most positions."""
    if not int_dot.runs_fast():
        pytest.skip(f"the integer kernels need AVX2 (built here: {int_dot.isa()})")
    ids = torch.randint(0, 200, (24,), generator=torch.Generator().manual_seed(0))
    for quantize in ("int8", "int4"):
        integer = decode_logits(load_demo(quantize).runner, ids)
        reference = decode_logits(load_demo(quantize, int_dot=False).runner, ids)
        spread = (reference.amax(-1) - reference.amin(-1)).min()
        assert (integer - reference).abs().max() <= 0.03 * spread, quantize
        assert (integer.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9, quantize


def test_int8_prompts_up_to_integer_rows_run_the_integer_kernel():
    """Up to INTEGER_ROWS rows (prompt chunks) an int8 layer runs the integer kernel, which beats a GEMM on the
    converted weight there (int8.py has the figures); longer ones run that GEMM."""
    import torch.nn.functional as F

    from llmcli.backends.int8 import INTEGER_ROWS, Int8Linear, bf16_matmul_is_fast

    if not int_dot.runs_fast():
        pytest.skip(f"the integer kernels need AVX2 (built here: {int_dot.isa()})")
    torch.manual_seed(0)
    layer = Int8Linear(torch.nn.Linear(96, 64).bfloat16(), kernel=True, integer=True)
    assert layer.integer
    for rows in (1, 17, INTEGER_ROWS):
        x = torch.randn(rows, 96).bfloat16()
        assert torch.equal(layer(x), torch.ops.llmcli.int8_dot(x, layer.weight, layer.scales, None, layer.bias))
    x = torch.randn(INTEGER_ROWS + 1, 96).bfloat16()
    if bf16_matmul_is_fast():
        gemm = F.linear(x, layer.int8_weight(x.dtype)) * layer.scales
    else:
        gemm = (F.linear(x.float(), layer.int8_weight(torch.float32)) * layer.scales.float()).bfloat16()
    assert torch.equal(layer(x), gemm + layer.bias)


def test_kernels_quantise_activations_as_the_reference_does(portable_ops, avx2_ops):
    """Through identity weights (127 on the diagonal, scale 1) int8_dot gives q * 127 * d per input, one rounding:
    both builds' quantisation (AVX2's is vectorised) equals quantize_rows' bit for bit, on ties (x.5 rounds to
    even), zero groups, and values from 1e-30 to 1e30, in each activation dtype."""
    torch.manual_seed(0)
    k = 96
    x = torch.randn(5, k) * torch.logspace(-30, 30, 5)[:, None]
    x[0, :32] = torch.arange(32) - 15.5  # max 15.5: steps of 1/8.19..., and ties where x / d lands on .5
    x[1, 32:64] = torch.tensor([127.0, 2.5, 3.5, -2.5, -0.5, 0.5, 1.5] + [0.0] * 25)  # d = 1: exact ties
    x[2, 64:] = 0.0  # a zero group
    blocks = int8_kernel.to_blocks((torch.eye(k) * 127).to(torch.int8))[None]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xs = x.to(dtype) if dtype == torch.float32 else x.clamp(-6e4, 6e4).to(dtype)
        q, d = int_dot.quantize_rows(xs)
        expected = (q.float().reshape(5, -1, 32) * 127 * d[..., None]).reshape(5, k).to(dtype)
        for ops in (portable_ops, avx2_ops):
            got = ops.int8_dot(xs, blocks, torch.ones(1, k), None)
            assert torch.equal(got, expected), (dtype, ops)
