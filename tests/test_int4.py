"""Weight-only int4 (`--quantize int4`): the format's arithmetic, the module, what loading swaps in, sizes."""

from __future__ import annotations

import json

import pytest
import torch

from llmcli.backends import int4, int_dot
from llmcli.backends.int4 import Int4Linear, dequantize_int4, quantize_int4

pytestmark = pytest.mark.skipif(not int4.available(), reason="this torch build has no CPU int4 product")


@pytest.mark.parametrize("group", [32, 64, 128])
def test_reconstruction_within_half_a_step_per_group(group):
    torch.manual_seed(group)
    w = torch.randn(48, 256) * torch.rand(48, 1) * 3  # rows of different ranges
    q, scale, zero = quantize_int4(w, group, chunk_rows=16)  # several chunks
    assert q.min() >= 0 and q.max() <= 15
    error = (dequantize_int4(q, scale, zero) - w).abs()
    step = scale.repeat_interleave(group, 1)
    assert (error <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("rows", [1, 3, 17, 128])
def test_product_equals_the_dequantised_weight(rows):
    torch.manual_seed(rows)
    linear = torch.nn.Linear(96, 80)  # 80 outputs: whole groups of 16
    module = Int4Linear(linear)
    w = dequantize_int4(*quantize_int4(linear.weight.detach()))
    x = torch.randn(2, rows, 96)
    expected = x.double() @ w.double().T + linear.bias.double()
    assert torch.allclose(module(x).double(), expected, atol=1e-4, rtol=1e-4)
    half = linear.bfloat16()  # bfloat16 activations, scales and zero points: within bf16 rounding of the sums
    q, scale, zero = quantize_int4(half.weight.detach())
    w = dequantize_int4(q, scale.bfloat16().float(), zero.bfloat16().float())
    xb = x.bfloat16()
    got = Int4Linear(half)(xb)
    assert got.dtype == torch.bfloat16
    expected = xb.double() @ w.double().T + half.bias.double()
    magnitude = xb.double().abs() @ w.double().abs().T + half.bias.double().abs()
    assert ((got.double() - expected).abs() <= 2**-7 * magnitude).all()


def test_gguf_q4_0_and_q4_1_blocks_are_expressed_exactly():
    """Q4_0: w = d * (q - 8); Q4_1: w = d * q + m, groups of 32: both given to Int4Linear without re-quantising."""
    torch.manual_seed(0)
    q = torch.randint(0, 16, (32, 64), dtype=torch.int32)
    d, m = torch.rand(32, 2) * 0.1, torch.randn(32, 2) * 0.1
    linear = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(3, 64)
    w0 = d.repeat_interleave(32, 1) * (q.float() - 8)
    w1 = d.repeat_interleave(32, 1) * q.float() + m.repeat_interleave(32, 1)
    integer = (False, True) if int_dot.runs_fast() else (False,)
    for kernel in integer:
        q4_0 = Int4Linear(linear.float(), quantized=(q, d, None), integer=kernel)
        q4_1 = Int4Linear(linear.float(), quantized=(q, d, m + 8 * d), integer=kernel)
        assert q4_0.integer == kernel
        for module, w in ((q4_0, w0), (q4_1, w1)):  # the kernel quantises x to int8 and scales to float16
            expected = x @ w.T
            assert torch.allclose(module(x), expected, atol=2e-2 * expected.abs().max() if kernel else 1e-5)
    if int_dot.runs_fast():  # Q4_0 keeps scales alone; joined with a Q4_1 part, both take minimums
        assert q4_0.scales_and_mins.shape[-2] == 1 and q4_1.scales_and_mins.shape[-2] == 2
        joined = Int4Linear.joined([q4_0, q4_1])
        assert joined.scales_and_mins.shape[-2] == 2
        assert torch.allclose(joined(x), torch.cat([q4_0(x), q4_1(x)], -1), rtol=1e-5, atol=1e-5)
        assert Int4Linear.joined([q4_0, q4_0]).scales_and_mins.shape[-2] == 1


def test_loading_quantises_linears_the_head_in_6_or_8_bits_and_misfits_int8(tmp_path):
    """The head takes 6 bits where the integer kernels run (x86 with AVX2), else int8; `show`'s estimate of the
    loaded bytes holds either way."""
    from llmcli.backends import int_dot
    from llmcli.backends.int6 import Int6Linear
    from llmcli.backends.int8 import Int8Linear, weight_bytes
    from llmcli.config import load_config
    from llmcli.demo import ensure_demo
    from llmcli.formats.safetensors import read_checkpoint
    from llmcli.loader import load_model
    from llmcli.memory import loaded_tensors
    from llmcli.memory import weight_bytes as estimated_bytes

    path = ensure_demo("demo-qwen")
    loaded = load_model("demo-qwen", path, device="cpu", dtype="bfloat16", quantize="int4")
    kinds = {name: type(m).__name__ for name, m in loaded.model.named_modules()
             if isinstance(m, (Int4Linear, Int6Linear, Int8Linear))}
    six_bits = int_dot.runs_fast()
    assert kinds.pop("lm_head") == ("Int6Linear" if six_bits else "Int8Linear")
    assert kinds and set(kinds.values()) == {"Int4Linear"}
    cfg = load_config(path)
    tensors = loaded_tensors(cfg, read_checkpoint(path))
    estimate = estimated_bytes(cfg, tensors, "bfloat16", "int4", six_bit_head=six_bits)
    assert abs(weight_bytes(loaded.model) - estimate) <= 0.01 * estimate  # what `show` reports
    other = estimated_bytes(cfg, tensors, "bfloat16", "int4", six_bit_head=not six_bits)
    assert abs(weight_bytes(loaded.model) - other) > 0.01 * estimate  # the head's bits make a difference here
    misfit = torch.nn.Linear(64, 40).bfloat16()  # 40 outputs: not whole groups of 16
    assert not int4.fits(misfit.weight.shape) and int4.fits((48, 64))


def test_int4_tokens_follow_bfloat16_and_cli_reports_it(run_cli):
    code, out, err = run_cli("generate", "demo-deepseek", "-p", "a b c", "-n", "3", "--raw", "--json",
                             "--dtype", "bfloat16")
    assert code == 0, err
    bf16 = json.loads(out)["token_ids"]
    code, out, err = run_cli("generate", "demo-deepseek", "-p", "a b c", "-n", "3", "--raw", "--json",
                             "--dtype", "bfloat16", "--quantize", "int4")
    assert code == 0, err
    assert json.loads(out)["token_ids"][:1] == bf16[:1]


def test_unknown_quantize_mode_is_one_line(run_cli):
    code, _, err = run_cli("generate", "demo-qwen", "-p", "hi", "--quantize", "int3")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "int3" in err


def test_trace_runs_on_int4_weights_and_says_so(run_cli, tmp_path):
    out = tmp_path / "trace.json"
    code, _, err = run_cli("trace", "demo-deepseek", "--quantize", "int4", "--json", out)
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["settings"]["quantize"] == "int4"
    assert any(layer["router"] for layer in data["layers"])  # router choices still recorded


@pytest.mark.skipif(not int_dot.runs_fast(), reason="int5 runs on llmcli's AVX2 integer kernel, not built here")
def test_int5_halves_int4s_error_and_show_estimates_its_bytes():
    """--quantize int5 from floats: 31 steps per group instead of 15, each value within half a step of its
    group's grid (and float16's rounding of scale and min), about half int4's error; linears become Int5Linear,
    the head 6-bit; the estimate `show` prints holds."""
    from llmcli.backends.int6 import Int6Linear
    from llmcli.backends.int8 import weight_bytes
    from llmcli.config import load_config
    from llmcli.demo import ensure_demo
    from llmcli.formats.safetensors import read_checkpoint
    from llmcli.loader import load_model
    from llmcli.memory import loaded_tensors
    from llmcli.memory import weight_bytes as estimated_bytes

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 64, bias=False)
    weight = linear.weight.detach()
    five, four = int4.Int5Linear(linear), Int4Linear(linear, integer=True)
    errors = {}
    for name, module in (("int5", five), ("int4", four)):
        got = int_dot.int4_unblock(module.packed, module.scales_and_mins)
        groups = weight.reshape(64, 8, 32)
        step = (groups.amax(-1) - groups.amin(-1)) / (31 if name == "int5" else 15)
        rounding = 2**-10 * groups.abs().amax(-1, keepdim=True)  # the scale and min in float16
        assert ((got - weight).abs().reshape(64, 8, 32) <= step[..., None] / 2 + rounding).all()
        errors[name] = (got - weight).norm() / weight.norm()
    assert 0.4 < errors["int5"] / errors["int4"] < 0.6
    assert five.label.startswith("int5 kernel")

    path = ensure_demo("demo-qwen")
    loaded = load_model("demo-qwen", path, device="cpu", dtype="bfloat16", quantize="int5")
    kinds = {name: type(m) for name, m in loaded.model.named_modules() if isinstance(m, (Int4Linear, Int6Linear))}
    assert kinds.pop("lm_head") is Int6Linear and set(kinds.values()) == {int4.Int5Linear}
    cfg = load_config(path)
    estimate = estimated_bytes(cfg, loaded_tensors(cfg, read_checkpoint(path)), "bfloat16", "int5")
    assert abs(weight_bytes(loaded.model) - estimate) <= 0.01 * estimate


def test_int5_tokens_follow_bfloat16_and_cli_reports_it(run_cli):
    code, out, err = run_cli("generate", "demo-qwen", "-p", "a b c", "-n", "4", "--raw", "--json",
                             "--dtype", "bfloat16")
    assert code == 0, err
    bf16 = json.loads(out)["token_ids"]
    code, out, err = run_cli("bench", "demo-qwen", "-p", "8", "-n", "4", "-r", "1", "-w", "0", "--json", "-",
                             "--dtype", "bfloat16", "--quantize", "int5")
    assert code == 0, err
    env = json.loads(out)["env"]
    assert env["quantize"] == "int5"
    assert any(k.startswith("int5 kernel") for k in env["products"]) == int_dot.runs_fast()
    code, out, err = run_cli("generate", "demo-qwen", "-p", "a b c", "-n", "4", "--raw", "--json", "--dtype",
                             "bfloat16", "--quantize", "int5")
    assert code == 0, err
    assert json.loads(out)["token_ids"][:2] == bf16[:2]


def test_parts_are_counted_in_values_so_that_wide_matrices_take_fewer_rows():
    """A part's rows: whole blocks of 8 for about the given number of values, at least one block."""
    assert int_dot.rows_per_part(896, 1 << 22) == 4680  # 4,193,280 values
    assert int_dot.rows_per_part(18944, 1 << 22) == 216  # a 7B model's down projection: 4,091,904
    assert int_dot.rows_per_part(18944, 1 << 20) == 48
    assert int_dot.rows_per_part(1 << 20, 1 << 20) == 8  # wider than the budget: one block
    assert int_dot.rows_per_part(0, 64) == 64


def test_quantising_a_part_of_the_rows_at_a_time_stores_the_whole_matrix_quantisation(monkeypatch):
    """Int4Linear and Int5Linear quantise and pack about QUANTIZE_PART_VALUES weights at a time (the load's peak
    memory): the same bytes and scales as quantising the whole matrix and packing it at once."""
    from llmcli.backends.int4 import Int5Linear, quantize_min_max

    if not int_dot.runs_fast():
        pytest.skip(f"the integer kernels need AVX2 (built here: {int_dot.isa()})")
    monkeypatch.setattr(int4, "QUANTIZE_PART_VALUES", 16 * 96)
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 56).bfloat16()  # 56 rows: parts of 16, 16, 16 and 8
    q, scale, zero = quantize_int4(linear.weight.detach())
    packed, sm = int_dot.int4_blocks(q, scale, zero - 8 * scale)
    layer = Int4Linear(linear, integer=True)
    assert layer.integer and torch.equal(layer.packed, packed) and torch.equal(layer.scales_and_mins, sm)
    packed, sm = int_dot.int5_blocks(*quantize_min_max(linear.weight.detach(), 31))
    layer = Int5Linear(linear)
    assert torch.equal(layer.packed, packed) and torch.equal(layer.scales_and_mins, sm)
    assert layer.bias is linear.bias and layer.out_features == 56
