"""`llmcli trace`: statistics against transformers' hidden states and gate choices, the observer
leaving logits untouched, layer selection, JSON shape, decode steps and attention facts."""

from __future__ import annotations

import importlib.util
import json
import math
import re

import pytest
import torch

from llmcli.demo import ensure_demo
from llmcli.errors import LlmcliError
from llmcli.loader import load_model
from llmcli.models.hooks import RouterChoice
from llmcli.tokenizer import Tokenizer
from llmcli.trace import (
    HOOK_POINTS,
    TraceRecorder,
    TraceRun,
    build_trace_json,
    run_trace,
    select_layers,
)
from llmcli.trace_render import render_trace, sparkline
from tests.conftest import save_hf_model

transformers = pytest.importorskip("transformers")

PROMPT = "Mixture of experts routes each token to a few experts; attention sees the whole context. 你好!"
BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)
HAS_DEEPSEEK = importlib.util.find_spec("llmcli.models.deepseek") is not None
needs_deepseek = pytest.mark.skipif(not HAS_DEEPSEEK, reason="llmcli.models.deepseek is not built yet")


def deepseek_v3_reference():
    config = transformers.DeepseekV3Config(
        vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        max_position_embeddings=512, num_mtp_layers=0, attn_implementation="eager",
    )
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers[config.first_k_dense_replace:]:
            # A sharp router with a real choice bias, so near-ties cannot make the comparison flaky
            # and a bias that is ignored (or applied to the weights) changes the experts.
            layer.mlp.gate.weight.normal_(0, 1.0)
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.3)
    return model


def qwen_reference(kind: str, **overrides):
    config = getattr(transformers, f"{kind}Config")(**{**BASE, **overrides}, attn_implementation="eager")
    model = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
    with torch.no_grad():  # random biases and norms, so every hook point carries signal
        for name, param in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                param.normal_(1.0 if "norm" in name else 0.0, 0.5)
    return model


REFERENCES = {
    "qwen2": lambda: qwen_reference("Qwen2"),
    "qwen3": lambda: qwen_reference("Qwen3", head_dim=24),
    "deepseek_v3": deepseek_v3_reference,
}


@pytest.fixture(scope="module", params=sorted(REFERENCES))
def reference(request, tmp_path_factory):
    if request.param.startswith("deepseek") and not HAS_DEEPSEEK:
        pytest.skip("llmcli.models.deepseek is not built yet")
    torch.manual_seed(0)
    model = REFERENCES[request.param]()
    path = save_hf_model(model, tmp_path_factory.mktemp(request.param))
    loaded = load_model(request.param, path, device="cpu", dtype="float32")
    ids = Tokenizer.from_dir(path).encode(PROMPT)
    return request.param, model, loaded, ids


def rms(x: torch.Tensor) -> torch.Tensor:
    return x[0].double().pow(2).mean(-1).sqrt()


def assert_close_rel(ours: list[float], theirs: torch.Tensor, tol: float = 1e-5) -> None:
    ours_t = torch.tensor(ours, dtype=torch.float64)
    assert ours_t.shape == theirs.shape
    rel = ((ours_t - theirs).abs() / theirs.abs()).max().item()
    assert rel <= tol, rel


def test_rms_matches_transformers_hidden_states(reference):
    name, model, loaded, ids = reference
    blocks = {}  # (layer, "attn_out" | "mlp_out") -> transformers' block output

    def capture(index, point):
        def hook(module, args, output):
            blocks[index, point] = (output[0] if isinstance(output, tuple) else output).clone()
        return hook

    handles = []
    for i, layer in enumerate(model.model.layers):
        handles += [layer.self_attn.register_forward_hook(capture(i, "attn_out")),
                    layer.mlp.register_forward_hook(capture(i, "mlp_out"))]
    with torch.inference_mode():
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    for handle in handles:
        handle.remove()
    run = run_trace(loaded.model, ids)
    data = build_trace_json(run, loaded.model, loaded.tokenizer, name)
    layers = data["layers"]
    n = len(layers)
    assert len(hidden) == n + 1
    # transformers: hidden[0] = embeddings, hidden[i + 1] = output of layer i, except that the last
    # entry is after the final norm.
    assert_close_rel(layers[0]["rms_per_token"]["resid_pre"], rms(hidden[0]))
    for i in range(n - 1):
        assert_close_rel(layers[i]["rms_per_token"]["resid_post"], rms(hidden[i + 1]))
        assert_close_rel(layers[i + 1]["rms_per_token"]["resid_pre"], rms(hidden[i + 1]))
    assert_close_rel(data["final_norm"]["rms_per_token"], rms(hidden[n]))
    for i in range(n):
        attn, mlp = blocks[i, "attn_out"], blocks[i, "mlp_out"]
        assert_close_rel(layers[i]["rms_per_token"]["attn_out"], rms(attn), 1e-5)
        assert_close_rel(layers[i]["rms_per_token"]["resid_mid"], rms(hidden[i] + attn), 1e-5)
        assert_close_rel(layers[i]["rms_per_token"]["mlp_out"], rms(mlp), 1e-5)
    # Table means and max |x| follow from the per-token values and the tensors.
    for i in range(n - 1):
        assert layers[i]["rms"]["resid_post"] == pytest.approx(rms(hidden[i + 1]).mean().item(), rel=1e-5)
        assert layers[i]["max_abs"]["resid_post"] == pytest.approx(hidden[i + 1].abs().max().item(), rel=1e-5)


@needs_deepseek
def test_router_experts_match_transformers_gate(reference):
    name, model, loaded, ids = reference
    if not name.startswith("deepseek"):
        pytest.skip("dense model")
    gates = {}

    def hook(index):
        def capture(module, args, output):
            gates[index] = (output[2].clone(), output[1].clone())  # (topk_indices, topk_weights)
        return capture

    cfg = model.config
    handles = [layer.mlp.gate.register_forward_hook(hook(i))
               for i, layer in enumerate(model.model.layers) if i >= cfg.first_k_dense_replace]
    with torch.inference_mode():
        model(torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    data = build_trace_json(run_trace(loaded.model, ids), loaded.model, loaded.tokenizer, name)
    per_group = cfg.n_routed_experts // cfg.n_group
    assert sorted(gates) == [i for i in range(cfg.num_hidden_layers) if i >= cfg.first_k_dense_replace]
    for layer in data["layers"]:
        if layer["index"] not in gates:
            assert layer["kind"] == "dense" and layer["router"] is None
            continue
        assert layer["kind"] == "moe"
        router = layer["router"]
        indices, weights = gates[layer["index"]]
        assert len(router["experts"]) == len(ids)
        for t in range(len(ids)):
            ours = dict(zip(router["experts"][t], router["weights"][t], strict=True))
            theirs = dict(zip(indices[t].tolist(), weights[t].tolist(), strict=True))
            assert set(ours) == set(theirs), (layer["index"], t)
            for expert, weight in theirs.items():
                assert ours[expert] == pytest.approx(weight, rel=1e-5)
            assert router["weights"][t] == sorted(router["weights"][t], reverse=True)  # top first
            assert {e // per_group for e in ours} <= set(router["groups"][t])
        assert router["load"] == torch.bincount(indices.reshape(-1), minlength=cfg.n_routed_experts).tolist()


def demo_models() -> list[str]:
    from llmcli.demo import BUILDERS

    return sorted(BUILDERS)


@pytest.mark.parametrize("demo", demo_models())
def test_logits_identical_with_and_without_trace(demo):
    loaded = load_model(demo, ensure_demo(demo), device="cpu")
    ids = loaded.tokenizer.encode(PROMPT)
    model = loaded.runner
    outputs = []
    for recorder in (None, TraceRecorder()):
        cache = model.make_cache(1, len(ids) + 2)
        with torch.inference_mode():
            prefill = model(torch.tensor([ids]), cache, recorder=recorder)
            step = model(torch.tensor([[ids[0]]]), cache, recorder=recorder)
        outputs.append((prefill, step))
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert torch.equal(outputs[0][1], outputs[1][1])


def test_decode_steps_match_a_full_prefill():
    """--generate traces each decode step; its per-token values equal those of one prefill over the
    same tokens (the cache path and the full path compute the same activations)."""
    loaded = load_model("demo-qwen", ensure_demo("demo-qwen"), device="cpu")
    ids = loaded.tokenizer.encode(PROMPT)
    stepped = build_trace_json(run_trace(loaded.model, ids, generate=4), loaded.model, loaded.tokenizer, "d")
    assert len(stepped["decode_steps"]) == 4
    assert stepped["token_ids"][: len(ids)] == ids and len(stepped["token_ids"]) == len(ids) + 4
    assert [s["position"] for s in stepped["decode_steps"]] == list(range(len(ids), len(ids) + 4))
    full = build_trace_json(run_trace(loaded.model, stepped["token_ids"]), loaded.model, loaded.tokenizer, "d")
    assert full["next_token_id"] == stepped["next_token_id"]
    for a, b in zip(stepped["layers"], full["layers"], strict=True):
        for point in HOOK_POINTS:
            assert a["rms_per_token"][point] == pytest.approx(b["rms_per_token"][point], rel=1e-4)


def test_generation_ends_at_a_stop_token():
    loaded = load_model("demo-qwen", ensure_demo("demo-qwen"), device="cpu")
    ids = loaded.tokenizer.encode(PROMPT)
    first = run_trace(loaded.model, ids).next_token_id
    run = run_trace(loaded.model, ids, generate=5, stop_ids=[first])
    assert run.finish_reason == "stop" and run.steps == [] and run.token_ids == ids


def test_sliding_window_span_follows_the_formula(tmp_path):
    torch.manual_seed(0)
    model = qwen_reference("Qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    path = save_hf_model(model, tmp_path / "m")
    loaded = load_model("sliding", path, device="cpu", dtype="float32")
    ids = loaded.tokenizer.encode("abc def")[:5]
    data = build_trace_json(run_trace(loaded.model, ids, generate=6), loaded.model, loaded.tokenizer, "s")
    assert [layer["attention"]["type"] for layer in data["layers"]] == ["full", "sliding", "sliding"]
    assert [layer["attention"]["window"] for layer in data["layers"]] == [None, 8, 8]
    for step in data["decode_steps"]:
        spans = [a["span"] for a in step["attention"]]
        assert spans == [step["length"], min(8, step["length"]), min(8, step["length"])]


def qwen1_checkpoint(directory, seq_length: int, layers: int = 2):
    """A tiny original-Qwen checkpoint in QWenLMHeadModel's tensor names (random weights)."""
    from safetensors.torch import save_file

    from tests.conftest import write_byte_tokenizer

    hidden, heads, ffn, vocab = 32, 4, 64, 512
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.02

    tensors = {"transformer.wte.weight": rand(vocab, hidden), "transformer.ln_f.weight": torch.ones(hidden),
               "lm_head.weight": rand(vocab, hidden)}
    for i in range(layers):
        p = f"transformer.h.{i}."
        tensors |= {p + "ln_1.weight": torch.ones(hidden), p + "ln_2.weight": torch.ones(hidden),
                    p + "attn.c_attn.weight": rand(3 * hidden, hidden), p + "attn.c_attn.bias": rand(3 * hidden),
                    p + "attn.c_proj.weight": rand(hidden, hidden), p + "mlp.w1.weight": rand(ffn // 2, hidden),
                    p + "mlp.w2.weight": rand(ffn // 2, hidden), p + "mlp.c_proj.weight": rand(hidden, ffn // 2)}
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "model.safetensors"))
    config = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "vocab_size": vocab,
              "hidden_size": hidden, "num_attention_heads": heads, "num_hidden_layers": layers,
              "intermediate_size": ffn, "kv_channels": hidden // heads, "seq_length": seq_length,
              "max_position_embeddings": 4096, "rotary_emb_base": 10000, "rotary_pct": 1.0,
              "use_logn_attn": True, "use_dynamic_ntk": True, "layer_norm_epsilon": 1e-6,
              "torch_dtype": "float32"}
    (directory / "config.json").write_text(json.dumps(config))
    write_byte_tokenizer(directory, vocab)
    return directory


def as_range(value) -> tuple[float, float]:
    return (value, value) if isinstance(value, (int, float)) else tuple(value)


def test_qwen1_windows_logn_ntk_follow_the_formulas(run_cli, tmp_path):
    if importlib.util.find_spec("llmcli.config_qwen1") is None:
        pytest.skip("original Qwen is not built yet")
    seq_length, head_dim, base = 16, 8, 10000.0
    path = qwen1_checkpoint(tmp_path / "qwen1", seq_length)
    prompt = "The quick brown fox jumps over the lazy dog. " * 3
    code, out, err = run_cli("trace", str(path), "-p", prompt, "--window", "4:8", "-g", "3", "--json", "-")
    if code != 0 and ("not built yet" in err or "no model implementation" in err):
        pytest.skip(f"original Qwen attention is not built yet: {err.strip()}")
    assert code == 0, err
    data = json.loads(out)
    length = data["prompt_tokens"]
    assert length > seq_length
    alpha = max(2 ** math.ceil(math.log2(length / seq_length) + 1) - 1, 1)
    for layer, window in zip(data["layers"], (4, 8), strict=True):
        attention = layer["attention"]
        assert attention["type"] == "sliding" and attention["window"] == window
        assert attention["span"] == window
        assert attention["ntk_alpha"] == pytest.approx(alpha)
        assert attention["rope_base"] == pytest.approx(base * alpha ** (head_dim / (head_dim - 2)), rel=1e-6)
        low, high = as_range(attention["logn_scale"])
        assert low == pytest.approx(1.0) and high == pytest.approx(math.log(length) / math.log(seq_length))
    for step in data["decode_steps"]:  # the alpha chosen at prefill stays; LogN follows the position
        for attention in step["attention"]:
            assert attention["ntk_alpha"] == pytest.approx(alpha)
            expected = math.log(step["position"] + 1) / math.log(seq_length)
            assert as_range(attention["logn_scale"])[1] == pytest.approx(expected)


# -- CLI --------------------------------------------------------------------------------------------


def table_layer_rows(out: str) -> set[str]:
    """Layer numbers that start a table row (tables print rows as `  3   0.0123 ...`)."""
    return {m.group(1) for m in re.finditer(r"^\s*(\d+)\s{2,}\S", out, re.MULTILINE)}


def test_cli_layer_filter_shows_only_that_layer(run_cli):
    code, out, err = run_cli("trace", "--layer", "3")
    assert code == 0, err
    assert table_layer_rows(out) == {"3"}
    assert "norm" not in out  # the final norm row belongs to the unfiltered view
    code, out, err = run_cli("trace")
    assert code == 0, err
    assert table_layer_rows(out) == {"0", "1", "2", "3"}
    assert "█" in out


def test_cli_json_shape(run_cli):
    code, out, err = run_cli("trace", "demo-qwen", "-p", "hello world", "--layer", "1-2", "--layer", "0", "--json", "-")
    assert code == 0, err
    data = json.loads(out)
    for key in ("model", "token_ids", "tokens", "layers", "final_norm", "decode_steps"):
        assert key in data
    n = len(data["token_ids"])
    assert len(data["tokens"]) == n and "".join(data["tokens"]) == "hello world"
    assert [layer["index"] for layer in data["layers"]] == [0, 1, 2]
    for layer in data["layers"]:
        assert layer["kind"] == "dense" and layer["router"] is None
        assert set(HOOK_POINTS) <= set(layer["rms"]) and set(HOOK_POINTS) <= set(layer["rms_per_token"])
        assert all(len(layer["rms_per_token"][p]) == n for p in HOOK_POINTS)
        for p in HOOK_POINTS:
            assert layer["rms"][p] == pytest.approx(sum(layer["rms_per_token"][p]) / n, rel=1e-5)
        assert {"type", "window", "logn_scale", "ntk_alpha", "rope_base"} <= set(layer["attention"])
        assert layer["attention"]["type"] == "full" and layer["attention"]["span"] == n


def test_cli_generate_and_json_file(run_cli, tmp_path):
    target = tmp_path / "trace.json"
    code, out, err = run_cli("trace", "demo-qwen", "-g", "3", "--tokens", "--layer", "2", "--json", str(target))
    assert code == 0, err
    data = json.loads(target.read_text())
    assert len(data["decode_steps"]) == 3 and len(data["generated_token_ids"]) == 3
    assert "3 decode steps" in out and "layer 2 (dense) RMS per token" in out
    assert len(data["layers"][0]["rms_per_token"]["resid_post"]) == len(data["token_ids"])


@pytest.mark.skipif("demo-deepseek" not in demo_models(), reason="demo-deepseek is not built yet")
def test_cli_moe_demo_shows_router_choices(run_cli):
    code, out, err = run_cli("trace", "demo-deepseek", "--layer", "0-1", "--tokens", "-g", "2")
    assert code == 0, err
    assert "layer 1 router choices per token" in out and "load per expert" in out
    assert re.search(r"^\s*0\s+dense\s*$", out, re.MULTILINE)  # the dense layer says so in the router table
    assert "L1 experts" in out  # decode steps list the experts chosen for each generated token


@pytest.mark.parametrize("spec, fragment", [("4", "0-3"), ("2-9", "0-3"), ("x", "not a layer"),
                                            ("3-1", "backwards"), ("-1", "not a layer")])
def test_cli_bad_layer_is_one_line_error(run_cli, spec, fragment):
    code, out, err = run_cli("trace", "--layer", spec)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in err


def test_select_layers():
    assert select_layers([], 4) is None
    assert select_layers(["3"], 4) == [3]
    assert select_layers(["0,2", "1-2"], 4) == [0, 1, 2]
    with pytest.raises(LlmcliError, match=r"has 4 layers \(valid: 0-3\)"):
        select_layers(["1,4"], 4, "m")


# -- router rendering with a synthetic choice (independent of any MoE model) -------------------------


def test_router_summary_and_rendering_from_synthetic_choices():
    from rich.console import Console

    rec = TraceRecorder()
    hidden = torch.ones(1, 3, 4)
    for layer in (0, 1):
        for point in HOOK_POINTS:
            rec.record(layer, point, hidden * (layer + 1))
    scores = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    rec.record(1, "router", RouterChoice(experts=torch.tensor([[2, 0], [0, 1], [0, 3]]),
                                         weights=torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.5, 0.5]]),
                                         scores=scores, groups=torch.tensor([[1], [0], [0]])))
    rec.record(1, "shared_out", torch.full((1, 3, 4), 2.0))
    rec.record(1, "routed_out", torch.full((1, 3, 4), 0.5))
    rec.record(None, "final_norm", hidden)

    class Cfg:
        num_layers = 2

        @staticmethod
        def is_moe_layer(i):
            return i == 1

    class Model:
        config = Cfg

    run = TraceRun(rec, [0, 1], 2, [5, 6, 7], 3, 8, [{"type": "full", "window": None, "span": 3}] * 2)
    data = build_trace_json(run, Model, None, "synthetic")
    router = data["layers"][1]["router"]
    assert data["layers"][0]["router"] is None and data["layers"][0]["kind"] == "dense"
    assert data["layers"][1]["kind"] == "moe"
    assert router["load"] == [3, 1, 1, 1]
    assert router["experts"] == [[2, 0], [0, 1], [0, 3]]
    assert router["groups"] == [[1], [0], [0]]
    assert router["entropy_per_token"] == pytest.approx([math.log(4), 0.0, math.log(2)], abs=1e-6)
    assert router["entropy"] == pytest.approx((math.log(4) + math.log(2)) / 3, rel=1e-6)
    assert router["shared_rms"] == pytest.approx(2.0) and router["routed_rms"] == pytest.approx(0.5)
    assert data["layers"][1]["rms"]["resid_post"] == pytest.approx(2.0)
    console = Console(record=True, width=120)
    render_trace(data, console, per_token=True)
    text = console.export_text()
    assert "dense" in text and "router" in text
    assert "2:0.60 0:0.40" in text and sparkline([3, 1, 1, 1]) in text
    assert sparkline([0, 8, 4]) == " █▄"
