"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B) and Qwen3-MoE (Qwen3-30B-A3B) against transformers (float32,
eager attention and experts), checkpoints saved as the hub ships them (one tensor per expert); experts saved
fused; FP8 block-quantised Qwen3 checkpoints; int8; trace's router view; show; bad configs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmcli.config import load_config
from llmcli.loader import load_model
from llmcli.tokenizer import Tokenizer
from tests.conftest import save_hf_model

transformers = pytest.importorskip("transformers")

PROMPT = (
    "A router sends every token to a few of its experts; a shared expert behind a sigmoid gate sees every "
    "token. 你好，世界! def f(x): return x * 2"
)
BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
            max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None)
CASES = {
    # Qwen1.5-MoE style: q/k/v bias, shared expert with its gate, no renormalising, a dense layer.
    "qwen2_moe": ("Qwen2Moe", dict(shared_expert_intermediate_size=80, norm_topk_prob=False, mlp_only_layers=[1])),
    # Qwen3-30B-A3B style: q/k norms, explicit head_dim, renormalised top-k, no shared expert; dense layers by
    # decoder_sparse_step (layers 0 and 2 dense, 1 and 3 MoE).
    "qwen3_moe": ("Qwen3Moe", dict(head_dim=24, norm_topk_prob=True, num_hidden_layers=4, decoder_sparse_step=2,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
}


def build_reference(kind: str, overrides: dict, path=None, seed: int = 0):
    config = getattr(transformers, f"{kind}Config")(**{**BASE, **overrides})
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
    with torch.no_grad():  # decisive routing and non-zero biases, so that no bug hides behind near-ties or zeros
        for name, param in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                param.normal_(0, 0.5)
            elif name.endswith(".bias"):
                param.normal_(0, 0.5)
    if path is not None:
        save_hf_model(model, path)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    kind, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    return request.param, build_reference(kind, overrides, path), path


def prompt_ids(path) -> list[int]:
    ids = Tokenizer.from_dir(path).encode(PROMPT)
    assert len(ids) >= 40
    return ids


def logits(runner, ids, cache=None):
    cache = cache if cache is not None else runner.model.make_cache(1, len(ids) + 4)
    with torch.inference_mode():
        return runner(torch.tensor([ids]), cache)


# -- parity with transformers ----------------------------------------------------------------------


def test_checkpoint_is_in_hub_layout(case):
    """save_pretrained writes one tensor per expert, as the hub's Qwen MoE checkpoints do."""
    _, reference, path = case
    names = set(load_file(path / "model.safetensors"))
    layer = next(i for i in range(reference.config.num_hidden_layers) if load_config(path).is_moe_layer(i))
    assert f"model.layers.{layer}.mlp.experts.7.gate_proj.weight" in names
    assert not any(n.endswith("experts.gate_up_proj") for n in names)


def test_logits_and_decode_steps_match_transformers(case):
    name, reference, path = case
    ids = prompt_ids(path)
    loaded = load_model(name, path, device="cpu", dtype="float32")
    ours = logits(loaded.runner, ids)
    with torch.inference_mode():
        theirs = reference(torch.tensor([ids])).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4
    # A prefill, then one token at a time from the cache: the same logits as the full forward.
    cache = loaded.model.make_cache(1, len(ids))
    with torch.inference_mode():
        first = loaded.runner(torch.tensor([ids[:-6]]), cache)
        steps = [loaded.runner(torch.tensor([[t]]), cache) for t in ids[-6:]]
    assert (first - theirs[:, :-6]).abs().max().item() <= 1e-4
    assert (torch.cat(steps, 1) - theirs[:, -6:]).abs().max().item() <= 1e-4


def test_greedy_tokens_match_transformers_via_cli(case, run_cli):
    name, reference, path = case
    ids = prompt_ids(path)
    with torch.inference_mode():
        expected = reference.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    code, out, err = run_cli("generate", path, "--raw", "-p", PROMPT, "-n", "16", "--json", "--device", "cpu",
                             "--dtype", "float32")
    assert code == 0, err
    result = json.loads(out)
    assert result["prompt_tokens"] == len(ids)
    assert result["token_ids"] == expected  # 16 of 16


def test_config_normalisation(case):
    name, reference, path = case
    cfg, hf = load_config(path), reference.config
    assert cfg.family == name and cfg.n_routed_experts == hf.num_experts
    assert cfg.num_experts_per_tok == hf.num_experts_per_tok and cfg.norm_topk_prob == hf.norm_topk_prob
    moe = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    assert moe == ([0, 2] if name == "qwen2_moe" else [1, 3])
    if name == "qwen3_moe":
        assert cfg.qk_norm and not cfg.attention_bias and cfg.head_dim == 24
        assert cfg.shared_expert_intermediate_size == 0
    else:
        assert cfg.attention_bias and not cfg.qk_norm and cfg.shared_expert_intermediate_size == 80


def test_bfloat16_top1_agreement(case):
    """bfloat16 is not exact; report how often its top token equals transformers' float32 one."""
    name, reference, path = case
    ids = prompt_ids(path)
    ours = logits(load_model(name, path, device="cpu", dtype="bfloat16").runner, ids).float()
    with torch.inference_mode():
        theirs = reference(torch.tensor([ids])).logits
    agreement = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    print(f"\n{name}: bfloat16 top-1 agreement with transformers float32: {agreement:.3f} over {len(ids)} positions")
    assert agreement >= 0.8


def test_fused_expert_checkpoint_loads(case, tmp_path):
    """Experts saved as transformers holds them (gate_up_proj [E, 2I, H], down_proj [E, H, I]) load too."""
    name, reference, path = case
    fused = tmp_path / "fused"
    shutil.copytree(path, fused)
    tensors = load_file(fused / "model.safetensors")
    cfg = load_config(path)
    for layer in [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]:
        prefix = f"model.layers.{layer}.mlp.experts"

        def take(proj, prefix=prefix):
            return [tensors.pop(f"{prefix}.{e}.{proj}.weight") for e in range(cfg.n_routed_experts)]

        gate, up, down = take("gate_proj"), take("up_proj"), take("down_proj")
        tensors[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat(pair) for pair in zip(gate, up, strict=True)])
        tensors[f"{prefix}.down_proj"] = torch.stack(down)
    save_file(tensors, fused / "model.safetensors")
    ids = prompt_ids(path)
    ours = logits(load_model(name, fused, device="cpu", dtype="float32").runner, ids)
    with torch.inference_mode():
        theirs = reference(torch.tensor([ids])).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


# -- int8, trace, show -----------------------------------------------------------------------------


def test_int8_runs_and_stays_close(case, run_cli):
    from llmcli.backends.int8 import Int8Linear

    name, _, path = case
    ids = prompt_ids(path)
    bf16 = load_model(name, path, device="cpu", dtype="bfloat16").runner
    int8 = load_model(name, path, device="cpu", dtype="bfloat16", quantize="int8").runner
    from llmcli.models.layers import Experts

    experts = [m for m in int8.model.modules() if isinstance(m, Experts)]
    assert experts and any(isinstance(m, Int8Linear) for m in int8.model.modules())
    a, b = logits(bf16, ids).float(), logits(int8, ids).float()
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.98
    code, out, err = run_cli("generate", path, "--raw", "-p", PROMPT, "-n", "4", "--json", "--quantize", "int8")
    assert code == 0, err
    assert json.loads(out)["generated_tokens"] == 4


def test_show_weight_bytes_equal_the_loaded_model(case, run_cli, monkeypatch):
    """`show` predicts from headers alone what loading holds, also with int8 (router and shared-expert gate
    stay in the model's dtype)."""
    from llmcli.backends.int8 import weight_bytes
    from llmcli.backends.linear import prepacking_available

    name, _, path = case
    monkeypatch.setenv("LLMCLI_PREPACK", "0")  # plain tensors, so that their bytes can be counted
    prepacking_available.cache_clear()
    try:
        models = {q: load_model(name, path, device="cpu", dtype="float32", quantize=q).model for q in (None, "int8")}
    finally:
        prepacking_available.cache_clear()
    code, out, err = run_cli("show", path, "--json")
    assert code == 0, err
    sizes = json.loads(out)["weight_bytes"]
    for key, model in (("float32", models[None]), ("int8", models["int8"])):
        # Memory that several tensors view counted once: stacked experts' weights are views into one stack per
        # projection, and every weight views the weight arena's buffer.
        rotary = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith("inv_freq"))
        assert sizes[key] == weight_bytes(model) - rotary, key


def test_trace_shows_router_choices(case, run_cli, tmp_path):
    name, reference, path = case
    ids = prompt_ids(path)
    captured = {}

    def hook(index):
        def capture(module, args, output):
            captured[index] = (output[2].clone(), output[1].clone())  # (top-k experts, their weights)
        return capture

    cfg = load_config(path)
    handles = [layer.mlp.gate.register_forward_hook(hook(i)) for i, layer in enumerate(reference.model.layers)
               if cfg.is_moe_layer(i)]
    with torch.inference_mode():
        reference(torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    target = tmp_path / "trace.json"
    code, _, err = run_cli("trace", path, "--raw", "-p", PROMPT, "--json", str(target), "--device", "cpu",
                           "--dtype", "float32")
    assert code == 0, err
    data = json.loads(target.read_text())
    for layer in data["layers"]:
        if layer["index"] not in captured:
            assert layer["kind"] == "dense" and layer["router"] is None
            continue
        router = layer["router"]
        assert layer["kind"] == "moe" and router["num_experts"] == cfg.n_routed_experts
        experts, weights = captured[layer["index"]]
        assert router["experts"] == experts.tolist()
        assert torch.allclose(torch.tensor(router["weights"]), weights, rtol=1e-4, atol=1e-6)
        assert router["load"] == torch.bincount(experts.reshape(-1), minlength=cfg.n_routed_experts).tolist()
        assert 0 < router["entropy"] <= router["max_entropy"]
        assert router["routed_rms"] > 0
        assert (router["shared_rms"] is not None) == (name == "qwen2_moe")  # Qwen3-MoE has no shared expert
    code, out, err = run_cli("trace", path, "--raw", "-p", "hello", "--device", "cpu")
    assert code == 0, err


def test_show_counts_experts_and_active_parameters(case, run_cli):
    name, reference, path = case
    code, out, err = run_cli("show", path, "--json")
    assert code == 0, err
    facts = json.loads(out)
    cfg = load_config(path)
    total = sum(p.numel() for p in reference.parameters())
    assert facts["params_total"] == total
    moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    skipped = moe * (cfg.n_routed_experts - cfg.num_experts_per_tok) * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert facts["params_active"] == total - skipped  # Qwen counts the embedding table as active
    experts = facts["experts"]
    assert experts["routed"] == 8 and experts["per_token"] == 2 and experts["moe_layers"] == moe
    assert experts["shared"] == (1 if name == "qwen2_moe" else 0)
    code, out, err = run_cli("show", path)
    assert code == 0 and "8 routed" in out


def test_show_config_only_count_matches_the_checkpoint(case, tmp_path):
    from llmcli.show import count_config

    name, reference, path = case
    assert count_config(load_config(path)).total == sum(p.numel() for p in reference.parameters())


# Shapes from the released config.json files; sizes as their model cards give them (total, active), billions.
REAL = {
    "Qwen3-30B-A3B": (dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                           num_attention_heads=32, num_key_value_heads=4, head_dim=128, moe_intermediate_size=768,
                           num_experts=128, num_experts_per_tok=8, norm_topk_prob=True), 30.5, 3.3),
    "Qwen3-235B-A22B": (dict(model_type="qwen3_moe", hidden_size=4096, intermediate_size=12288, num_hidden_layers=94,
                             num_attention_heads=64, num_key_value_heads=4, head_dim=128, moe_intermediate_size=1536,
                             num_experts=128, num_experts_per_tok=8, norm_topk_prob=True), 235.1, 22.2),
    "Qwen1.5-MoE-A2.7B": (dict(model_type="qwen2_moe", hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                               num_attention_heads=16, num_key_value_heads=16, moe_intermediate_size=1408,
                               shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4), 14.3, 2.7),
    "Qwen2-57B-A14B": (dict(model_type="qwen2_moe", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4, moe_intermediate_size=2560,
                            shared_expert_intermediate_size=20480, num_experts=64, num_experts_per_tok=8), 57.4, 14.2),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_model_sizes(name):
    from llmcli.config import config_from_dict
    from llmcli.show import count_config

    shape, total, active = REAL[name]
    raw = dict(vocab_size=151936, tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[], **shape)
    count = count_config(config_from_dict(raw))
    # Cards truncate (Qwen3-30B-A3B: 3.35B active is "3.3B").
    assert abs(count.total / 1e9 - total) < 0.1 and abs(count.active / 1e9 - active) < 0.1


def test_aliases_name_the_released_checkpoints():
    from llmcli.registry import ALIASES

    assert ALIASES["qwen3-30b-a3b"].repo == "Qwen/Qwen3-30B-A3B" and ALIASES["qwen3-30b-a3b"].family == "qwen3_moe"
    assert ALIASES["qwen3-235b-a22b-fp8"].repo == "Qwen/Qwen3-235B-A22B-FP8"
    assert ALIASES["qwen1.5-moe-a2.7b-chat"].repo == "Qwen/Qwen1.5-MoE-A2.7B-Chat"
    assert ALIASES["qwen2-57b-a14b-instruct"].family == "qwen2_moe"
    assert ALIASES["qwen3-8b-fp8"].repo == "Qwen/Qwen3-8B-FP8"


# -- bad configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("change, fragment", [
    ({"num_experts_per_tok": 9}, "exceeds num_experts"),
    ({"mlp_only_layers": [7]}, "mlp_only_layers"),
    ({"decoder_sparse_step": 0}, "decoder_sparse_step"),
    ({"moe_intermediate_size": None}, "moe_intermediate_size"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_bad_moe_config_is_one_line_error(case, tmp_path, run_cli, change, fragment):
    name, _, path = case
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    raw = json.loads((broken / "config.json").read_text())
    raw.update(change)
    (broken / "config.json").write_text(json.dumps(raw))
    code, out, err = run_cli("generate", broken, "--raw", "-p", "hi", "-n", "2")
    assert code != 0 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert fragment in err


# -- FP8 block-quantised Qwen3 (Qwen3-*-FP8) -------------------------------------------------------

# Widths past one 128 block and not multiples of it, so that edge blocks are cropped.
FP8_SHAPE = dict(hidden_size=160, intermediate_size=200, moe_intermediate_size=136, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=64, num_experts=4, num_experts_per_tok=2,
                 norm_topk_prob=True)
FP8_CASES = {"qwen3-fp8": "Qwen3", "qwen3_moe-fp8": "Qwen3Moe"}


def quantise_fp8(weight: torch.Tensor, scale_dtype: torch.dtype, block: int = 128
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, scale_inv per 128x128 block, the dequantised weight) as Qwen's FP8 releases hold
    them: W ~= fp32(q) * scale of its block. Scales are float32 in Qwen3's releases, bfloat16 in later ones."""
    rows, cols = weight.shape
    padded = torch.zeros(-(-rows // block) * block, -(-cols // block) * block)
    padded[:rows, :cols] = weight.abs()
    tiles = padded.unfold(0, block, block).unfold(1, block, block)  # [R, C, block, block]
    scales = (tiles.amax(dim=(-1, -2)).clamp(min=1e-12) / 448.0).to(scale_dtype).float()  # 448: e4m3's largest
    full = scales.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    q = (weight / full).to(torch.float8_e4m3fn)
    return q, scales.to(scale_dtype), q.float() * full


@pytest.fixture(scope="module", params=sorted(FP8_CASES))
def fp8_case(request, tmp_path_factory):
    """A checkpoint quantised here as Qwen3-*-FP8 is (decoder linears FP8 with `weight_scale_inv`; embeddings,
    norms, router and lm_head as they were), and transformers running the dequantised weights: the oracle."""
    kind = FP8_CASES[request.param]
    plain = tmp_path_factory.mktemp(f"{request.param}-plain")
    overrides = dict(FP8_SHAPE)
    if kind == "Qwen3":
        overrides = {k: v for k, v in overrides.items() if "expert" not in k and k != "norm_topk_prob"}
    reference = build_reference(kind, overrides, plain, seed=5)
    fp8 = tmp_path_factory.mktemp(request.param)
    for item in plain.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, fp8 / item.name)
    tensors, dequantised = {}, {}
    scale_dtype = torch.bfloat16 if "moe" in request.param else torch.float32
    for name, tensor in load_file(plain / "model.safetensors").items():
        quantised = (tensor.dim() == 2 and name.startswith("model.layers.") and not name.endswith("mlp.gate.weight"))
        if quantised:
            q, scales, dequantised[name] = quantise_fp8(tensor, scale_dtype)
            tensors[name], tensors[name + "_scale_inv"] = q, scales
        else:
            tensors[name] = dequantised[name] = tensor
    save_file(tensors, fp8 / "model.safetensors")
    save_file(dequantised, plain / "model.safetensors")
    oracle = type(reference).from_pretrained(plain, attn_implementation="eager", experts_implementation="eager",
                                             dtype=torch.float32).eval()
    raw = json.loads((fp8 / "config.json").read_text())
    raw["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}
    (fp8 / "config.json").write_text(json.dumps(raw))
    return request.param, oracle, fp8, tensors


def test_fp8_checkpoint_is_dequantised_at_load(fp8_case, run_cli):
    name, oracle, fp8, tensors = fp8_case
    assert any(t.dtype == torch.float8_e4m3fn and t.shape[0] % 128 for t in tensors.values())  # cropped edges
    ids = prompt_ids(fp8)
    loaded = load_model(name, fp8, device="cpu", dtype="float32")
    ours = logits(loaded.runner, ids)
    with torch.inference_mode():
        theirs = oracle(torch.tensor([ids])).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert load_model(name, fp8, device="cpu").dtype == torch.bfloat16  # FP8 runs in bfloat16 by default
    code, out, err = run_cli("show", fp8, "--json")
    assert code == 0, err
    facts = json.loads(out)
    assert facts["fp8"] and facts["fp8_block_size"] == [128, 128] and facts["run_dtype"] == "bfloat16"
    assert facts["params_total"] == sum(p.numel() for p in oracle.parameters())  # scales are not parameters
