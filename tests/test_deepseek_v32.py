"""DeepSeek-V3.2 (`deepseek_v32`: MLA + DeepSeek Sparse Attention) against transformers (float32, eager),
plus the sparse decode step, the indexer's key cache and MTP skipping."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llmcli.config import config_from_dict, load_config
from llmcli.errors import LlmcliError
from llmcli.loader import load_model
from llmcli.tokenizer import Tokenizer
from tests.conftest import save_hf_model
from tests.test_deepseek import real_v3_config

transformers = pytest.importorskip("transformers")

PROMPT = "Sparse attention keeps a few past tokens per query: the lightning indexer picks them. 你好 x * 2"
TOPK = 8
# FAMILIES.md's tiny config, a little larger: >= 16 indexer heads (ReLU ties otherwise), topk < prompt.
TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
            routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=16,
            qk_nope_head_dim=16, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
            index_topk=TOPK, index_head_dim=16, index_n_heads=16, max_position_embeddings=512,
            initializer_range=0.06, bos_token_id=None, eos_token_id=None,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 64, "mscale": 0.9, "mscale_all_dim": 0.8,
                             "beta_fast": 32, "beta_slow": 1})


def build_reference(path=None, seed: int = 0, **overrides):
    config = transformers.DeepseekV32Config(**{**TINY, **overrides})
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.DeepseekV32ForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms and choice bias, so that wrong placements show
        for name, param in model.named_parameters():
            if name.endswith(("k_norm.weight", "k_norm.bias")):
                param.add_(torch.randn(param.shape) * 0.3)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape) * 0.05)
    if path is not None:
        save_hf_model(model, path)
    return model


@pytest.fixture(scope="module")
def v32(tmp_path_factory):
    path = tmp_path_factory.mktemp("v32")
    return build_reference(path), path


@pytest.fixture(scope="module")
def model(v32):
    """The checkpoint loaded once (float32); tests that switch its modes switch them back."""
    return load_model("v32", v32[1], device="cpu", dtype="float32").model


def prompt_ids(path) -> list[int]:
    ids = Tokenizer.from_dir(path).encode(PROMPT)
    assert len(ids) > 3 * TOPK
    return ids


def run(model, ids, cache=None, recorder=None):
    cache = cache if cache is not None else model.make_cache(1, len(ids) + 8)
    with torch.inference_mode():
        return model(torch.tensor([ids]), cache.span(len(ids)).positions, cache, recorder=recorder), cache


def reference_logits(reference, ids):
    with torch.inference_mode():
        return reference(torch.tensor([ids])).logits


# -- parity with transformers --------------------------------------------------------------------


def test_logits_match_transformers(v32):
    reference, path = v32
    ids = prompt_ids(path)
    loaded = load_model("v32", path, device="cpu", dtype="float32")
    ours, _ = run(loaded.model, ids)
    theirs = reference_logits(reference, ids)
    assert theirs.abs().max() > 0.5
    assert (ours - theirs).abs().max().item() <= 1e-4
    # The selection matters: dense MLA on the same weights (V3) gives other logits past index_topk.
    loaded.model.set_sparse_mode("dense")
    dense, _ = run(loaded.model, ids)
    assert (dense[:, :TOPK] - theirs[:, :TOPK]).abs().max() <= 1e-4
    assert (dense - theirs).abs().max() > 1e-2


def test_prefill_then_decode_equals_full_forward(v32, model):
    """A prompt, a multi-token chunk (masked, cache offset), then sparse single-token steps."""
    reference, path = v32
    ids = prompt_ids(path)
    theirs = reference_logits(reference, ids)
    cache = model.make_cache(1, len(ids))
    first, _ = run(model, ids[:5], cache)  # shorter than index_topk: every key selected
    chunk, _ = run(model, ids[5:-6], cache)
    steps = [run(model, [t], cache)[0] for t in ids[-6:]]
    ours = torch.cat([first, chunk, *steps], dim=1)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_greedy_tokens_match_transformers_via_cli(v32, run_cli):
    reference, path = v32
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


def greedy(model, ids, mode: str, form: str = "auto", steps: int = 6):
    model.set_sparse_mode(mode)
    model.attention_form = form
    try:
        cache = model.make_cache(1, len(ids) + steps)
        logits, _ = run(model, ids, cache)
        tokens, out = [], [logits[:, -1]]
        for _ in range(steps):
            tokens.append(int(out[-1].argmax()))
            out.append(run(model, [tokens[-1]], cache)[0][:, -1])
        return tokens, torch.cat(out)
    finally:
        model.set_sparse_mode("sparse")
        model.attention_form = "auto"


def test_sparse_decode_equals_dense_masking(v32, model):
    """The gathered decode step (attends to index_topk rows only) equals dense attention over the whole
    cache under the selection mask, and both forms of the masked step agree."""
    ids = prompt_ids(v32[1])
    sparse_tokens, sparse = greedy(model, ids, "sparse")
    masked_tokens, masked = greedy(model, ids, "masked")
    expanded_tokens, expanded = greedy(model, ids, "masked", form="expanded")
    assert sparse_tokens == masked_tokens == expanded_tokens
    assert (sparse - masked).abs().max().item() <= 1e-5
    assert (sparse - expanded).abs().max().item() <= 1e-4
    dense_tokens, dense = greedy(model, ids, "dense")
    assert (dense - sparse).abs().max() > 1e-3  # the selection is really in effect


def test_sparse_step_reads_only_selected_rows(v32, model):
    """Poisoning every cache row the indexer did not select leaves a sparse step's output unchanged."""
    ids = prompt_ids(v32[1])
    layer = model.model.layers[1].self_attn
    seen = {}
    original = layer.indexer.scores

    def spy(*args):
        seen["scores"] = original(*args)
        return seen["scores"]

    _, cache = run(model, ids)
    base_cache = [t.clone() for t in cache.tensors()]
    layer.indexer.scores = spy
    try:
        expected, _ = run(model, [5], cache)
        chosen = seen["scores"][0, 0].topk(TOPK).indices
        cache.crop(len(ids))
        for t, saved in zip(cache.tensors(), base_cache, strict=True):
            t.copy_(saved)
        rows = cache.layers[1].kv
        poisoned = torch.ones(rows.shape[0], dtype=torch.bool)
        poisoned[chosen] = False
        poisoned[len(ids):] = False
        rows[poisoned] = 1e4
        got, _ = run(model, [5], cache)
    finally:
        del layer.indexer.scores
    assert poisoned.sum() > 10  # most of the prompt's rows
    assert (got - expected).abs().max().item() <= 1e-5


# -- the cache ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cache_holds_latents_and_indexer_keys(v32, dtype):
    _, path = v32
    # (no bfloat16 kernel build or oneDNN repacking: only the cache and the dtypes are looked at)
    loaded = load_model("v32", path, device="cpu", dtype=dtype, bf16_kernel=False, prepack=False)
    cfg = loaded.config
    cache = loaded.model.make_cache(1, 50)
    element = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    per_layer = (cfg.kv_lora_rank + cfg.qk_rope_head_dim + TINY["index_head_dim"]) * element
    assert cache.bytes_per_token() == cfg.num_layers * per_layer
    info = loaded.model.attention_info(0, cache)
    assert info["cache_bytes_per_token"] == per_layer and info["type"] == "mla+dsa"
    assert info["index_topk"] == TOPK and info["index_heads"] == 16
    stored = sum(t.numel() for t in cache.tensors())
    assert stored * element == 50 * cache.bytes_per_token()
    # The indexer's head weighting stays float32 whatever the run dtype (transformers keeps it so).
    assert loaded.model.model.layers[0].self_attn.indexer.weights_proj.weight.dtype == torch.float32


def test_cache_contents_equal_transformers(v32, model):
    reference, path = v32
    ids = prompt_ids(path)
    _, cache = run(model, ids)
    theirs = transformers.DynamicCache(config=reference.config)
    with torch.inference_mode():
        reference(torch.tensor([ids]), cache=theirs, use_cache=True)
    rank = model.config.kv_lora_rank
    for ours, hf in zip(cache.layers, theirs.layers, strict=True):
        rows = ours.kv[: len(ids), 0]
        assert (rows[:, :rank] - hf.keys[0, 0]).abs().max() <= 1e-5
        assert (rows[:, rank:] - hf.values[0, 0]).abs().max() <= 1e-5
        assert (ours.index_keys[: len(ids), 0] - hf.indexer_keys[0]).abs().max() <= 1e-5


# -- config and loading ---------------------------------------------------------------------------


def real_v32_config(**overrides) -> dict:
    """The shape of DeepSeek-V3.2(-Exp)'s config.json (keys as on the hub): V3's plus the indexer's."""
    return real_v3_config(**{
        "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32",
        "index_topk": 2048, "index_n_heads": 64, "index_head_dim": 128,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128], "scale_fmt": "ue8m0"},
        **overrides})


def test_real_v32_config_parses():
    from llmcli.config_deepseek import indexer_settings

    cfg = config_from_dict(real_v32_config())
    assert cfg.family == "deepseek_v32" and cfg.fp8_block_size == (128, 128)
    settings = indexer_settings(cfg)
    assert (settings.topk, settings.heads, settings.head_dim) == (2048, 64, 128)
    raw = real_v32_config()
    del raw["model_type"]  # the architecture alone names the family
    assert config_from_dict(raw).family == "deepseek_v32"


@pytest.mark.parametrize("overrides, message", [
    ({"index_topk": 0}, "index_topk must be a positive integer"),
    ({"index_n_heads": "64"}, "index_n_heads must be a positive integer"),
    ({"index_head_dim": 32}, "index_head_dim (32) is smaller than qk_rope_head_dim (64)"),
    ({"q_lora_rank": None}, "q_lora_rank must be set"),
])
def test_bad_indexer_configs_are_clear_errors(overrides, message):
    with pytest.raises(LlmcliError) as info:
        config_from_dict(real_v32_config(**overrides))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_config_matches_transformers(v32, model):
    reference, path = v32
    cfg = load_config(path)
    assert cfg.family == "deepseek_v32" and cfg.num_layers == reference.config.num_hidden_layers
    assert (cfg.topk_method, cfg.scoring_func, cfg.norm_topk_prob) == ("noaux_tc", "sigmoid", True)
    attn = model.model.layers[0].self_attn
    assert attn.softmax_scale == pytest.approx(reference.model.layers[0].self_attn.scaling, rel=1e-12)


def test_mtp_layer_is_never_read(v32, tmp_path):
    """V3.2 ships an MTP layer (model.layers.{L}, indexer included). Its tensors here are FP8 without
    scales and garbage bytes: reading any of them would fail; loading skips them with a note."""
    from safetensors.torch import load_file, save_file

    reference, path = v32
    mtp_dir = tmp_path / "with-mtp"
    shutil.copytree(path, mtp_dir)
    tensors = load_file(mtp_dir / "model.safetensors")
    layers = TINY["num_hidden_layers"]
    for name in list(tensors):
        if name.startswith("model.layers.1."):
            mtp = name.replace("model.layers.1.", f"model.layers.{layers}.")
            tensors[mtp] = torch.full(tensors[name].shape, float("nan")).to(torch.float8_e4m3fn)
    tensors[f"model.layers.{layers}.eh_proj.weight"] = torch.full((64, 128), float("nan")).to(torch.float8_e4m3fn)
    save_file(tensors, mtp_dir / "model.safetensors")
    raw = json.loads((mtp_dir / "config.json").read_text())
    raw["num_nextn_predict_layers"] = 1
    (mtp_dir / "config.json").write_text(json.dumps(raw))
    loaded = load_model("mtp", mtp_dir, device="cpu", dtype="float32")
    assert any("multi-token-prediction" in note for note in loaded.notes)
    ids = prompt_ids(path)
    ours, _ = run(loaded.model, ids)
    assert (ours - reference_logits(reference, ids)).abs().max().item() <= 1e-4


# -- trace and show -------------------------------------------------------------------------------


def test_trace_reports_the_indexers_choice(v32, run_cli):
    """trace's JSON lists, per query, the positions kept: the same sets transformers' indexer picks."""
    reference, path = v32
    ids = prompt_ids(path)
    captured = {}
    hook = reference.model.layers[1].self_attn.indexer.register_forward_hook(
        lambda mod, args, out: captured.__setitem__("indices", out))
    try:
        reference_logits(reference, ids)
    finally:
        hook.remove()
    code, out, err = run_cli("trace", path, "-p", PROMPT, "--layer", "1", "--generate", "2", "--json", "-",
                             "--dtype", "float32")
    assert code == 0, err
    data = json.loads(out)
    indexer = data["layers"][0]["indexer"]
    total = len(ids) + 2
    assert indexer["topk"] == TOPK and len(indexer["selected"]) == total == len(data["tokens"])
    for pos, kept in enumerate(indexer["selected"]):
        assert len(kept) == min(TOPK, pos + 1) and all(0 <= p <= pos for p in kept)
        assert indexer["visible"][pos] == pos + 1
        assert 0.0 <= indexer["overlap"][pos] <= 1.0
        assert 0.0 <= indexer["entropy"][pos] <= indexer["max_entropy"][pos] + 1e-6
        if pos < len(ids) and pos + 1 > TOPK:  # where transformers' top-k holds only visible keys
            assert sorted(kept) == sorted(captured["indices"][0, pos].tolist()), pos
    assert indexer["sparse_queries"] == total - TOPK
    code, out, err = run_cli("trace", path, "-p", PROMPT, "--layer", "1", "--tokens", "--dtype", "float32")
    assert code == 0, err
    assert "positions kept per query (top 8)" in out and "overlap with dense top" in out


def test_show_counts_the_indexer(v32, run_cli):
    from llmcli.show import count_checkpoint, count_config, describe

    _, path = v32
    facts = describe(path)
    cfg = load_config(path)
    per_layer = TINY["kv_lora_rank"] + TINY["qk_rope_head_dim"] + TINY["index_head_dim"]
    assert facts["kv_cache"]["bytes_per_token"] == per_layer * 4 * TINY["num_hidden_layers"]
    assert facts["attention"]["index_topk"] == TOPK and facts["attention"]["sparse"] == "DSA"
    from llmcli.formats.safetensors import read_checkpoint

    assert count_config(cfg).total == count_checkpoint(cfg, read_checkpoint(path)).total
    code, out, err = run_cli("show", path)
    assert code == 0, err
    assert "each query attends to its top 8 tokens" in out and "indexer key (DSA)" in out


@pytest.mark.parametrize("prefix", [5, 30])
def test_static_step_matches_eager_step(v32, model, prefix):
    """The step a compiled decode runs (a static view of the cache, read past the position and masked):
    the selection is taken over the whole view, rows past the position never count. With a prefix shorter
    than index_topk the selection must include hidden rows, which the step masks."""
    ids = prompt_ids(v32[1])[:prefix]
    eager_cache = model.make_cache(1, 64)
    run(model, ids, eager_cache)
    static_cache = model.make_cache(1, 64)
    run(model, ids, static_cache)
    for token in (3, 9, 27):
        expected, _ = run(model, [token], eager_cache)
        with torch.inference_mode():
            view = static_cache.static_view(48)
            got = model(torch.tensor([[token]]), torch.tensor([static_cache.length]), view)
        static_cache.advance(1)
        assert (got - expected).abs().max().item() <= 1e-5


def test_server_step_of_rows_at_their_own_positions(v32):
    """The server's step: prompts of 40, 300 and 120 tokens (all well past index_topk) prefilled alone into their
    rows, then one static step with each row at its own position, its indexer keys written, scored and selected
    there. Against llmcli's plain path and transformers' model over each row's whole sequence (logits, and each
    row's cached indexer keys); dense MLA on the same weights gives every row other logits: the selection counts."""
    from tests.test_one_query_attention import SERVER_TOKENS, assert_server_step_alike, server_prompts, server_step

    reference, path = v32
    prompts = server_prompts(TINY["vocab_size"])
    assert min(len(p) for p in prompts) > 4 * TOPK
    fused_runner = load_model("v32", path, device="cpu", dtype="float32").runner
    cache = fused_runner.make_cache(len(prompts), 320)
    fused = server_step(fused_runner, prompts, cache)
    plain_runner = load_model("v32", path, device="cpu", dtype="float32", fused_decode=False).runner
    plain = server_step(plain_runner, prompts)
    assert_server_step_alike(fused, plain, reference, prompts)
    for row, prompt in enumerate(prompts):  # the step's key at the row's own position, nothing past it
        ids = prompt + [SERVER_TOKENS[row]]
        theirs = transformers.DynamicCache(config=reference.config)
        with torch.inference_mode():
            reference(torch.tensor([ids]), cache=theirs, use_cache=True)
        for ours, hf in zip(cache.layers, theirs.layers, strict=True):
            assert (ours.index_keys[: len(ids), row] - hf.indexer_keys[0]).abs().max() <= 1e-5
            assert ours.index_keys[len(ids):, row].abs().max() == 0
    plain_runner.model.set_sparse_mode("dense")
    dense = server_step(plain_runner, prompts)
    assert (dense - plain).abs().amax(dim=-1).min() > 1e-2


def test_checkpoint_without_template_chats_in_the_v32_format(v32, tmp_path, run_cli):
    """DeepSeek-V3.2's repo has no chat template (its format is a Python file llmcli never runs): generate
    --chat and chat render with llmcli's own copy of the format, and show says so."""
    from llmcli.chat_dsv32 import BOS

    _, path = v32
    bare = tmp_path / "bare"
    shutil.copytree(path, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    expected = Tokenizer.from_dir(bare).encode(f"{BOS}<｜User｜>hi<｜Assistant｜></think>")
    code, out, err = run_cli("generate", bare, "--chat", "-p", "hi", "-n", "2", "--json", "--dtype", "float32")
    assert code == 0, err
    assert json.loads(out)["prompt_tokens"] == len(expected)
    code, out, err = run_cli("show", bare, "--json")
    assert code == 0, err
    assert json.loads(out)["chat_template"] == "built-in DeepSeek-V3.2 format"
