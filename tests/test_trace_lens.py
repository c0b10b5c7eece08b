"""`trace --logit-lens` and `--attention-stats` against transformers: the lens from its hidden states
(final norm + head), the statistics from its eager attention weights; logits unchanged with both on."""

from __future__ import annotations

import pytest
import torch

from llmcli.demo import ensure_demo
from llmcli.loader import load_model
from llmcli.tokenizer import Tokenizer
from llmcli.trace import TraceRecorder, build_trace_json, run_trace
from llmcli.trace_stats import AttentionStats, LogitLens
from tests.conftest import save_hf_model
from tests.test_trace import HAS_DEEPSEEK, PROMPT, deepseek_v3_reference, demo_models, qwen_reference

transformers = pytest.importorskip("transformers")

K = 4
REFERENCES = {
    "qwen2": lambda: qwen_reference("Qwen2"),
    # Layers 1 and 2 slide an 8-token window over the 30-odd prompt tokens: the masked keys count too.
    "qwen2_sliding": lambda: qwen_reference("Qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "deepseek_v3": deepseek_v3_reference,
}


@pytest.fixture(scope="module", params=sorted(REFERENCES))
def traced(request, tmp_path_factory):
    """A tiny transformers model, its eager outputs, and llmcli's trace of the same tokens."""
    if request.param.startswith("deepseek") and not HAS_DEEPSEEK:
        pytest.skip("llmcli.models.deepseek is not built yet")
    torch.manual_seed(0)
    model = REFERENCES[request.param]()
    path = save_hf_model(model, tmp_path_factory.mktemp(request.param))
    loaded = load_model(request.param, path, device="cpu", dtype="float32")
    ids = Tokenizer.from_dir(path).encode(PROMPT)
    with torch.inference_mode():
        out = model(torch.tensor([ids]), output_hidden_states=True, output_attentions=True)
    run = run_trace(loaded.model, ids, logit_lens=K, attention_stats=True)
    data = build_trace_json(run, loaded.model, loaded.tokenizer, request.param)
    return model, out, data


def test_logit_lens_equals_final_norm_and_head_on_transformers_hidden_states(traced):
    model, out, data = traced
    n = len(data["layers"])
    final = out.logits[0].double().log_softmax(-1)
    target = final.argmax(-1)
    assert data["logit_lens"]["target_ids"] == target.tolist()
    assert data["logit_lens"]["k"] == K
    for i, layer in enumerate(data["layers"]):
        # hidden_states[i + 1] is layer i's output, except the last, which is already normed.
        hidden = out.hidden_states[i + 1]
        normed = hidden if i == n - 1 else model.model.norm(hidden)
        with torch.inference_mode():
            logp = model.lm_head(normed)[0].double().log_softmax(-1)
        top = logp.topk(K, dim=-1)
        lens = layer["logit_lens"]
        assert lens["top_ids"] == top.indices.tolist(), i
        torch.testing.assert_close(torch.tensor(lens["top_probs"], dtype=torch.float64), top.values.exp(),
                                   rtol=1e-4, atol=1e-6)
        expected = logp.gather(1, target[:, None])[:, 0].exp()
        torch.testing.assert_close(torch.tensor(lens["target_prob"], dtype=torch.float64), expected,
                                   rtol=1e-4, atol=1e-6)
    last = data["layers"][-1]["logit_lens"]
    assert [row[0] for row in last["top_ids"]] == target.tolist()  # the last layer's lens is the model
    assert last["top_ids"][-1][0] == data["next_token_id"]


def reference_stats(probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Entropy, first-token mass and mean attended distance from eager weights [1, H, T, T]."""
    p = probs[0].double()
    t = p.shape[-1]
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)  # [H, T]
    distance = (p * (torch.arange(t)[:, None] - torch.arange(t)[None, :]).double()).sum(-1)
    return {"entropy": entropy, "sink": p[..., 0], "distance": distance}


def test_attention_stats_equal_those_of_transformers_eager_weights(traced):
    _, out, data = traced
    assert len(out.attentions) == len(data["layers"])
    for probs, layer in zip(out.attentions, data["layers"], strict=True):
        stats = layer["attention_stats"]
        for name, values in reference_stats(probs).items():
            ours = torch.tensor(stats[name], dtype=torch.float64)
            torch.testing.assert_close(ours, values.mean(-1), rtol=1e-4, atol=1e-5)
            per_token = torch.tensor(stats[f"{name}_per_token"], dtype=torch.float64)
            torch.testing.assert_close(per_token, values.mean(0), rtol=1e-4, atol=1e-5)
        assert stats["sink_per_token"][0] == pytest.approx(1.0)  # the first query sees only itself
        assert stats["entropy_per_token"][0] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("demo", demo_models())
def test_logits_identical_with_every_option_on(demo):
    loaded = load_model(demo, ensure_demo(demo), device="cpu")
    ids = loaded.tokenizer.encode(PROMPT)
    model = loaded.runner
    recorders = [None, TraceRecorder(None, LogitLens(model.model.model.norm, model.model.lm_head, 5),
                                     AttentionStats())]
    outputs = []
    for recorder in recorders:
        cache = model.make_cache(1, len(ids) + 2)
        with torch.inference_mode():
            prefill = model(torch.tensor([ids]), cache, recorder=recorder)
            step = model(torch.tensor([[ids[0]]]), cache, recorder=recorder)
            last = model(torch.tensor([[ids[1]]]), cache, recorder=recorder, last_only=True)
        outputs.append((prefill, step, last))
    for ours, plain in zip(outputs[1], outputs[0], strict=True):
        assert torch.equal(ours, plain)
    lens, stats = recorders[1].lens, recorders[1].attention
    assert sum(len(t) for t in lens.targets) == len(ids) + 2  # every position's prediction was seen
    assert all(stats._queries[i] == len(ids) + 2 for i in range(loaded.config.num_layers))


def test_lens_and_stats_follow_decode_steps():
    """--generate: the lens and the statistics cover the generated tokens as well, and equal those of one
    prefill over the same tokens (the absorbed MLA decode path included)."""
    for demo in demo_models():
        loaded = load_model(demo, ensure_demo(demo), device="cpu")
        ids = loaded.tokenizer.encode(PROMPT)[:12]
        stepped = build_trace_json(run_trace(loaded.runner, ids, generate=3, logit_lens=3, attention_stats=True),
                                   loaded.model, loaded.tokenizer, demo)
        full = build_trace_json(run_trace(loaded.runner, stepped["token_ids"], logit_lens=3, attention_stats=True),
                                loaded.model, loaded.tokenizer, demo)
        assert stepped["logit_lens"]["target_ids"] == full["logit_lens"]["target_ids"]
        for a, b in zip(stepped["layers"], full["layers"], strict=True):
            assert a["logit_lens"]["top_ids"] == b["logit_lens"]["top_ids"]
            assert a["logit_lens"]["target_prob"] == pytest.approx(b["logit_lens"]["target_prob"], rel=1e-3)
            for name in ("entropy", "sink", "distance"):
                assert a["attention_stats"][name] == pytest.approx(b["attention_stats"][name], rel=1e-3, abs=1e-5)
