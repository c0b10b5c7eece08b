"""int8 with a scale per 32 inputs (GGUF's Q8_0 as stored) and 6 bits with a scale per 16 (Q6_K as stored): the
kernel's storage and products on every build, the codes read from a file, and an int8 run of a Q8_0 or Q6_K file
multiplying by exactly the file's matrices."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file

from llmcli.backends import int8_kernel, int_dot
from llmcli.backends.int4 import Int4Linear, Int6Per16Linear, Int8GroupLinear
from llmcli.formats.gguf_int4 import int8_codes, q6_k_codes
from tests.gguf_convert import convert, q6_k_blocks, random_k_blocks
from tests.test_gguf import QUANT, build, dequantised_checkpoint
from tests.test_int_kernels import close, dequantised_rows

pytestmark = pytest.mark.skipif(not int8_kernel.available()[0], reason="llmcli's CPU kernels cannot be built here")


def q8_weight(n: int, k: int, seed: int = 0):
    """Random Q8_0-like codes over the whole int8 range (-128 included, which llama.cpp never writes but a file may
    hold), float16-representable scales, and the float64 matrix w = q * scale."""
    torch.manual_seed(seed)
    q = torch.randint(-128, 128, (n, k))
    q[0, :32] = torch.tensor([-128, 127] * 16)  # both ends in one group
    scale = (torch.rand(n, k // 32) * 0.02).half().float()
    return q, scale, q.double() * scale.double().repeat_interleave(32, 1)


def test_storage_holds_codes_offset_by_128_rows_in_lanes():
    q, scale, weight = q8_weight(24, 64)
    packed, sm = int_dot.int8_group_blocks(q, scale)
    assert packed.shape == (3, 2, 256) and packed.dtype == torch.uint8 and sm.shape == (3, 2, 1, 8)
    assert int_dot.bits_of(packed) == 8
    # 32 bytes per 4 inputs: rows 0..7 of the block, 4 bytes each (block 1's rows 8..15, group 1's inputs 32..63)
    group = (packed[1, 1].long() - 128).reshape(8, 8, 4)
    assert torch.equal(group[0, 0], q[8, 32:36]) and torch.equal(group[0, 7], q[15, 32:36])
    assert torch.equal(group[5, 2], q[10, 52:56])
    assert torch.equal(group.permute(1, 0, 2).reshape(8, 32), q[8:16, 32:64])
    assert torch.equal(sm[0, 1, 0].float(), scale[:8, 1])
    assert torch.equal(int_dot.int4_unblock(packed, sm).double(), weight)  # (u - 128) * scale, exactly


@pytest.mark.parametrize("rows", [1, 2, 7, 17])
def test_product_equals_the_quantised_reference(rows):
    """Outputs a multiple of 8 but not 16 (40), inputs 3 groups and 152 (a down projection); tiles of 1 to 8 rows."""
    for n, k in ((40, 96), (8, 4864)):
        q, scale, weight = q8_weight(n, k, seed=rows)
        packed, sm = int_dot.int8_group_blocks(q, scale)
        x = torch.randn(2, rows, k)
        got = int_dot.int4_dot(x, packed, sm)
        assert got.shape == (2, rows, n)
        assert close(got, dequantised_rows(x) @ weight.T, 1e-5)
        one_at_a_time = torch.cat([int_dot.int4_dot(x[:, i:i + 1], packed, sm) for i in range(rows)], 1)
        assert torch.equal(got, one_at_a_time)


def test_rows_go_through_their_own_expert():
    parts = [q8_weight(16, 64, seed) for seed in range(3)]
    blocks = [int_dot.int8_group_blocks(q, s) for q, s, _ in parts]
    packed, sm = torch.stack([p for p, _ in blocks]), torch.stack([s for _, s in blocks])
    x, experts = torch.randn(5, 64), torch.tensor([2, 0, 2, 1, 2])
    got = int_dot.int4_dot(x, packed, sm, experts)
    for row, e in enumerate(experts.tolist()):
        assert close(got[row], dequantised_rows(x[row]) @ parts[e][2].T, 1e-5)


def q6_weight(n: int, k: int, seed: int = 0):
    """Random Q6_K-like codes, int8 sub-scales per 16 inputs (-128 included) and float16 d per 256, and the float64
    matrix (q - 32) * d * sub."""
    torch.manual_seed(seed)
    q = torch.randint(0, 64, (n, k))
    sub = torch.randint(-128, 128, (n, k // 16), dtype=torch.int8)
    sub[0, 0] = -128
    d = (torch.rand(n, k // 256) * 2e-4).half().float()
    scale = d.double().repeat_interleave(16, 1) * sub.double()
    return q, sub, d, (q.double() - 32) * scale.repeat_interleave(16, 1)


@pytest.mark.parametrize("rows", [1, 2, 7, 17])
def test_q6_k_product_equals_the_quantised_reference(rows):
    """Each group's inputs 0-15 and 16-31 take their own scales, d x sub-scale (the activations' sums over the first
    16 carry the -32 offset); outputs a multiple of 8 but not 16 (40), inputs one d (256) and 19 (a down
    projection). Unblocked, the weight is the file's matrix exactly."""
    for n, k in ((40, 256), (8, 4864)):
        q, sub, d, weight = q6_weight(n, k, seed=rows)
        packed, sm = int_dot.q6_k_blocks(q, sub, d)
        assert packed.shape == (n // 8, k // 32, 208) and sm.shape == (n // 8, k // 256, 1, 8)
        assert int_dot.bits_of(packed) == 6 and torch.equal(int_dot.int4_unblock(packed, sm).double(), weight)
        x = torch.randn(rows, k)
        got = int_dot.int4_dot(x, packed, sm)
        assert close(got, dequantised_rows(x) @ weight.T, 1e-5)
        assert torch.equal(got, torch.cat([int_dot.int4_dot(x[i:i + 1], packed, sm) for i in range(rows)]))


@pytest.mark.parametrize("layout", ["int8 per 32", "6 bits per 16"])
def test_avx2_and_portable_builds_compute_the_same_products(layout, portable_ops, avx2_ops):
    """AVX2 without VNNI multiplies int8's u in its two nibbles (maddubs's int16 pairs would overflow on 255 * 127);
    the portable loops read the codes as they are; the native build, with VNNI, equals the AVX2 build bit for bit."""
    if layout == "int8 per 32":
        q, scale, weight = q8_weight(40, 4864, seed=5)
        packed, sm = int_dot.int8_group_blocks(q, scale)
    else:
        q, sub, d, weight = q6_weight(40, 4864, seed=7)
        packed, sm = int_dot.q6_k_blocks(q, sub, d)
    x = torch.randn(7, 4864)
    for ops in (portable_ops, avx2_ops):
        assert close(ops.int4_dot(x, packed, sm, None), dequantised_rows(x) @ weight.T, 1e-5)
        assert torch.equal(ops.int4_unblock(packed, sm, torch.float32).double(), weight)
    if int_dot.isa() == "avx2_vnni":
        for rows in (1, 3, 8, 9):
            xb = torch.randn(rows, 4864).bfloat16()
            assert torch.equal(torch.ops.llmcli.int4_dot(xb, packed, sm), avx2_ops.int4_dot(xb, packed, sm, None))
    if layout == "6 bits per 16":
        with pytest.raises(RuntimeError, match="K/256"):
            int_dot.int4_dot(x, packed, torch.cat([sm, sm], -2))


def test_unblocking_rounds_each_weight_as_torch_does(portable_ops, avx2_ops):
    """Long prompts unblock the weight for a float GEMM: the AVX2 widening (8 codes a step) and the plain loop give
    float32 q * scale + min, and bfloat16 and float16 weights that are those floats rounded as torch rounds them."""
    from tests.test_int_kernels import int4_weight, int5_weight

    layouts = {
        "int4": int_dot.int4_blocks(*int4_weight(24, 96)[0]),
        "int5": int_dot.int5_blocks(*int5_weight(24, 96)[0]),
        "Q6_K": int_dot.q6_k_blocks(*q6_weight(24, 256)[:3]),
        "Q8_0": int_dot.int8_group_blocks(*q8_weight(24, 96)[:2]),
    }
    for name, (packed, sm) in layouts.items():
        wide = int_dot.int4_unblock(packed, sm, torch.float32)
        for ops in (torch.ops.llmcli, portable_ops, avx2_ops):
            assert torch.equal(ops.int4_unblock(packed, sm, torch.float32), wide), name
            for dtype in (torch.bfloat16, torch.float16):
                assert torch.equal(ops.int4_unblock(packed, sm, dtype), wide.to(dtype)), (name, dtype)


@pytest.mark.parametrize("blocks", ["random", "quantised"])
def test_q6_k_codes_equal_the_gguf_packages_dequantisation(blocks):
    weights = np.random.default_rng(1).standard_normal((8, 512)).astype(np.float32) * 0.02
    data = random_k_blocks(weights.shape, Q.Q6_K) if blocks == "random" else q6_k_blocks(weights)
    expected = gguf.quants.dequantize(data, Q.Q6_K)
    q, sub, d = q6_k_codes(data, "Q6_K", 512)
    assert q.shape == (8, 512) and q.max() <= 63 and sub.shape == (8, 32) and sub.dtype == np.int8 and d.shape == (8, 2)
    scale = np.repeat(d, 16, axis=1) * sub
    assert np.array_equal((q.astype(np.float32) - 32) * np.repeat(scale, 16, axis=1), expected)
    packed, sm = int_dot.q6_k_blocks(*(torch.from_numpy(part) for part in (q, sub, d)))  # the file's matrix exactly
    assert torch.equal(int_dot.int4_unblock(packed, sm), torch.from_numpy(expected))
    if blocks == "quantised":  # the tests' own Q6_K writer: about 6 bits' error (Gaussian weights: 1.9%)
        assert np.linalg.norm(expected - weights) <= 0.03 * np.linalg.norm(weights)


@pytest.mark.parametrize("shape", [(8, 64), (16, 96)])
def test_q8_0_codes_equal_the_gguf_packages_dequantisation(shape):
    weights = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    weights[0, :32] *= 1000  # large scales, still float16
    data = gguf.quants.quantize(weights, Q.Q8_0)
    q, scale, low = int8_codes(data, "Q8_0", shape[1])
    assert low is None and q.dtype == np.int8 and q.shape == (shape[0], shape[1] // 32, 32)
    assert np.shares_memory(q, data)  # a view of the file's bytes, not a copy
    got = q.reshape(shape).astype(np.float32) * np.repeat(scale, 32, axis=1)
    assert np.array_equal(got, gguf.quants.dequantize(data, Q.Q8_0))
    packed, sm = int_dot.int8_group_blocks(torch.from_numpy(q), torch.from_numpy(scale))  # strided codes pack too
    assert torch.equal(int_dot.int4_unblock(packed, sm), torch.from_numpy(got))


@pytest.fixture(scope="module", params=[("Qwen2", "Q8_0"), ("Llama", "Q8_0"), ("Qwen2", "Q6_K")])
def q8_file(request, tmp_path_factory):
    """A Q8_0 file with its own head (Qwen2) or with the head tied to the embedding (Llama, as SmolLM2's), and a
    Q6_K file (random 6-bit blocks: gguf writes no Q6_K of its own)."""
    arch, qtype = request.param
    root = tmp_path_factory.mktemp("q8")
    build(arch, {**QUANT, "tie_word_embeddings": arch == "Llama"}, root / "hf")
    path = convert(root / "hf", root / f"model-{qtype}.gguf", qtype=Q[qtype])
    reference = load_file(str(dequantised_checkpoint(path, root / "hf", root / "reference") / "model.safetensors"))
    return path, qtype, reference


@pytest.mark.skipif(not int_dot.runs_fast(), reason="llmcli's AVX2 integer kernel is not built here")
def test_int8_run_of_a_q8_0_file_multiplies_by_the_files_matrices(q8_file):
    """Every linear the file stores in Q8_0 (Q6_K), the head included (a tied head: the embedding's codes), keeps its
    codes and per-32 (per-16) scales: each product is the GGUF's dequantised matrix (re-quantising onto int8's per-row
    grid would round every weight again); q/k/v and gate/up still join into one product each, and the run's note
    says so."""
    from llmcli.loader import load_model

    path, qtype, reference = q8_file
    kind = Int8GroupLinear if qtype == "Q8_0" else Int6Per16Linear
    reference.setdefault("lm_head.weight", reference["model.embed_tokens.weight"])  # tied
    loaded = load_model("q", path, device="cpu", dtype="bfloat16", quantize="auto")
    assert loaded.options.quantize == "int8"
    assert any(f"{qtype} codes as stored" in note for note in loaded.notes), loaded.notes
    from llmcli.show_gguf import gguf_facts, open_for_show

    facts = gguf_facts(open_for_show(path))  # `show` says it before loading
    assert facts["runs_on_cpu_as"] == "int8" and facts["int8_as_stored"] == [qtype]
    stored = {name: m for name, m in loaded.model.named_modules() if isinstance(m, Int4Linear)}
    assert {type(m) for m in stored.values()} == {kind}
    assert {name.rpartition(".")[2] for name in stored} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj",
                                                            "lm_head"}
    joined = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    for name, module in stored.items():
        with torch.inference_mode():
            weight = int_dot.int4_unblock(module.packed, module.scales_and_mins)
        parent, _, leaf = name.rpartition(".")
        expected = torch.cat([torch.from_numpy(reference[f"{parent}.{part}.weight"]) for part in joined[leaf]]) \
            if leaf in joined else torch.from_numpy(reference[name + ".weight"])
        assert torch.equal(weight, expected), name
    # the whole model: near the file's dequantised floats (what differs is the activations' int8 rounding)
    floats = load_model("f", path, device="cpu", dtype="bfloat16", quantize=None)
    ids = torch.tensor([list(range(3, 40))])
    with torch.inference_mode():
        got, expected = (m.runner(ids, m.runner.make_cache(1, 64)).float() for m in (loaded, floats))
    assert got.shape == (1, 37, QUANT["vocab_size"])
    assert (got - expected).norm() <= 0.03 * expected.norm()


@pytest.mark.skipif(not int_dot.runs_fast(), reason="llmcli's AVX2 integer kernel is not built here")
def test_an_int8_run_of_a_4_bit_mix_requantises_every_part(tmp_path):
    """In a Q4_K_M-like mix (attn_v in Q6_K beside 4-bit q and k) an int8 run keeps re-quantising every part per row:
    a stored v would no longer join q and k into one product."""
    from llmcli.backends.int8 import Int8Linear
    from llmcli.loader import load_model

    build("Qwen2", QUANT, tmp_path / "hf")
    path = convert(tmp_path / "hf", tmp_path / "mix.gguf", qtype=Q.Q4_K, types={"attn_v.weight": Q.Q6_K})
    loaded = load_model("m", path, device="cpu", dtype="bfloat16", quantize="int8")
    kinds = {type(m) for m in loaded.model.modules()}
    assert Int8Linear in kinds and not kinds & {Int6Per16Linear, Int8GroupLinear}
    assert all("as stored" not in note for note in loaded.notes)


@pytest.mark.skipif(not int_dot.runs_fast(), reason="llmcli's AVX2 integer kernel is not built here")
@pytest.mark.parametrize("tied", [False, True])
def test_a_4_bit_run_takes_a_q6_k_head_as_stored(tmp_path, tied):
    """llama.cpp's 4-bit mixes keep the output head (or a tied head's token_embd) in Q6_K: an int4 run multiplies by
    exactly that matrix, where it re-quantised it onto the 6-bit head's grid per 64 inputs before; `show` and the
    run's note say so. The layers stay int4 (a Q6_K attn_output, which the substring also picks, runs int5)."""
    from llmcli.backends.int6 import Int6Linear
    from llmcli.loader import load_model
    from llmcli.show_gguf import gguf_facts, open_for_show

    config = {**QUANT, "tie_word_embeddings": tied}
    build("Qwen2", config, tmp_path / "hf")
    head_tensor = "token_embd.weight" if tied else "output.weight"
    path = convert(tmp_path / "hf", tmp_path / "mix.gguf", qtype=Q.Q4_0, types={head_tensor: Q.Q6_K})
    reference = load_file(str(dequantised_checkpoint(path, tmp_path / "hf", tmp_path / "ref") / "model.safetensors"))
    expected = torch.from_numpy(reference["lm_head.weight" if not tied else "model.embed_tokens.weight"])
    assert gguf_facts(open_for_show(path))["head_as_stored"] == "Q6_K"
    loaded = load_model("m", path, device="cpu", dtype="bfloat16", quantize="auto")
    assert loaded.options.quantize == "int4"
    assert any("Q6_K head as stored" in note for note in loaded.notes), loaded.notes
    head = loaded.model.get_submodule(next(n for n, _ in loaded.model.named_modules() if n.endswith("lm_head")))
    assert type(head) is Int6Per16Linear
    with torch.inference_mode():
        weight = int_dot.int4_unblock(head.packed, head.scales_and_mins)
    assert torch.equal(weight, expected)
    assert not any(isinstance(m, Int6Linear) for m in loaded.model.modules())
    with torch.inference_mode():
        logits = loaded.runner(torch.tensor([[3, 4, 5]]), loaded.runner.make_cache(1, 8))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_stored_codes_packed_a_part_at_a_time_are_the_whole_matrix(tmp_path, monkeypatch, quantize):
    """A file's codes are extracted and packed a few million at a time (a vocabulary-sized head whole held several
    copies of its codes): parts of 8 rows give every module the bytes and scales of one part per matrix,
    for 4-bit layers with a Q6_K head (int4 run) and Q8_0 layers with a Q6_K one (int8 run)."""
    from llmcli.backends import prepare
    from llmcli.loader import load_model

    if not int_dot.runs_fast():
        pytest.skip(f"codes are taken as stored on the integer kernels, which need AVX2 (built here: {int_dot.isa()})")
    build("Qwen2", QUANT, tmp_path / "hf")
    qtype = Q.Q4_0 if quantize == "int4" else Q.Q8_0
    path = convert(tmp_path / "hf", tmp_path / "mix.gguf", qtype=qtype,
                   types={"output.weight": Q.Q6_K, "blk.0.ffn_down.weight": Q.Q6_K})

    def stored(part_values: int) -> dict[str, Int4Linear]:
        monkeypatch.setattr(prepare, "CODE_PART_VALUES", part_values)
        model = load_model("m", path, device="cpu", dtype="bfloat16", quantize=quantize).model
        return {name: m for name, m in model.named_modules() if isinstance(m, Int4Linear)}

    whole, parts = stored(1 << 30), stored(1)  # the fewest rows a part takes, 8: the head's 320 rows in 40 parts
    kinds = {type(m) for m in parts.values()}
    assert Int6Per16Linear in kinds and (Int4Linear in kinds if quantize == "int4" else Int8GroupLinear in kinds)
    assert whole.keys() == parts.keys() and len(whole) > 3
    for name, module in whole.items():
        assert type(parts[name]) is type(module), name
        assert torch.equal(parts[name].packed, module.packed), name
        assert torch.equal(parts[name].scales_and_mins, module.scales_and_mins), name
