"""Worked values for llmcli.models.rope: every expected number is computed here by hand or with the math
module straight from the published formulas, never by calling the function under test another way."""

from __future__ import annotations

import math

import pytest
import torch

from llmcli.config_fields import RopeScaling
from llmcli.models.rope import (
    apply_rope,
    default_inv_freq,
    logn_factor,
    logn_scale,
    logn_scale_at,
    ntk_alpha,
    ntk_base,
    pair_cos_sin,
    rope_cos_sin,
    rope_inv_freq,
    rotate_pairs,
    yarn_inv_freq,
    yarn_mscale,
    yarn_softmax_scale,
)

F64 = torch.float64


def close(actual, expected, rtol=1e-6, atol=0.0):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64),
                               rtol=rtol, atol=atol)


# -- default frequencies -----------------------------------------------------------------------------


def test_default_inv_freq_dim8():
    inv = default_inv_freq(8, 10000.0)
    assert inv.shape == (4,)
    assert inv.dtype == torch.float32
    close(inv, [1.0, 0.1, 0.01, 0.001])


def test_default_inv_freq_dim128_base1e6():
    inv = default_inv_freq(128, 1e6)
    assert inv.shape == (64,)
    close(inv, [1e6 ** (-2 * i / 128) for i in range(64)])
    close(inv[32], 1e-3)  # base^(-64/128) = 1/sqrt(1e6)


# -- YaRN temperature and MLA softmax scale ----------------------------------------------------------

LN40 = math.log(40)
M_V3 = 0.1 * LN40 + 1  # 1.3688879454113936
M_V2_LITE = 0.1 * 0.707 * LN40 + 1  # 1.2608037775...


def test_yarn_mscale():
    assert yarn_mscale(1.0) == 1.0
    assert yarn_mscale(0.5, 0.707) == 1.0  # no scaling: 1 whatever mscale is
    close(yarn_mscale(40.0), 1.3688879454113936, rtol=1e-15)
    close(yarn_mscale(40.0, 1.0), M_V3, rtol=1e-15)
    close(yarn_mscale(40.0, 0.707), M_V2_LITE, rtol=1e-15)
    close(yarn_mscale(4.0), 1 + 0.1 * 2 * math.log(2), rtol=1e-15)


def test_yarn_softmax_scale_deepseek_v3():
    s = RopeScaling(type="yarn", factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0)
    expected = (128 + 64) ** -0.5 * M_V3 ** 2
    close(yarn_softmax_scale(192, s), expected, rtol=1e-14)
    close(yarn_softmax_scale(192, s), 0.1352338, rtol=1e-6)  # 0.0721688 * 1.8738541


def test_yarn_softmax_scale_v2_lite():
    s = RopeScaling(type="yarn", factor=40.0, original_max_position_embeddings=4096, mscale=0.707,
                    mscale_all_dim=0.707)
    close(yarn_softmax_scale(192, s), 192 ** -0.5 * M_V2_LITE ** 2, rtol=1e-14)


def test_yarn_softmax_scale_without_scaling():
    close(yarn_softmax_scale(192, RopeScaling()), 1 / math.sqrt(192), rtol=1e-15)
    close(yarn_softmax_scale(128, RopeScaling()), 1 / math.sqrt(128), rtol=1e-15)
    # YaRN without mscale_all_dim (Qwen2.5 long context): the softmax scale is untouched.
    qwen = RopeScaling(type="yarn", factor=4.0, original_max_position_embeddings=32768)
    close(yarn_softmax_scale(128, qwen), 1 / math.sqrt(128), rtol=1e-15)
    # mscale_all_dim on a non-yarn scaling does nothing either.
    close(yarn_softmax_scale(192, RopeScaling(mscale_all_dim=1.0, factor=40.0)), 1 / math.sqrt(192), rtol=1e-15)


# -- YaRN frequencies --------------------------------------------------------------------------------


def small_yarn(**kw) -> RopeScaling:
    args = dict(type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0)
    args.update(kw)
    return RopeScaling(**args)


def test_yarn_small_case_by_hand():
    dim, base, factor, original = 8, 10000.0, 4.0, 64
    # Correction dims: d * ln(L / (2 pi r)) / (2 ln base), r = beta rotations over the original context.
    low_raw = dim * math.log(original / (32 * 2 * math.pi)) / (2 * math.log(base))
    high_raw = dim * math.log(original / (1 * 2 * math.pi)) / (2 * math.log(base))
    assert low_raw == pytest.approx(-0.49715, abs=1e-5)
    assert high_raw == pytest.approx(1.00800, abs=1e-5)
    low, high = max(math.floor(low_raw), 0), min(math.ceil(high_raw), dim - 1)
    assert (low, high) == (0, 2)
    ramp = [min(max((i - low) / (high - low), 0.0), 1.0) for i in range(dim // 2)]
    assert ramp == [0.0, 0.5, 1.0, 1.0]
    plain = [base ** (-2 * i / dim) for i in range(dim // 2)]  # 1, 0.1, 0.01, 0.001
    expected = [p / factor * r + p * (1 - r) for p, r in zip(plain, ramp, strict=True)]
    close(expected, [1.0, 0.0625, 0.0025, 0.00025], rtol=1e-12)

    inv, attention = yarn_inv_freq(dim, base, small_yarn())
    assert inv.shape == (4,)
    close(inv, expected)
    close(inv[0], plain[0])  # highest frequency kept
    close(inv[-1], plain[-1] / factor)  # lowest frequency interpolated by the factor
    close(attention, 0.1 * math.log(4) + 1, rtol=1e-12)  # neither attention_factor nor mscale given

    inv2, attention2 = rope_inv_freq(dim, base, small_yarn())
    close(inv2, expected)
    assert attention2 == attention


def test_yarn_small_case_untruncated():
    # truncate=False keeps the fractional correction dims: low clamps to 0, high = 1.00800.
    high = 8 * math.log(64 / (2 * math.pi)) / (2 * math.log(10000))
    ramp1 = 1 / high
    expected = [1.0, 0.1 * (ramp1 / 4 + (1 - ramp1)), 0.01 / 4, 0.001 / 4]
    inv, _ = yarn_inv_freq(8, 10000.0, small_yarn(truncate=False))
    close(inv, expected)


def test_yarn_zero_width_ramp():
    # original 1: both correction dims are below 0 and clamp to 0; the ramp becomes a step after dim 0.
    inv, _ = yarn_inv_freq(8, 10000.0, small_yarn(original_max_position_embeddings=1))
    close(inv, [1.0, 0.1 / 4, 0.01 / 4, 0.001 / 4])


def reference_yarn(dim, base, factor, original, beta_fast, beta_slow):
    """YaRN from the paper / DeepSeek's modeling code, element by element with the math module."""
    def corr(r):
        return dim * math.log(original / (r * 2 * math.pi)) / (2 * math.log(base))
    low = max(math.floor(corr(beta_fast)), 0)
    high = min(math.ceil(corr(beta_slow)), dim - 1)
    out = []
    for i in range(dim // 2):
        r = min(max((i - low) / (high - low), 0.0), 1.0)
        p = base ** (-2 * i / dim)
        out.append(p / factor * r + p * (1 - r))
    return out, (low, high)


def test_yarn_deepseek_v3_rope_dims():
    # DeepSeek-V3: qk_rope_head_dim 64, base 10000, factor 40, original 4096, beta 32/1.
    expected, (low, high) = reference_yarn(64, 10000.0, 40.0, 4096, 32, 1)
    assert (low, high) == (10, 23)
    s = RopeScaling(type="yarn", factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0)
    inv, attention = rope_inv_freq(64, 10000.0, s)
    close(inv, expected)
    close(inv[:10], [10000.0 ** (-2 * i / 64) for i in range(10)])  # below low: unchanged
    close(inv[23:], [10000.0 ** (-2 * i / 64) / 40 for i in range(23, 32)])  # from high: / factor
    assert attention == 1.0  # mscale / mscale_all_dim = 1: the temperature goes into the softmax scale instead


def test_yarn_qwen25_long_context():
    # Qwen2.5 YaRN: head dim 128, base 1e6, factor 4, original 32768.
    expected, _ = reference_yarn(128, 1e6, 4.0, 32768, 32, 1)
    s = RopeScaling(type="yarn", factor=4.0, original_max_position_embeddings=32768)
    inv, attention = rope_inv_freq(128, 1e6, s)
    close(inv, expected)
    close(attention, 0.1 * math.log(4) + 1, rtol=1e-12)


def test_yarn_attention_factor_cases():
    # attention_factor given: taken as is, whatever mscale says.
    _, a = yarn_inv_freq(8, 10000.0, small_yarn(attention_factor=0.8, mscale=1.0, mscale_all_dim=0.5))
    assert a == 0.8
    # mscale and mscale_all_dim: the ratio of the two temperatures.
    _, a = yarn_inv_freq(8, 10000.0, small_yarn(factor=40.0, mscale=1.0, mscale_all_dim=0.707))
    close(a, (0.1 * LN40 + 1) / (0.0707 * LN40 + 1), rtol=1e-12)
    close(a, 1.0857264, rtol=1e-6)
    _, a = yarn_inv_freq(8, 10000.0, small_yarn(factor=40.0, mscale=0.707, mscale_all_dim=0.707))
    close(a, 1.0, rtol=1e-15)  # V2-Lite
    # Neither: 0.1 ln(factor) + 1.
    _, a = yarn_inv_freq(8, 10000.0, small_yarn(factor=40.0))
    close(a, 1.3688879454113936, rtol=1e-12)


def test_rope_inv_freq_default():
    inv, scale = rope_inv_freq(8, 10000.0, RopeScaling())
    assert scale == 1.0
    close(inv, [1.0, 0.1, 0.01, 0.001])
    torch.testing.assert_close(inv, default_inv_freq(8, 10000.0), rtol=0, atol=0)


def test_rope_inv_freq_on_cpu_under_meta_device():
    with torch.device("meta"):
        inv, _ = rope_inv_freq(8, 10000.0, small_yarn())
        plain, _ = rope_inv_freq(8, 10000.0, RopeScaling())
    assert inv.device.type == "cpu" and plain.device.type == "cpu"
    close(inv, [1.0, 0.0625, 0.0025, 0.00025])


# -- dynamic NTK -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_length", [2048, 8192])
def test_ntk_alpha_table(seq_length):
    s = seq_length
    table = {1: 1, s // 2: 1, s - 1: 1, s: 1,  # L <= S
             s + 1: 3, 2 * s - 1: 3, 2 * s: 3,  # S < L <= 2S
             2 * s + 1: 7, 3 * s: 7, 4 * s: 7,  # 2S < L <= 4S
             4 * s + 1: 15, 8 * s: 15, 8 * s + 1: 31, 16 * s: 31}
    for length, alpha in table.items():
        assert ntk_alpha(length, s) == alpha, (length, s)


def test_ntk_base_worked_values():
    assert ntk_base(10000.0, 1, 128) == 10000.0
    assert ntk_base(10000.0, 3, 128) == pytest.approx(30527.7, abs=0.05)
    assert ntk_base(10000.0, 7, 128) == pytest.approx(72195.9, abs=0.05)
    assert ntk_base(10000.0, 3, 128) == pytest.approx(10000 * math.exp(128 / 126 * math.log(3)), rel=1e-12)
    # Partial rotary dims change the exponent: d = 64 -> alpha^(64/62).
    assert ntk_base(10000.0, 3, 64) == pytest.approx(10000 * 3 ** (64 / 62), rel=1e-12)


# -- LogN --------------------------------------------------------------------------------------------


def test_logn_factor():
    s = 8
    for p in range(s):  # positions 0..S-1: p + 1 <= S
        assert logn_factor(p, s) == 1.0
    assert logn_factor(8, s) == pytest.approx(math.log(9) / math.log(8), rel=1e-15)
    assert logn_factor(63, s) == pytest.approx(2.0, rel=1e-15)  # ln 64 / ln 8
    assert logn_factor(511, s) == pytest.approx(3.0, rel=1e-15)
    assert logn_factor(4095, 2048) == pytest.approx(12 / 11, rel=1e-15)  # ln 4096 / ln 2048
    assert logn_factor(2047, 2048) == 1.0
    assert logn_factor(2048, 2048) > 1.0


def test_logn_scale_matches_factors():
    s = 8
    for start, length in [(0, 20), (5, 7), (8, 1), (30, 3)]:
        t = logn_scale(start, length, s)
        assert t.shape == (length, 1) and t.dtype == F64
        expected = [[1.0 if p + 1 <= s else math.log(p + 1) / math.log(s)] for p in range(start, start + length)]
        close(t, expected, rtol=1e-15)
    t = logn_scale(0, 16, s)
    assert (t[:8] == 1.0).all()
    assert (t[8:] > 1.0).all()


def test_logn_scale_at_matches_logn_scale():
    for s in (8, 2048):
        for start, length in [(0, 3 * s), (s - 2, 5), (2 * s, 4)]:
            positions = torch.arange(start, start + length)
            at = logn_scale_at(positions, s)
            assert at.shape == (length, 1) and at.dtype == F64
            close(at, logn_scale(start, length, s), rtol=1e-15)
    # Scattered positions (a batch of sequences at different lengths) against the per-position factor.
    positions = torch.tensor([0, 7, 8, 63, 100])
    close(logn_scale_at(positions, 8), [[logn_factor(int(p), 8)] for p in positions], rtol=1e-15)


# -- rotation ----------------------------------------------------------------------------------------

INV4 = torch.tensor([1.0, 0.1, 0.01, 0.001], dtype=F64)  # dim 8, base 10000, in float64


def test_rope_cos_sin_layout_and_scale():
    positions = torch.tensor([0, 1, 5, 1000])
    cos, sin = rope_cos_sin(positions, INV4, 1.5, F64)
    assert cos.shape == (4, 8) and sin.shape == (4, 8) and cos.dtype == F64
    torch.testing.assert_close(cos[:, :4], cos[:, 4:], rtol=0, atol=0)
    torch.testing.assert_close(sin[:, :4], sin[:, 4:], rtol=0, atol=0)
    for t, p in enumerate(positions.tolist()):
        for i, f in enumerate(INV4.tolist()):
            assert cos[t, i].item() == pytest.approx(1.5 * math.cos(p * f), abs=1e-12)
            assert sin[t, i].item() == pytest.approx(1.5 * math.sin(p * f), abs=1e-12)
    c16, s16 = rope_cos_sin(positions, INV4.float(), 1.0, torch.bfloat16)
    assert c16.dtype == torch.bfloat16 and s16.dtype == torch.bfloat16


def test_pair_cos_sin():
    positions = torch.tensor([0, 3, 7])
    cos, sin = pair_cos_sin(positions, INV4, 0.5, F64)
    assert cos.shape == (3, 4) and sin.shape == (3, 4)
    expected_cos = [[0.5 * math.cos(p * f) for f in INV4.tolist()] for p in positions.tolist()]
    expected_sin = [[0.5 * math.sin(p * f) for f in INV4.tolist()] for p in positions.tolist()]
    close(cos, expected_cos, rtol=0, atol=1e-12)
    close(sin, expected_sin, rtol=0, atol=1e-12)


X8 = [0.3, -1.2, 0.7, 2.0, -0.5, 1.1, 0.9, -0.4]


def rotate_by_hand(pairs, p):
    """Rotate each (a, b) of `pairs` by p * INV4[i]: (a cos - b sin, b cos + a sin)."""
    out = []
    for (a, b), f in zip(pairs, INV4.tolist(), strict=True):
        th = p * f
        out.append((a * math.cos(th) - b * math.sin(th), b * math.cos(th) + a * math.sin(th)))
    return out


def test_apply_rope_rotates_half_pairs():
    p = 5
    x = torch.tensor(X8, dtype=F64).view(1, 1, 1, 8)
    cos, sin = rope_cos_sin(torch.tensor([p]), INV4, 1.0, F64)
    out = apply_rope(x, cos, sin).view(8)
    rotated = rotate_by_hand([(X8[i], X8[i + 4]) for i in range(4)], p)
    expected = [a for a, _ in rotated] + [b for _, b in rotated]
    close(out, expected, rtol=0, atol=1e-12)
    close(out.norm(), torch.tensor(X8, dtype=F64).norm(), rtol=1e-12)  # a rotation keeps the norm
    # Position 0 is the identity.
    cos0, sin0 = rope_cos_sin(torch.tensor([0]), INV4, 1.0, F64)
    close(apply_rope(x, cos0, sin0).view(8), X8, rtol=0, atol=1e-15)


def test_apply_rope_scale_multiplies():
    x = torch.tensor(X8, dtype=F64).view(1, 1, 1, 8)
    cos, sin = rope_cos_sin(torch.tensor([5]), INV4, 1.0, F64)
    cos2, sin2 = rope_cos_sin(torch.tensor([5]), INV4, 1.25, F64)
    close(apply_rope(x, cos2, sin2), 1.25 * apply_rope(x, cos, sin), rtol=1e-12)


def test_rotate_pairs_interleaved():
    p = 5
    x = torch.tensor(X8, dtype=F64).view(1, 1, 1, 8)
    cos, sin = pair_cos_sin(torch.tensor([p]), INV4, 1.0, F64)
    out = rotate_pairs(x, cos, sin, interleaved=True).view(8)
    rotated = rotate_by_hand([(X8[2 * i], X8[2 * i + 1]) for i in range(4)], p)
    expected = [a for a, _ in rotated] + [b for _, b in rotated]  # written half-split
    close(out, expected, rtol=0, atol=1e-12)


def test_rotate_pairs_half_split_equals_apply_rope():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g, dtype=F64)
    positions = torch.tensor([0, 1, 7, 30, 1000])
    cos, sin = rope_cos_sin(positions, INV4, 1.0, F64)
    pcos, psin = pair_cos_sin(positions, INV4, 1.0, F64)
    close(rotate_pairs(x, pcos, psin, interleaved=False), apply_rope(x, cos, sin), rtol=0, atol=1e-12)
    # And by hand for one vector.
    out = rotate_pairs(torch.tensor(X8, dtype=F64).view(1, 8), pcos[2:3], psin[2:3], interleaved=False).view(8)
    rotated = rotate_by_hand([(X8[i], X8[i + 4]) for i in range(4)], 7)
    close(out, [a for a, _ in rotated] + [b for _, b in rotated], rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", ["apply_rope", "half", "interleaved"])
def test_dot_products_depend_on_position_difference(layout):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(8, generator=g, dtype=F64)
    k = torch.randn(8, generator=g, dtype=F64)

    def rot(v, p):
        pos = torch.tensor([p])
        if layout == "apply_rope":
            cos, sin = rope_cos_sin(pos, INV4, 1.0, F64)
            return apply_rope(v.view(1, 1, 1, 8), cos, sin).view(8)
        cos, sin = pair_cos_sin(pos, INV4, 1.0, F64)
        return rotate_pairs(v.view(1, 8), cos, sin, interleaved=layout == "interleaved").view(8)

    def score(pq, pk):
        return torch.dot(rot(q, pq), rot(k, pk)).item()

    assert score(10, 3) == pytest.approx(score(107, 100), abs=1e-9)
    assert score(3, 10) == pytest.approx(score(50, 57), abs=1e-9)
    assert score(4, 4) == pytest.approx(score(0, 0), abs=1e-9)
    assert score(0, 0) == pytest.approx(torch.dot(q, k).item(), abs=1e-12)
    assert score(10, 3) != pytest.approx(score(10, 4), abs=1e-6)  # a different offset does change it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_with_folded_sin_is_apply_rope_bit_for_bit(dtype):
    """Decode steps rotate q and k with rotate-half's sign folded into sin (fewer ops): the same bits,
    also on the transposed views that attention hands it."""
    from llmcli.models.rope import apply_rope, fold_sign, rotate

    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 16, dtype=dtype).transpose(1, 2)  # [B, heads, T, D], not contiguous
    cos, sin = torch.randn(5, 16, dtype=dtype), torch.randn(5, 16, dtype=dtype)
    assert torch.equal(rotate(x, cos, fold_sign(sin)), apply_rope(x, cos, sin))
