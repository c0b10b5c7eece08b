"""Qwen3.5, Qwen3-Next and Qwen3.5-MoE (Gated DeltaNet + gated attention) against transformers: tiny random
checkpoints in hub format (Qwen3.5 as the vision-language wrapper, Qwen3-Next with its grouped projections
and per-expert tensors), float32 logits and greedy tokens; the DeltaNet's chunked and recurrent forms; the
hybrid cache; loading that never reads the vision tower; bad layer_types."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llmcli.backends.int8 import Int8Linear
from llmcli.chat import ChatSession
from llmcli.cli.generate import stop_token_ids
from llmcli.config import config_from_dict
from llmcli.errors import LlmcliError
from llmcli.generate import Generation
from llmcli.loader import load_model
from llmcli.models.deltanet import chunked_delta_rule, recurrent_delta_rule
from llmcli.tokenizer import Tokenizer
from llmcli.weights import Checkpoint
from tests.conftest import save_hf_model
from tests.test_cli_errors import assert_one_line_error

transformers = pytest.importorskip("transformers")

# ~80 tokens with the test tokenizer: a prompt crosses the DeltaNet's 64-token chunk.
PROMPT = ("Linear attention keeps one state per head instead of a cache that grows with every token. "
          "你好，世界! def f(x): return x * 2")
TEXT = dict(vocab_size=384, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=12,
            linear_num_key_heads=2, linear_num_value_heads=4, initializer_range=0.1, max_position_embeddings=512)
ROPE = {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25}
MROPE = {**ROPE, "mrope_section": [1, 1, 0], "mrope_interleaved": True}
MOE = dict(moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2)
VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4,
              temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16)


def _qwen3_5():
    text = transformers.Qwen3_5TextConfig(**TEXT, intermediate_size=64, rope_parameters=MROPE).to_dict()
    return transformers.Qwen3_5ForConditionalGeneration(
        transformers.Qwen3_5Config(text_config=text, vision_config=VISION))


def _qwen3_next():
    return transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(
        **TEXT, **MOE, intermediate_size=64, rope_parameters=ROPE, mlp_only_layers=[1]))


def _qwen3_5_moe():
    text = transformers.Qwen3_5MoeTextConfig(**TEXT, **MOE, rope_parameters=MROPE).to_dict()
    return transformers.Qwen3_5MoeForConditionalGeneration(
        transformers.Qwen3_5MoeConfig(text_config=text, vision_config=VISION))


BUILDERS = {"qwen3_5": _qwen3_5, "qwen3_next": _qwen3_next, "qwen3_5_moe": _qwen3_5_moe}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny shapes: one thread is faster than two that wait on each other (and on a busy machine, far faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_reference(kind: str, path, seed: int = 0):
    torch.manual_seed(seed)
    model = BUILDERS[kind]().eval()
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None:
            config._attn_implementation = "eager"
            config._experts_implementation = "eager"
    with torch.no_grad():  # zero-centred norms start at 0: perturb them, and the decays, so (1 + w) matters
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "A_log", "dt_bias")) and "visual" not in name:
                param.normal_(0, 0.3)
    save_hf_model(model, path, TEXT["vocab_size"])
    return model


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def case(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, build_reference(request.param, path), path


@pytest.fixture(scope="module")
def qwen3_5(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_5-own")
    return build_reference("qwen3_5", path, seed=1), path


def prompt_ids(path) -> list[int]:
    ids = Tokenizer.from_dir(path).encode(PROMPT)
    assert 70 <= len(ids) <= 100
    return ids


def run(model, ids, cache=None):
    ids = torch.tensor(ids if isinstance(ids[0], list) else [ids])
    cache = cache if cache is not None else model.make_cache(ids.shape[0], ids.shape[1] + 8)
    with torch.inference_mode():
        return model(ids, cache.span(ids.shape[1]).positions, cache), cache


def reference_logits(reference, ids) -> torch.Tensor:
    with torch.inference_mode():
        return reference(input_ids=torch.tensor([ids])).logits


# -- parity with transformers ------------------------------------------------------------------------


def test_config_reads_each_type(case):
    kind, reference, path = case
    raw = json.loads((path / "config.json").read_text())
    cfg = config_from_dict(raw)
    assert cfg.family == kind
    if "text_config" in raw:  # the text part alone (qwen3_5_text, qwen3_5_moe_text) reads the same
        alone = {**cfg.__dict__, "raw": raw["text_config"], "torch_dtype": None}  # the wrapper states the dtype
        assert config_from_dict(raw["text_config"]) == cfg.__class__(**alone)
    assert cfg.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert (cfg.rotary_dim, cfg.linear_num_value_heads, cfg.linear_conv_kernel_dim) == (4, 4, 4)
    assert cfg.is_moe == (kind != "qwen3_5")
    if kind == "qwen3_next":
        assert [cfg.is_moe_layer(i) for i in range(4)] == [True, False, True, True]


def test_logits_match_transformers(case):
    kind, reference, path = case
    ids = prompt_ids(path)
    loaded = load_model(kind, path, device="cpu", dtype="float32")
    ours, _ = run(loaded.model, ids)
    theirs = reference_logits(reference, ids)
    assert theirs.abs().max() > 0.5  # large enough that a 1e-4 match means something
    assert (ours - theirs).abs().max().item() <= 1e-4
    # A 70-token prompt (two chunks), a multi-token continuation, then one token at a time.
    cache = loaded.model.make_cache(1, len(ids))
    first, _ = run(loaded.model, ids[:70], cache)
    chunk, _ = run(loaded.model, ids[70:-4], cache)
    steps = [run(loaded.model, [t], cache)[0] for t in ids[-4:]]
    assert (torch.cat([first, chunk, *steps], 1) - theirs).abs().max().item() <= 1e-4


def test_greedy_tokens_match_transformers_via_cli(case, run_cli):
    kind, reference, path = case
    ids = prompt_ids(path)
    with torch.inference_mode():
        expected = reference.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    code, out, err = run_cli("generate", path, "--raw", "-p", PROMPT, "-n", "16", "--json", "--device", "cpu",
                             "--dtype", "float32")
    assert code == 0, err
    result = json.loads(out)
    assert result["prompt_tokens"] == len(ids)
    assert result["token_ids"] == expected
    assert len(set(expected)) > 3  # not a degenerate repetition of one token


# -- the two DeltaNet forms ----------------------------------------------------------------------------


def delta_inputs(length: int, batch: int = 2, heads: int = 3, dk: int = 8, dv: int = 12, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.nn.functional.normalize(torch.randn(batch, heads, length, dk, generator=gen), dim=-1)
            for _ in range(2))
    v = torch.randn(batch, heads, length, dv, generator=gen)
    g = -torch.rand(batch, heads, length, generator=gen) * 0.3
    beta = torch.rand(batch, heads, length, generator=gen)
    state = torch.randn(batch, heads, dk, dv, generator=gen) * 0.5
    return q * dk ** -0.5, k, v, g, beta, state


@pytest.mark.parametrize("length", [1, 63, 64, 65, 130])
def test_chunked_form_equals_recurrent_form(length):
    q, k, v, g, beta, state = delta_inputs(length)
    out_r, state_r = recurrent_delta_rule(q, k, v, g, beta, state)
    out_c, state_c = chunked_delta_rule(q, k, v, g, beta, state)
    assert out_c.shape == out_r.shape == (2, 3, length, 12)
    assert (out_c - out_r).abs().max().item() <= 1e-5
    assert (state_c - state_r).abs().max().item() <= 1e-5
    assert state_r.abs().max() > 0.1
    # Split in two calls, the state carried between them: the same again.
    cut = length // 2
    first, mid = chunked_delta_rule(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], g[..., :cut], beta[..., :cut],
                                    state)
    second, end = chunked_delta_rule(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], g[..., cut:], beta[..., cut:],
                                     mid)
    assert (torch.cat([first, second], 2) - out_r).abs().max().item() <= 1e-5
    assert (end - state_r).abs().max().item() <= 1e-5


def test_model_forms_agree_and_batch_rows_are_independent(qwen3_5):
    _, path = qwen3_5
    model = load_model("q", path, device="cpu", dtype="float32").model
    ids = prompt_ids(path)
    auto, _ = run(model, ids)
    for layer in model.model.layers:
        if layer.linear:
            layer.linear_attn.form = "recurrent"
    recurrent, _ = run(model, ids)
    assert (auto - recurrent).abs().max().item() <= 1e-5
    for layer in model.model.layers:
        if layer.linear:
            layer.linear_attn.form = "auto"
    other = list(reversed(ids))
    both, cache = run(model, [ids, other])
    assert (both[0] - auto[0]).abs().max().item() <= 1e-5
    assert (both[1] - run(model, other)[0][0]).abs().max().item() <= 1e-5
    step, _ = run(model, [[5], [7]], cache)  # one decode step for both rows
    alone, _ = run(model, ids + [5])
    assert (step[0, -1] - alone[0, -1]).abs().max().item() <= 1e-5
    assert cache.layers[0].state.dtype == torch.float32


# -- loading -------------------------------------------------------------------------------------------


def test_visual_tensors_are_never_read(qwen3_5, tmp_path, monkeypatch):
    """A wrapper whose vision tower and multi-token-prediction head are garbage (every byte 0xFF: NaNs, and
    shapes that fit nothing) loads and computes the same logits; none of those tensors is even read."""
    from safetensors.torch import load_file, save_file

    reference, path = qwen3_5
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    file = broken / "model.safetensors"
    tensors = load_file(file)
    tensors.update({"mtp.fc.weight": torch.zeros(3, 5), "mtp.layers.0.self_attn.q_proj.weight": torch.zeros(7)})
    save_file(tensors, file, metadata={"format": "pt"})
    entries = Checkpoint(broken).entries
    visual = [name for name in entries if name.startswith(("model.visual.", "mtp."))]
    assert len(visual) > 2
    data = bytearray(file.read_bytes())
    for name in visual:
        entry = entries[name]
        data[entry.start: entry.start + entry.nbytes] = b"\xff" * entry.nbytes
    file.write_bytes(bytes(data))
    read = []
    original = Checkpoint.get
    monkeypatch.setattr(Checkpoint, "get", lambda self, name, out=None: (read.append(name),
                                                                          original(self, name, out))[1])
    loaded = load_model("broken", broken, device="cpu", dtype="float32")
    assert read and not [name for name in read if name in visual]
    assert any("vision encoder" in note for note in loaded.notes)
    assert any("2 multi-token-prediction" in note for note in loaded.notes)
    ids = prompt_ids(broken)
    assert (run(loaded.model, ids)[0] - reference_logits(reference, ids)).abs().max().item() <= 1e-4


def test_fused_experts_load_as_per_expert(tmp_path):
    """Qwen3.5-MoE experts saved fused ([E, 2I, H] gate|up, [E, H, I] down), as transformers holds them in
    memory, load to the same model as the hub's per-expert tensors."""
    from safetensors.torch import load_file, save_file

    reference = build_reference("qwen3_5_moe", tmp_path / "split")
    fused = tmp_path / "fused"
    shutil.copytree(tmp_path / "split", fused)
    tensors = load_file(fused / "model.safetensors")
    experts = TEXT["num_hidden_layers"], MOE["num_experts"]
    for layer in range(experts[0]):
        prefix = f"model.language_model.layers.{layer}.mlp.experts"
        parts = {kind: [tensors.pop(f"{prefix}.{e}.{kind}.weight") for e in range(experts[1])]
                 for kind in ("gate_proj", "up_proj", "down_proj")}
        tensors[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat(pair) for pair in
                                                         zip(parts["gate_proj"], parts["up_proj"], strict=True)])
        tensors[f"{prefix}.down_proj"] = torch.stack(parts["down_proj"])
    save_file(tensors, fused / "model.safetensors")
    ids = prompt_ids(fused)
    loaded = load_model("fused", fused, device="cpu", dtype="float32")
    assert (run(loaded.model, ids)[0] - reference_logits(reference, ids)).abs().max().item() <= 1e-4


def _edit_config(path, tmp_path, edit) -> object:
    changed = tmp_path / "edited"
    shutil.copytree(path, changed)
    raw = json.loads((changed / "config.json").read_text())
    edit(raw["text_config"])
    (changed / "config.json").write_text(json.dumps(raw))
    return changed


def test_unknown_layer_type_is_one_line_error(qwen3_5, tmp_path, run_cli):
    _, path = qwen3_5
    changed = _edit_config(path, tmp_path, lambda text: text["layer_types"].__setitem__(1, "sliding_attention"))
    code, _, err = run_cli("generate", changed, "-p", "hi", "-n", "1")
    assert_one_line_error(code, err, "layer_types[1]", "sliding_attention", "linear_attention")


def test_layer_types_of_wrong_length_and_default_schedule(qwen3_5, tmp_path):
    _, path = qwen3_5
    raw = json.loads((path / "config.json").read_text())
    raw["text_config"]["layer_types"] = ["linear_attention"] * 3
    with pytest.raises(LlmcliError, match="3 entries, expected 4"):
        config_from_dict(raw)
    del raw["text_config"]["layer_types"]
    raw["text_config"]["full_attention_interval"] = 2
    assert config_from_dict(raw).layer_types == ["linear_attention", "full_attention"] * 2


# -- chat: the recurrent state across turns ---------------------------------------------------------------


def test_chat_turns_equal_a_fresh_prefill_of_the_whole_conversation(qwen3_5):
    """Each turn continues from a snapshot of the DeltaNet states (a recurrent state cannot be cut back to any
    common prefix); its reply must be the one a fresh prefill of the whole conversation gives."""
    _, path = qwen3_5
    loaded = load_model("q", path, device="cpu", dtype="float32")
    stops = stop_token_ids(loaded)
    session = ChatSession(loaded, max_new_tokens=6, system="Be brief.", stop_ids=stops)
    previous_prompt = 0
    for k, user in enumerate(["hello there", "and now a second question", "third", "fourth one"]):
        turn = session.send(user)
        turn.run()
        prompt = session.tokenizer.encode(session.tokenizer.apply_chat_template(session.messages[:-1],
                                                                                add_generation_prompt=True))
        fresh = Generation(loaded.runner, session.tokenizer, prompt, 6, stop_ids=stops)
        "".join(fresh)
        assert turn.generation.result.token_ids == fresh.result.token_ids, f"turn {k}"
        assert (turn.stats.reused_tokens >= previous_prompt > 0) or k == 0
        previous_prompt = len(prompt)
    replies = [m["content"] for m in session.messages if m["role"] == "assistant"]
    assert len(set(replies)) > 1
    again = session.retry()  # back to before the last reply: a snapshot, not a cut
    again.run()
    assert session.messages[-1]["content"] == replies[-1]
    assert again.stats.reused_tokens > 0


# -- backends: int8 and the compiled decode step -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["qwen3_5", "qwen3_next"])
def test_int8_quantises_the_deltanet_and_attention_and_stays_close(kind, tmp_path):
    build_reference(kind, tmp_path)
    plain = load_model(kind, tmp_path, device="cpu", dtype="float32").runner
    int8 = load_model(kind, tmp_path, device="cpu", dtype="float32", quantize="int8").runner
    quantised = {name.rsplit(".", 1)[-1] for name, m in int8.model.named_modules() if isinstance(m, Int8Linear)}
    assert {"in_proj", "out_proj", "qkv_proj", "o_proj"} <= quantised  # fused DeltaNet and attention products
    ids = torch.tensor([prompt_ids(tmp_path)])
    with torch.inference_mode():
        a, b = plain(ids, plain.make_cache(1, 90)), int8(ids, int8.make_cache(1, 90))
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.float().flatten(), dim=0) > 0.99


@pytest.mark.slow
def test_compiled_decode_equals_eager(qwen3_5, monkeypatch):
    """The compiled one-token step updates the conv and recurrent states in place, like the eager step."""
    from llmcli.backends.compile import CompiledDecode
    from tests.test_compile import assert_same_decoding

    monkeypatch.setattr(CompiledDecode, "BUCKET", 4)  # the KV part grows past several sizes
    _, path = qwen3_5
    loaded = load_model("q", path, device="cpu", dtype="float32", compile=True)
    assert_same_decoding(loaded.runner, torch.tensor([prompt_ids(path)]), steps=8)


# -- trace and show ------------------------------------------------------------------------------------


def test_trace_reports_recurrent_state_decay_and_gates(qwen3_5, run_cli):
    _, path = qwen3_5
    code, out, err = run_cli("trace", path, "-p", PROMPT, "-g", "2", "--json", "-", "--dtype", "float32")
    assert code == 0, err
    data = json.loads(out)
    linear, full = data["layers"][0], data["layers"][3]
    assert [layer["mixer"] for layer in data["layers"]] == ["linear"] * 3 + ["full"]
    delta = linear["deltanet"]
    assert delta["heads"] == 4 and len(delta["state_norm"]) == 4 and len(delta["state_norm_per_step"]) == 2
    assert len(delta["g"]["mean_per_token"]) == data["prompt_tokens"] + 2  # prompt and both steps
    assert max(delta["g"]["max"]) <= 0 and all(0 < d <= 1 for d in delta["decay"])
    assert all(0 < b < 1 for b in delta["beta"]["mean"]) and min(delta["output_gate"]["mean"]) > 0
    assert linear["attn_gate"] is None and full["deltanet"] is None
    assert len(full["attn_gate"]["mean"]) == 4 and all(0 < m < 1 for m in full["attn_gate"]["mean"])
    assert full["attention"]["cache_bytes_per_token"] == 2 * 2 * 16 * 4
    assert linear["attention"]["cache_bytes_per_token"] == 0
    # The norms are those of the state the cache holds after the prompt.
    model = load_model("q", path, device="cpu", dtype="float32").model
    _, cache = run(model, data["token_ids"][:data["prompt_tokens"]])
    expected = cache.layers[0].state[0].flatten(1).norm(dim=-1)
    assert torch.allclose(torch.tensor(delta["state_norm"]), expected, rtol=1e-4)
    code, out, err = run_cli("trace", path, "-p", PROMPT, "--dtype", "float32")
    assert code == 0 and "token mixers" in out and "linear" in out


def test_show_prints_schedule_and_both_cache_parts(qwen3_5, run_cli):
    _, path = qwen3_5
    code, out, err = run_cli("show", path, "--json")
    assert code == 0, err
    facts = json.loads(out)
    assert facts["layer_schedule"] == "3 linear, 1 full"
    kv = facts["kv_cache"]
    assert kv["bytes_per_token"] == 2 * 2 * 16 * 4  # K and V, 2 kv heads x 16, one full layer, float32
    conv, state = (2 * 2 * 8 + 4 * 12) * 3 * 4, 4 * 8 * 12 * 4  # Kc-1 = 3 conv columns; float32 state
    assert kv["state_bytes_per_sequence"] == 3 * (conv + state)
    model = load_model("q", path, device="cpu", dtype="float32").model
    assert model.make_cache(1, 8).bytes_per_sequence() == kv["state_bytes_per_sequence"]
    assert model.make_cache(1, 8).bytes_per_token() == kv["bytes_per_token"]
    assert facts["params_total"] == sum(p.numel() for p in model.parameters())
    code, out, _ = run_cli("show", path)
    assert "3 linear, 1 full" in out and "per sequence" in out
