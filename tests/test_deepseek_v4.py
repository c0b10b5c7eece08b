"""DeepSeek-V4 (`deepseek_v4`) against transformers (float32, eager): logits, greedy tokens, incremental decode,
and the three ways a checkpoint reaches us (save_pretrained's, transformers' in-memory names, the reference
naming with FP8 ue8m0 block scales and FP4 experts)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmcli.config import config_from_dict, load_config
from llmcli.config_deepseek_v4 import v4_settings
from llmcli.errors import LlmcliError
from llmcli.loader import load_model
from llmcli.tokenizer import Tokenizer
from tests.conftest import save_hf_model

transformers = pytest.importorskip("transformers")

PROMPT = "Compressed attention pools windows of past tokens; the indexer keeps a few. 你好 x * 2 = 4"
WINDOW, CSA_RATE, HCA_RATE, TOPK = 6, 4, 8, 3
LAYERS = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
          "compressed_sparse_attention"]
# FAMILIES.md §7's tiny config, adapted: >= 16 indexer heads (ReLU ties otherwise), index_topk below the CSA
# entries of the prompt, a window shorter than the prompt, YaRN on the compressed rope, active clamps.
TINY = dict(vocab_size=384, hidden_size=32, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=1, head_dim=16, q_lora_rank=24, partial_rotary_factor=0.5, num_experts_per_tok=2,
            n_routed_experts=8, n_shared_experts=1, routed_scaling_factor=1.5, scoring_func="sqrtsoftplus",
            layer_types=LAYERS, mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
            compress_rates={"compressed_sparse_attention": CSA_RATE, "heavily_compressed_attention": HCA_RATE},
            hc_mult=3, hc_sinkhorn_iters=4, swiglu_limit=0.4, sliding_window=WINDOW, o_groups=2, o_lora_rank=8,
            index_n_heads=16, index_head_dim=12, index_topk=TOPK, rope_theta=10000.0, compress_rope_theta=160000.0,
            rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
            max_position_embeddings=256, initializer_range=0.1, bos_token_id=None, eos_token_id=None)
PERTURBED = ("norm.weight", "layernorm.weight", "sinks", "position_bias", ".base", ".scale", "hc_base", "hc_scale")


def build_reference(path=None, seed: int = 0, **overrides):
    config = transformers.DeepseekV4Config(**{**TINY, **overrides})
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.DeepseekV4ForCausalLM(config).eval()
    with torch.no_grad():  # transformers initialises these to 0 / 1: perturb them so wrong placements show
        for name, param in model.named_parameters():
            if name.endswith(PERTURBED):
                param.add_(torch.randn(param.shape) * 0.3)
        for name, buf in model.named_buffers():
            if name.endswith("tid2eid"):  # zeros at init: every token would go to expert 0
                buf.copy_(torch.stack([torch.randperm(8)[:buf.shape[1]] for _ in range(buf.shape[0])]))
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape) * 0.05)
    if path is not None:
        save_hf_model(model, path)
    return model


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    path = tmp_path_factory.mktemp("v4")
    return build_reference(path), path


@pytest.fixture(scope="module")
def model(v4):
    return load_model("v4", v4[1], device="cpu", dtype="float32").model


def prompt_ids(path) -> list[int]:
    ids = Tokenizer.from_dir(path).encode(PROMPT)
    assert len(ids) > 3 * HCA_RATE and len(ids) > 4 * WINDOW
    return ids


def run(model, ids, cache=None):
    cache = cache if cache is not None else model.make_cache(1, len(ids) + 8)
    with torch.inference_mode():
        return model(torch.tensor([ids]), cache.span(len(ids)).positions, cache), cache


def reference_logits(reference, ids):
    with torch.inference_mode():
        return reference(torch.tensor([ids])).logits


# -- parity with transformers --------------------------------------------------------------------


def test_logits_match_transformers(v4, model):
    reference, path = v4
    ids = prompt_ids(path)
    ours, cache = run(model, ids)
    theirs = reference_logits(reference, ids)
    assert theirs.abs().max() > 0.5
    assert (ours - theirs).abs().max().item() <= 1e-4
    # The branches mattered: more CSA entries than the indexer keeps, several HCA entries, a window shorter
    # than the prompt.
    csa, hca = cache.layers[1].states["kv"].entries, cache.layers[2].states["kv"].entries
    assert csa.shape[1] == len(ids) // CSA_RATE > 2 * TOPK and hca.shape[1] == len(ids) // HCA_RATE >= 3
    assert cache.layers[0].keys.shape[1] == WINDOW - 1


def test_prefill_then_decode_equals_full_forward(v4, model):
    """A prompt shorter than every window, a chunk that completes some, then single-token steps."""
    reference, path = v4
    ids = prompt_ids(path)
    theirs = reference_logits(reference, ids)
    cache = model.make_cache(1, len(ids))
    first, _ = run(model, ids[:3], cache)
    chunk, _ = run(model, ids[3:-9], cache)
    steps = [run(model, [t], cache)[0] for t in ids[-9:]]
    ours = torch.cat([first, chunk, *steps], dim=1)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert cache.layers[1].states["index"].count == len(ids) // CSA_RATE


def test_prompts_run_in_query_blocks(v4, model, monkeypatch):
    """Long prompts attend QUERY_BLOCK queries at a time over the keys their windows reach (and the indexer
    scores them a block at a time): blocks smaller than the prompt and the window give the same logits."""
    from llmcli.models import compressed_attention

    reference, path = v4
    ids = prompt_ids(path)
    monkeypatch.setattr(compressed_attention, "QUERY_BLOCK", 5)
    ours, _ = run(model, ids)
    assert (ours - reference_logits(reference, ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("overrides", [
    dict(o_groups=4, hc_mult=2, sliding_window=9, index_topk=1, num_experts_per_tok=3),
    dict(scoring_func="sigmoid", hc_mult=4, hc_sinkhorn_iters=20, mlp_layer_types=["hash_moe"] * 2 + ["moe"] * 2,
         rope_parameters={"rope_type": "default"}, layer_types=LAYERS[1:] + LAYERS[:1]),
])
def test_other_settings_match_transformers(v4, tmp_path, overrides):
    """The sigmoid router, other groups, stream counts, windows, schedules and plain RoPE. (transformers'
    V4 names a softmax router too but cannot build it: ACT2FN has no "softmax"; llmcli refuses it.)"""
    _, path = v4
    reference = build_reference(tmp_path / "m", seed=3, **overrides)
    ids = prompt_ids(path)
    loaded = load_model("v4", tmp_path / "m", device="cpu", dtype="float32").model
    theirs = reference_logits(reference, ids)
    assert (run(loaded, ids)[0] - theirs).abs().max().item() <= 1e-4
    cache = loaded.make_cache(1, len(ids))
    steps = [run(loaded, ids[:-4], cache)[0]] + [run(loaded, [t], cache)[0] for t in ids[-4:]]
    assert (torch.cat(steps, dim=1) - theirs).abs().max().item() <= 1e-4


def test_bfloat16_keeps_the_float32_parts(v4, model):
    """In bfloat16 the norms, hyper-connections, sinks, position biases and the choice bias stay float32 (as
    transformers keeps them), and the logits stray from float32's about as far as transformers' bfloat16 do."""
    from llmcli.models.hyper_connections import HyperConnection

    _, path = v4
    ids = prompt_ids(path)
    half = load_model("v4", path, device="cpu", dtype="bfloat16", bf16_kernel=False).model
    layer = half.model.layers[1]
    assert isinstance(layer.attn_hc, HyperConnection) and layer.attn_hc.fn.dtype == torch.float32
    kept = (layer.input_layernorm.weight, layer.self_attn.sinks, layer.self_attn.compressor.position_bias,
            layer.self_attn.kv_norm.weight, layer.mlp.gate.e_score_correction_bias, half.model.hc_head.hc_fn)
    assert all(t.dtype == torch.float32 for t in kept)
    # the product keeps its weight as this CPU's path stores it (plain, panels or oneDNN's layout): all bfloat16
    stored = half.model.layers[1].self_attn.q_b_proj.state_dict().values()
    assert {t.dtype for t in stored if t.dim() > 1} == {torch.bfloat16}
    reference = transformers.DeepseekV4ForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, attn_implementation="eager", experts_implementation="eager").eval()
    ours, exact = run(half, ids)[0].float(), run(model, ids)[0]
    theirs = reference_logits(reference, ids).float()
    assert (ours - exact).abs().max() <= 2 * (theirs - exact).abs().max()
    assert (ours.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.9


def test_greedy_tokens_match_transformers_via_cli(v4, run_cli):
    reference, path = v4
    ids = prompt_ids(path)
    with torch.inference_mode():
        expected = reference.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    code, out, err = run_cli("generate", path, "--raw", "-p", PROMPT, "-n", "16", "--json", "--device", "cpu",
                             "--dtype", "float32")
    assert code == 0, err
    result = json.loads(out)
    assert result["prompt_tokens"] == len(ids) and result["token_ids"] == expected
    assert len(set(expected)) > 3


def test_hash_layers_route_by_token_id(v4, model):
    reference, _ = v4
    ours = model.model.layers[0].mlp.gate.tid2eid
    assert torch.equal(ours, reference.model.layers[0].mlp.gate.tid2eid)
    assert not hasattr(model.model.layers[1].mlp.gate, "tid2eid")


# -- the other namings, FP8 and FP4 ----------------------------------------------------------------

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
FP8_WEIGHTS = ("attn.wq_b.weight", "attn.wo_b.weight", "ffn.shared_experts.w2.weight")


def power_of_two_scale(amax: torch.Tensor, top: float) -> torch.Tensor:
    """ue8m0 scales: the smallest power of two with amax / scale <= top."""
    return torch.exp2(torch.ceil(torch.log2(amax.clamp(min=1e-12) / top)))


def fp8_quantise(w: torch.Tensor, block: int = 8):
    """(fp8 weight, ue8m0 scales [ceil(r/block), ceil(c/block)], the dequantised weight)."""
    rows, cols = w.shape
    grid = torch.nn.functional.pad(w, (0, -cols % block, 0, -rows % block)).unflatten(0, (-1, block)).unflatten(
        2, (-1, block))
    scale = power_of_two_scale(grid.abs().amax(dim=(1, 3)), 448.0)
    full = scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    q = (w / full).to(torch.float8_e4m3fn)
    return q, scale.to(torch.float8_e8m0fnu), q.float() * full


def fp4_quantise(w: torch.Tensor, block: int = 32):
    """(packed int8 [r, c/2], low nibble first; ue8m0 scales [r, c/block]; the dequantised weight)."""
    rows, cols = w.shape
    groups = w.view(rows, cols // block, block)
    scale = power_of_two_scale(groups.abs().amax(-1), 6.0)
    codes = ((groups / scale[..., None])[..., None] - E2M1).abs().argmin(-1).view(rows, cols)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    return packed, scale.to(torch.float8_e8m0fnu), (E2M1[codes].view(rows, -1, block) * scale[..., None]).view(
        rows, cols)


def reference_named(source, target, quantise: bool) -> dict[str, torch.Tensor]:
    """save_pretrained's output in the reference/hub naming (no `model.`, `embed`, `hc_head_fn`), with a hub
    style config.json; `quantise`: some linears FP8 with `.scale`, routed experts FP4. Returns the dequantised
    values of what was quantised (hub names)."""
    shutil.copytree(source, target)
    tensors, exact = {}, {}
    for name, value in load_file(source / "model.safetensors").items():
        name = name.removeprefix("model.").replace("embed_tokens.", "embed.").replace("hc_head.hc_", "hc_head_")
        if quantise and name.endswith(FP8_WEIGHTS):
            tensors[name], tensors[name[:-6] + "scale"], exact[name] = fp8_quantise(value)
        elif quantise and ".ffn.experts." in name:
            tensors[name], tensors[name[:-6] + "scale"], exact[name] = fp4_quantise(value)
        else:
            tensors[name] = value
    if quantise:  # the multi-token-prediction layer, in both spellings the hub has used: never read
        tensors.update({"mtp.0.attn.wq_a.weight": torch.zeros(3, 3), "layers.4.attn_norm.weight": torch.zeros(3)})
    (target / "model.safetensors").unlink()
    save_file(tensors, target / "model.safetensors")
    raw = json.loads((source / "config.json").read_text())
    for key in ("layer_types", "mlp_layer_types", "compress_rates", "rope_parameters", "partial_rotary_factor"):
        raw.pop(key)
    raw.update(compress_ratios=[{"sliding_attention": 0, "compressed_sparse_attention": 4}.get(t, 128)
                                for t in LAYERS] + [4], num_hash_layers=1, qk_rope_head_dim=8,
               compress_rate_hca=HCA_RATE, rope_scaling=TINY["rope_parameters"])  # the MTP layer is listed too
    if quantise:
        raw["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                      "weight_block_size": [8, 8], "expert_dtype": "fp4"}
    (target / "config.json").write_text(json.dumps(raw))
    return exact


def test_hub_style_config_reads_as_transformers_one(v4):
    _, path = v4
    ours = json.loads((path / "config.json").read_text())
    hub = {k: v for k, v in ours.items() if k not in ("layer_types", "mlp_layer_types", "compress_rates",
                                                       "rope_parameters", "partial_rotary_factor")}
    hub.update(compress_ratios=[0, 4, 128, 4, 4], num_hash_layers=1, qk_rope_head_dim=8, compress_rate_hca=8,
               rope_scaling=TINY["rope_parameters"])
    a, b = load_config(path), config_from_dict(hub)
    assert v4_settings(a) == v4_settings(b)
    assert (a.rope_scaling, a.qk_rope_head_dim, a.rope_theta) == (b.rope_scaling, b.qk_rope_head_dim, b.rope_theta)
    assert a.rope_scaling.type == "yarn" and a.rope_scaling.attention_factor == 1.0
    with pytest.raises(LlmcliError, match="compress_ratios"):
        config_from_dict({**hub, "compress_ratios": [0, 3, 128, 4]})
    with pytest.raises(LlmcliError, match="o_groups"):
        config_from_dict({**hub, "o_groups": 3})


def test_reference_and_in_memory_namings_give_the_same_logits(v4, tmp_path):
    reference, path = v4
    ids = prompt_ids(path)
    theirs = reference_logits(reference, ids)
    reference_named(path, tmp_path / "hub", quantise=False)
    memory = tmp_path / "memory"  # transformers' own names: fused experts, model.*.self_attn.*
    shutil.copytree(path, memory)
    (memory / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, memory / "model.safetensors")
    for directory in (tmp_path / "hub", memory):
        loaded = load_model("v4", directory, device="cpu", dtype="float32").model
        assert (run(loaded, ids)[0] - theirs).abs().max().item() <= 1e-4, directory.name


def test_fp8_and_fp4_reference_checkpoint(v4, tmp_path, run_cli):
    """The reference naming with FP8 block scales and FP4 experts loads to transformers' logits on the
    dequantised weights; the MTP layer listed in the config is skipped."""
    reference, path = v4
    exact = reference_named(path, tmp_path / "q", quantise=True)
    assert any(".experts." in n for n in exact) and any(n.endswith("wq_b.weight") for n in exact)
    dequantised = build_reference()
    with torch.no_grad():
        params = dict(dequantised.named_parameters())
        for name, value in exact.items():
            layer, _, rest = name.removeprefix("layers.").partition(".")
            if ".experts." in rest:
                expert, kind = int(rest.split(".")[2]), rest.split(".")[3]
                fused = "down_proj" if kind == "w2" else "gate_up_proj"
                stacked = params[f"model.layers.{layer}.mlp.experts.{fused}"]
                rows = value.shape[0]
                target = stacked[expert] if kind == "w2" else stacked[expert, (kind == "w3") * rows:][:rows]
                target.copy_(value)
            else:
                key = {"attn.wq_b.weight": "self_attn.q_b_proj.weight", "attn.wo_b.weight": "self_attn.o_b_proj.weight",
                       "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight"}[rest]
                params[f"model.layers.{layer}.{key}"].copy_(value)
    ids = prompt_ids(path)
    theirs = reference_logits(dequantised, ids)
    assert (theirs - reference_logits(reference, ids)).abs().max() > 1e-3  # quantisation changed something
    loaded = load_model("v4", tmp_path / "q", device="cpu", dtype="float32")
    assert (run(loaded.model, ids)[0] - theirs).abs().max().item() <= 1e-4
    assert loaded.notes == ["skipped 2 multi-token-prediction tensors: not used for generation"]
    # show counts the FP4 experts unpacked and the scales as no parameters: the float checkpoint's numbers
    code, out, err = run_cli("show", str(tmp_path / "q"), "--json")
    facts, plain = json.loads(out), json.loads(run_cli("show", str(path), "--json")[1])
    assert (facts["params_total"], facts["params_active"]) == (plain["params_total"], plain["params_active"])
    assert facts["fp8"] and facts["params_mtp"] == 12


def test_corrupt_scales_give_one_clear_error(v4, tmp_path, run_cli):
    _, path = v4
    reference_named(path, tmp_path / "q", quantise=True)
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    fp8 = next(n for n in tensors if n.endswith("wq_b.scale"))
    fp4 = next(n for n in tensors if ".experts." in n and n.endswith("w1.scale"))
    table = "layers.0.ffn.gate.tid2eid"
    for i, (name, bad, message) in enumerate(((fp8, tensors[fp8][:1], "FP8 scale has shape"),
                                              (fp4, tensors[fp4][:3], "FP4 scale has shape"),
                                              (table, tensors[table] + 8, "hash routing names experts"))):
        broken = tmp_path / f"broken{i}"
        shutil.copytree(tmp_path / "q", broken)
        save_file({**tensors, name: bad.contiguous()}, broken / "model.safetensors")
        code, _, err = run_cli("generate", broken, "--raw", "-p", "hi", "-n", "1", "--device", "cpu",
                                 "--dtype", "float32")
        assert code != 0 and "Traceback" not in err
        assert [line for line in err.splitlines() if line.strip()] == [err.strip().splitlines()[0]]
        assert err.startswith("error:") and message in err


# -- trace -----------------------------------------------------------------------------------------


def test_trace_reports_compressed_entries_picks_sinks_and_stream_mixing(v4, model):
    from llmcli.trace import build_trace_json, run_trace

    _, path = v4
    ids = prompt_ids(path)
    plain, _ = run(model, ids)
    run_ = run_trace(model, ids, generate=2)
    data = build_trace_json(run_, model, Tokenizer.from_dir(path), "v4")
    layers = {layer["index"]: layer for layer in data["layers"]}
    assert [layers[i]["v4"]["kind"] for i in range(4)] == LAYERS
    assert [layers[i]["attention"]["routing"] for i in range(2)] == ["hash", "learned"]
    csa, hca = layers[1]["v4"], layers[2]["v4"]
    assert csa["entries"][0] == len(ids) // CSA_RATE and hca["entries"][0] == len(ids) // HCA_RATE
    assert len(csa["selected"]) == len(ids) + 2  # every query: the prompt's, then the steps'
    for position, picks in enumerate(csa["selected"]):
        assert len(picks) == min(TOPK, (position + 1) // CSA_RATE)  # complete entries only, at most topk
        assert all(w < (position + 1) // CSA_RATE for w in picks)
    assert layers[1]["attention"]["attended_entries"] == TOPK
    for layer in layers.values():
        v = layer["v4"]
        assert all(0 < m < 1 for m in v["sink_mass"]) and len(v["stream_rms"]) == TINY["hc_mult"]
        comb = torch.tensor(v["comb_attn"])  # Sinkhorn: each token's matrix is close to doubly stochastic
        assert torch.allclose(comb.sum(0), torch.ones(3), atol=0.05) and torch.allclose(comb.sum(1), torch.ones(3),
                                                                                        atol=0.05)
    # Recording observes only: the traced prompt's prediction is the plain run's.
    assert data["generated_token_ids"][0] == int(plain[0, -1].argmax())


# -- show --------------------------------------------------------------------------------------------


def test_show_from_the_config_alone(v4, run_cli, tmp_path):
    """Parameters, layer schedule and cache per type without weights: the tiny model's counts equal its
    checkpoint's, and transformers' defaults (V4-Flash) give 284B parameters and ~6.4 KiB of cache per token."""
    reference, path = v4
    meta = tmp_path / "meta"
    meta.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(path / name, meta / name)
    code, out, err = run_cli("show", str(meta), "--json")
    assert code == 0, err
    facts = json.loads(out)
    weights = sum(p.numel() for p in reference.parameters()) + sum(
        b.numel() for n, b in reference.named_buffers() if n.endswith(("tid2eid", "e_score_correction_bias")))
    assert facts["params_source"] == "config" and facts["params_total"] == weights
    assert facts["layer_schedule"] == "sliding CSA HCA CSA" and facts["attention"]["kind"] == "V4"
    per_type = facts["kv_cache"]["per_type"]  # float32: CSA (16 + 12) / 4 values, HCA 16 / 8
    assert per_type["CSA"]["bytes_per_token_per_layer"] == 7 * 4 and per_type["HCA"]["bytes_per_token_per_layer"] == 8
    assert facts["kv_cache"]["bytes_per_token"] == 2 * 28 + 8
    code, out, err = run_cli("show", str(meta))
    assert code == 0 and "CSA every 4 tokens" in out and "per token (sliding 0 B x 1, CSA 28 B x 2" in out
    flash = tmp_path / "flash"
    flash.mkdir()
    defaults = json.loads(transformers.DeepseekV4Config().to_json_string())
    (flash / "config.json").write_text(json.dumps({**defaults, "dtype": "bfloat16"}))
    code, out, err = run_cli("show", str(flash), "--json")
    facts = json.loads(out)
    assert abs(facts["params_total"] / 284.3e9 - 1) < 0.001 and abs(facts["params_active"] / 13.27e9 - 1) < 0.01
    assert facts["kv_cache"]["bytes_per_token"] == 20 * 320 + 23 * 8  # ~6.4 KiB
    assert facts["layer_schedule"] == "HCA×3 (CSA HCA)×20"


# -- chat --------------------------------------------------------------------------------------------


def test_chat_turns_with_the_builtin_format_match_fresh_generation(v4, tmp_path):
    """A checkpoint without a template chats in the V4 format; each turn reuses what the cache can keep (a
    V4 cache cannot be cut back, so a turn that changes earlier text starts afresh) and equals a generation
    of the whole conversation without reuse."""
    from llmcli.chat import ChatSession
    from llmcli.chat_dsv4 import USER
    from llmcli.generate import Generation

    _, path = v4
    plain = tmp_path / "plain"
    shutil.copytree(path, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("chat_template.jinja", "chat_template.json"):
        (plain / name).unlink(missing_ok=True)
    loaded = load_model("v4", plain, device="cpu", dtype="float32")
    session = ChatSession(loaded, max_new_tokens=5, stop_ids=[])
    for question in ("What pools windows?", "And which entries stay?", "Why?"):
        held = session.cache.length
        session.send(question).run()
        assert session.last.reused_tokens == held  # the format only appends: everything cached is kept
        prompt = loaded.tokenizer.apply_chat_template(session.messages[:-1], add_generation_prompt=True)
        assert prompt.count(USER) == len(session.messages) // 2
        fresh = Generation(loaded.model, loaded.tokenizer, loaded.tokenizer.encode(prompt), 5, stop_ids=[])
        assert "".join(fresh) == session.messages[-1]["content"]
    assert session.last.reused_tokens > 100
