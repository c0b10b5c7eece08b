"""`trace --corpus`: expert counts equal to transformers' router choices (DeepSeek-V3, Qwen3-MoE) over a corpus
run in padded batches, labels, stdin, skipped records, dense models, the balance formulas and the expert plan
on worked examples, and `show --experts-from`."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from llmcli.corpus import CorpusReader
from llmcli.errors import LlmcliError
from llmcli.expert_plan import curve, parse_size, plan
from llmcli.loader import load_model
from llmcli.tokenizer import Tokenizer
from llmcli.workload import run_workload
from llmcli.workload_json import build_workload_json
from llmcli.workload_recorder import PointAgg
from llmcli.workload_stats import LogHistogram, balance, coverage, separation
from tests.conftest import save_hf_model

transformers = pytest.importorskip("transformers")

CORPUS = [  # lengths differ, so batches carry padding
    "Mixture of experts routes each token to a few experts.",
    "def add(a, b): return a + b",
    "你好，世界!",
    "The quick brown fox jumps over the lazy dog while the router picks its experts, token after token.",
    "x",
    "for i in range(10): print(i * i)",
    "Attention is causal: padding after a prompt never reaches its tokens.",
]
LABELS = ["prose", "code", "prose", "prose", "code", "code", "prose"]


def deepseek_reference():
    from tests.test_trace import deepseek_v3_reference

    return deepseek_v3_reference()


def qwen3_moe_reference():
    from tests.test_qwen_moe import CASES, build_reference

    kind, overrides = CASES["qwen3_moe"]
    return build_reference(kind, overrides)


REFERENCES = {"deepseek_v3": deepseek_reference, "qwen3_moe": qwen3_moe_reference}


@pytest.fixture(scope="module", params=sorted(REFERENCES))
def moe(request, tmp_path_factory):
    torch.manual_seed(0)
    model = REFERENCES[request.param]()
    path = save_hf_model(model, tmp_path_factory.mktemp(request.param))
    return request.param, model, path, load_model(request.param, path, device="cpu", dtype="float32")


def reference_choices(model, prompts: list[list[int]]) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """transformers' top-k experts and weights per MoE layer, one entry per prompt (each run alone)."""
    captured: dict[int, list] = {}

    def hook(index):
        def capture(module, args, output):
            captured.setdefault(index, []).append((output[2].clone(), output[1].clone()))
        return capture

    handles = [layer.mlp.gate.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)
               if hasattr(layer.mlp, "gate")]
    with torch.inference_mode():
        for ids in prompts:
            model(torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    return captured


def trace_corpus(loaded, lines, **kwargs) -> dict:
    reader = CorpusReader(loaded.tokenizer)
    run = run_workload(loaded.runner, reader.prompts(lines), reader, **kwargs)
    return build_workload_json(run, reader, "x", expert_size=1000, plan_budget=None)


def test_counts_equal_transformers_router_choices(moe):
    name, model, path, loaded = moe
    tok = Tokenizer.from_dir(path)
    prompts = [tok.encode_prompt(text) for text in CORPUS]
    captured = reference_choices(model, prompts)
    data = trace_corpus(loaded, CORPUS, batch_size=3)  # 3 rows of different lengths per batch
    routing = data["routing"]
    assert routing["tokens"] == sum(map(len, prompts)) == data["corpus"]["tokens"]
    assert routing["prompts"] == len(CORPUS) and data["corpus"]["skipped"] == 0
    assert [layer["index"] for layer in routing["layers"]] == sorted(captured)
    e = routing["num_experts"]
    for layer in routing["layers"]:
        experts = torch.cat([ex for ex, _ in captured[layer["index"]]])
        weights = torch.cat([w for _, w in captured[layer["index"]]])
        assert layer["counts"] == torch.bincount(experts.reshape(-1), minlength=e).tolist()
        mass = torch.zeros(e, dtype=torch.float64).index_add_(0, experts.reshape(-1), weights.reshape(-1).double())
        assert layer["gate_mass"] == pytest.approx(mass.tolist(), rel=1e-5, abs=1e-6)
        pairs = {}
        for row in experts.tolist():
            for a in range(len(row)):
                for b in range(a + 1, len(row)):
                    key = (min(row[a], row[b]), max(row[a], row[b]))
                    pairs[key] = pairs.get(key, 0) + 1
        for pair in layer["pairs"]:
            assert pairs[tuple(pair["experts"])] == pair["count"]
        assert layer["pairs"][0]["count"] == max(pairs.values())
        assert layer["jain"] == pytest.approx(balance(layer["counts"])["jain"])


def test_labels_split_the_counts(moe, tmp_path):
    name, model, path, loaded = moe
    lines = [json.dumps({"text": t, "label": label}) for t, label in zip(CORPUS, LABELS, strict=True)]
    data = trace_corpus(loaded, lines, batch_size=4)
    routing = data["routing"]
    assert set(routing["labels"]) == {"prose", "code"}
    for label in ("prose", "code"):
        alone = trace_corpus(loaded, [t for t, x in zip(CORPUS, LABELS, strict=True) if x == label], batch_size=2)
        mine = routing["labels"][label]
        assert mine["prompts"] == LABELS.count(label)
        assert mine["tokens"] == alone["corpus"]["tokens"]
        theirs = [layer["counts"] for layer in alone["routing"]["layers"]]
        assert [layer["counts"] for layer in mine["layers"]] == theirs
    for layer, sep in zip(routing["layers"], routing["separation"], strict=True):
        assert sep["index"] == layer["index"]
        assert 0 <= sep["divergence"] <= 1  # two labels: at most one bit
        for expert in sep["experts"]:
            assert expert["label"] in ("prose", "code")


def test_balance_formulas_on_worked_examples():
    b = balance([4, 0, 2, 2])  # mean 2, population sd sqrt(2); p = 1/2, 1/4, 1/4 -> 1.5 bits of 2
    assert b["cv"] == pytest.approx(math.sqrt(2) / 2)
    assert b["jain"] == pytest.approx(64 / (4 * 24))
    assert b["entropy"] == pytest.approx(0.75)
    assert b["max_min"] is None and b["unused"] == 1
    even = balance([5, 5, 5, 5])
    assert (even["cv"], even["jain"], even["entropy"], even["max_min"]) == pytest.approx((0, 1, 1, 1))
    one = balance([8, 0, 0, 0])
    assert one["jain"] == pytest.approx(0.25) and one["entropy"] == pytest.approx(0.0)
    assert balance([3, 1])["max_min"] == pytest.approx(3.0)
    cov = coverage(list(range(1, 21)))  # 20 experts, 210 activations
    assert cov == pytest.approx({"5%": 20 / 210, "10%": 39 / 210, "25%": 90 / 210, "50%": 155 / 210})
    assert coverage([4, 0, 2, 2])["5%"] == 0.5  # at least one expert
    apart = separation(torch.tensor([[10, 0], [0, 10]]))
    assert apart["divergence"] == pytest.approx(1.0)
    assert {(x["expert"], x["label"]) for x in apart["experts"]} == {(0, 0), (1, 1)}
    assert separation(torch.tensor([[3, 6], [1, 2]]))["divergence"] == pytest.approx(0.0, abs=1e-12)


def test_log_histogram_quantiles_are_within_a_bin():
    values = torch.logspace(-3, 3, 10001)
    hist = LogHistogram()
    for chunk in values.split(777):
        hist.add(chunk)
    for q in (0.5, 0.99):
        truth = float(torch.quantile(values.double(), q))
        assert hist.quantile(q) == pytest.approx(truth, rel=0.012)
    assert hist.summary()["max"] == pytest.approx(1000.0) and hist.count == 10001


def test_massive_activations_found_by_channel_and_position():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)  # two rows of five tokens; row 1 has 3 real tokens
    x[0, 2, 5] = 1e4
    x[1, 1, 9] = -1e4
    x[1, 4, 3] = 1e5  # padding: not counted
    agg = PointAgg()
    valid = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    positions = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    agg.add(x, valid, positions)
    assert agg.massive == 2 and agg.massive_tokens == 2
    assert agg.channels.nonzero().reshape(-1).tolist() == [5, 9]
    assert agg.positions.tolist() == [0, 1, 1]
    assert agg.max_abs.max == pytest.approx(1e4)


def test_plan_hit_rate_by_hand():
    layers = [{"index": 1, "counts": [10, 0, 5, 5]}, {"index": 3, "counts": [1, 1, 1, 17]}]
    p = plan(layers, tokens=20, bytes_per_expert=100, budget=250)  # room for 2 experts: 17 and 10
    assert p["resident_experts"] == 2
    assert [layer["resident"] for layer in p["layers"]] == [[0], [3]]
    assert p["hit_rate"] == pytest.approx(27 / 40)
    assert p["layers"][0]["hit_rate"] == pytest.approx(10 / 20) and p["layers"][1]["hit_rate"] == pytest.approx(17 / 20)
    assert p["uniform_hit_rate"] == pytest.approx(2 / 8)
    assert p["bytes_per_token"] == pytest.approx(13 * 100 / 20)
    assert p["bytes_per_token_without_plan"] == pytest.approx(40 * 100 / 20)
    four = plan(layers, tokens=20, bytes_per_expert=100, budget=499)  # 4: 17, 10, then the 5s of layer 1
    assert [layer["resident"] for layer in four["layers"]] == [[0, 2, 3], [3]]
    assert four["hit_rate"] == pytest.approx(37 / 40)
    assert plan(layers, 20, 100, 10**9)["hit_rate"] == 1.0 and plan(layers, 20, 100, 0)["hit_rate"] == 0.0
    assert [c["hit_rate"] for c in curve(layers, 20, 100, shares=(0.25, 0.5))] == pytest.approx([27 / 40, 37 / 40])
    assert parse_size("24GB") == 24 * 10**9 and parse_size("1.5GiB") == 3 * 2**29 and parse_size("512") == 512
    with pytest.raises(LlmcliError):
        parse_size("lots")


@pytest.fixture(scope="module")
def deepseek_path(tmp_path_factory):
    torch.manual_seed(0)
    return save_hf_model(deepseek_reference(), tmp_path_factory.mktemp("deepseek-cli"))


def test_stdin_malformed_records_skipped_and_counted(deepseek_path, run_cli, monkeypatch):
    good = [json.dumps({"text": CORPUS[0]}), json.dumps({"text": CORPUS[1], "label": 7}),
            json.dumps({"messages": [{"role": "user", "content": "hello"}], "label": "chat"})]
    bad = ["{not json", "[1, 2]", json.dumps({"text": 5}), json.dumps({"messages": "hi"}),
           json.dumps({"text": "ok", "label": [1]}), json.dumps({"prompt": "wrong key"})]
    lines = [good[0], bad[0], "", bad[1], good[1], bad[2], bad[3], good[2], bad[4], bad[5]]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    code, out, err = run_cli("trace", deepseek_path, "--corpus", "-", "--json", "-", "--device", "cpu",
                             "--dtype", "float32")
    assert code == 0, err
    data = json.loads(out)
    assert data["corpus"]["prompts"] == 3 and data["routing"]["prompts"] == 3
    assert data["corpus"]["skipped"] == data["routing"]["skipped"] == 6
    assert data["corpus"]["skip_reasons"] == {"not valid JSON": 1, "not a JSON object": 1,
                                              "no `text` string or `messages` list": 2,
                                              "`messages` is not a list of {role, content} strings": 1,
                                              "label is not a string or integer": 1}
    assert set(data["routing"]["labels"]) == {"7", "chat"}
    tok = Tokenizer.from_dir(deepseek_path)
    chat_ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hello"}]))
    texts = len(tok.encode_prompt(CORPUS[0])) + len(tok.encode_prompt(CORPUS[1]))
    assert data["corpus"]["tokens"] == texts + len(chat_ids)


def test_cli_outputs_budget_generate_and_show_plan(deepseek_path, run_cli, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    stats, table, page = tmp_path / "stats.json", tmp_path / "counts.csv", tmp_path / "page.html"
    code, out, err = run_cli("trace", deepseek_path, "--corpus", corpus, "--json", stats, "--csv", table,
                             "--html", page, "--plan-memory", "40KB", "--batch-size", "2", "--device", "cpu")
    assert code == 0, err
    assert "Balance per MoE layer" in out and "hit rate" in out
    data = json.loads(stats.read_text())
    rows = table.read_text().splitlines()
    assert rows[0] == "layer,expert,label,count,gate_mass"
    first = data["routing"]["layers"][0]
    assert [int(r.split(",")[3]) for r in rows[1:] if r.startswith(f"{first['index']},")] == first["counts"]
    assert "Expert load" in page.read_text(encoding="utf-8")
    plan_json = data["plan"]
    assert plan_json["budget_bytes"] == 40_000 and plan_json["expert_bytes"] == 3 * 64 * 32 * 4
    code, out, err = run_cli("show", deepseek_path, "--experts-from", stats, "--json")
    assert code == 0, err
    assert json.loads(out)["plan"] == plan_json  # the budget saved in the trace
    code, out, err = run_cli("show", deepseek_path, "--experts-from", stats, "--plan-memory", "40KB")
    assert code == 0 and "keep" in out and f"{plan_json['hit_rate'] * 100:.1f}%" in out
    # A budget of tokens, then generation: decode steps are routed too.
    code, out, err = run_cli("trace", deepseek_path, "--corpus", corpus, "--max-tokens", "20", "--generate", "3",
                             "--json", "-", "--device", "cpu")
    assert code == 0, err
    budget = json.loads(out)
    assert budget["corpus"]["tokens"] == 20 and budget["corpus"]["budget_reached"]
    assert budget["routing"]["tokens"] == 20 + budget["corpus"]["generated"] > 20


def test_dense_model_gets_activations_and_no_routing(run_cli, tmp_path):
    from tests.test_trace import qwen_reference

    torch.manual_seed(0)
    model = qwen_reference("Qwen2")
    path = save_hf_model(model, tmp_path / "qwen2")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    code, out, err = run_cli("trace", path, "--corpus", corpus, "--json", "-", "--batch-size", "3",
                             "--device", "cpu", "--dtype", "float32")
    assert code == 0, err
    data = json.loads(out)
    assert data["routing"] is None and data["plan"] is None
    tok = Tokenizer.from_dir(path)
    hidden = []
    with torch.inference_mode():
        for text in CORPUS:
            hidden.append(model(torch.tensor([tok.encode_prompt(text)]), output_hidden_states=True).hidden_states)
    layers = data["activations"]["layers"]
    assert [layer["index"] for layer in layers] == list(range(model.config.num_hidden_layers))
    for i in range(len(layers) - 1):  # hidden[i + 1]: layer i's output (the last is after the final norm)
        states = torch.cat([h[i + 1][0] for h in hidden])
        post = layers[i]["points"]["resid_post"]
        rms = states.double().pow(2).mean(-1).sqrt()
        assert post["tokens"] == states.shape[0]
        assert post["max_abs"]["max"] == pytest.approx(states.abs().max().item(), rel=1e-5)
        assert post["rms"]["max"] == pytest.approx(rms.max().item(), rel=1e-5)
        assert post["rms"]["mean"] == pytest.approx(rms.mean().item(), rel=1e-5)
        assert post["rms"]["p50"] == pytest.approx(torch.quantile(rms, 0.5).item(), rel=0.03)
    code, out, err = run_cli("show", path, "--experts-from", tmp_path / "missing.json")
    assert code == 2 and "no such file" in err


def test_bad_option_combinations(run_cli, tmp_path):
    code, _, err = run_cli("trace", "demo-deepseek", "--csv", tmp_path / "x.csv")
    assert code == 2 and "--csv needs --corpus" in err
    code, _, err = run_cli("trace", "demo-deepseek", "--corpus", tmp_path / "none.txt")
    assert code == 2 and "no such file" in err
    (tmp_path / "c.txt").write_text("hello\n")
    code, _, err = run_cli("trace", "demo-deepseek", "--corpus", tmp_path / "c.txt", "-p", "hi")
    assert code == 2 and "--prompt" in err
    code, _, err = run_cli("trace", "demo-deepseek", "--corpus", tmp_path / "c.txt", "--plan-memory", "lots")
    assert code == 2 and "not a size" in err
    assert "Traceback" not in err
