"""Each build of llmcli's bfloat16 kernel that this CPU can run, against a float64 reference on awkward shapes:
inputs not a multiple of the pass depth, outputs not a multiple of the panel, 1 to 17 rows, rows through
different experts. Variants the CPU lacks are skipped with the reason; the baseline loops always run."""

from __future__ import annotations

import pytest
import torch

from llmcli.backends import bf16_kernel
from tests.test_bf16_kernel import assert_rounded_from, reference  # float64 reference, bf16 rounding


@pytest.fixture(params=["baseline", "avx2"])
def ops(request):
    return request.getfixturevalue("portable_ops" if request.param == "baseline" else "avx2_ops")


@pytest.fixture(params=["native", "baseline", "avx2"])
def every_build(request):
    """The build llmcli loads here, then the other builds this CPU can run."""
    if request.param == "native":
        if not bf16_kernel.available()[0]:
            pytest.skip("llmcli's kernels do not run a fast bfloat16 path on this CPU")
        return torch.ops.llmcli
    return request.getfixturevalue("portable_ops" if request.param == "baseline" else "avx2_ops")


def test_each_build_says_what_it_runs(portable_ops, avx2_ops):
    assert portable_ops.bf16_isa() == "portable"
    assert avx2_ops.bf16_isa() == "avx2" and not avx2_ops.built_with_avx512_bf16()


@pytest.mark.parametrize("inputs", [2, 94, 1026, 2050])  # around the 1024 and 2048 pass depths
@pytest.mark.parametrize("outputs", [64, 72])  # a whole panel; a padded one
def test_products_on_awkward_shapes(ops, inputs, outputs):
    torch.manual_seed(inputs + outputs)
    w, bias = torch.randn(outputs, inputs).bfloat16(), torch.randn(outputs).bfloat16()
    blocks = bf16_kernel.to_blocks(w)[None]
    padded_bias = torch.cat([bias, bias.new_zeros(blocks.shape[1] * 64 - outputs)])
    for rows in range(1, 18):
        x = torch.randn(rows, inputs).bfloat16()
        got = ops.bf16_linear(x, blocks, padded_bias, None)[:, :outputs]
        assert_rounded_from(got, reference(x, w, bias))
        assert_rounded_from(ops.bf16_linear(x, blocks, None, None)[:, :outputs], reference(x, w))


def test_rows_through_their_own_experts(ops):
    torch.manual_seed(0)
    weights = [torch.randn(128, 96).bfloat16() for _ in range(3)]
    stack = torch.stack([bf16_kernel.to_blocks(w) for w in weights])
    experts = torch.tensor([2, 0, 0, 1, 2, 2, 2, 2, 2, 2, 2, 2, 0, 1, 1])  # runs of 1, 2 and beyond a 6-row tile
    x = torch.randn(len(experts), 96).bfloat16()
    got = ops.bf16_linear(x, stack, None, experts)
    for row, expert in enumerate(experts.tolist()):
        assert_rounded_from(got[row: row + 1], reference(x[row: row + 1], weights[expert]))


def test_the_native_build_agrees_with_the_baseline(portable_ops):
    """The build llmcli loads here (whatever this CPU has) gives the baseline's products within rounding."""
    if not bf16_kernel.available()[0]:
        pytest.skip("llmcli's kernels do not run a fast bfloat16 path on this CPU")
    torch.manual_seed(1)
    w = torch.randn(200, 4864).bfloat16()
    blocks = bf16_kernel.to_blocks(w)[None]
    for rows in (1, 3, 13):
        x = torch.randn(rows, 4864).bfloat16()
        native = torch.ops.llmcli.bf16_linear(x, blocks, None, None)
        baseline = portable_ops.bf16_linear(x, blocks, None, None)
        ref = reference(x, w)
        assert_rounded_from(native[:, :200], ref)
        assert_rounded_from(baseline[:, :200], ref)


@pytest.mark.parametrize("rows", [1, 7])
def test_float32_rows_give_the_sums_unrounded(every_build, rows):
    """A head's logits: float32 rows (bfloat16 values) give float32 outputs, which round to exactly the bfloat16
    outputs and lie within float32 summation noise of the float64 product, far closer than bfloat16's steps."""
    torch.manual_seed(rows)
    w, bias = torch.randn(200, 2050).bfloat16(), torch.randn(200).bfloat16()
    blocks = bf16_kernel.to_blocks(w)[None]
    padded_bias = torch.cat([bias, bias.new_zeros(blocks.shape[1] * 64 - 200)])
    x = torch.randn(rows, 2050).bfloat16()
    wide = every_build.bf16_linear(x.float(), blocks, padded_bias, None)[:, :200]
    narrow = every_build.bf16_linear(x, blocks, padded_bias, None)[:, :200]
    assert wide.dtype == torch.float32
    assert torch.equal(wide.bfloat16(), narrow)
    ref = reference(x, w, bias)
    error = (wide.double() - ref).abs().max().item()
    assert error <= 1e-5 * ref.abs().max().item()
    assert error < (narrow.double() - ref).abs().max().item() / 16
