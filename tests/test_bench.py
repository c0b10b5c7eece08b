"""bench: workload bookkeeping, statistics, memory and bandwidth accounting, the CLI's outputs, and
`--compare transformers` on the same weights (tiny shapes, one or two runs: speed is not asserted)."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import statistics
import sys

import pytest
import torch
from torch import nn

from llmcli import bench, machine
from llmcli.config import ModelConfig, config_from_dict
from llmcli.demo import ensure_demo
from llmcli.errors import LlmcliError
from llmcli.loader import load_model
from tests.conftest import save_hf_model

RESULT_FIELDS = {"backend", "prompt_tokens", "gen_tokens", "batch", "prefill_tokens_per_s", "decode_tokens_per_s",
                 "ttft_s", "peak_memory_bytes", "bandwidth_fraction"}
HAS_DEEPSEEK = importlib.util.find_spec("llmcli.models.deepseek") is not None


@pytest.fixture(autouse=True)
def _small_bandwidth_probe(monkeypatch):
    """The real measurement, with 32 MiB buffers instead of 512 MiB: tests stay quick on shared machines."""
    measure = machine.measure_bandwidth
    monkeypatch.setattr(machine, "measure_bandwidth", lambda device: measure(device, buffer_bytes=32 << 20, repeats=2))


def bench_json(run_cli, tmp_path, *args) -> dict:
    out = tmp_path / "bench.json"
    code, stdout, stderr = run_cli("bench", *args, "--json", out)
    assert code == 0, stderr
    return json.loads(out.read_text())


def assert_consistent(result: dict) -> None:
    """Rates follow from the recorded per-run times and token counts; std >= 0."""
    b, p, n = result["batch"], result["prompt_tokens"], result["gen_tokens"]
    runs = result["runs"]
    assert result["decode_steps"] == n - 1
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "ttft_s"):
        assert result[key]["std"] >= 0
        if len(runs) == 1:
            assert result[key]["std"] == 0
    for run in runs:
        assert run["generated_tokens"] == b * n  # EOS ignored: every run decodes exactly n tokens
        assert run["prefill_s"] > 0 and run["decode_s"] > 0
    prefill = [b * p / r["prefill_s"] for r in runs]
    decode = [b * (n - 1) / r["decode_s"] for r in runs]
    assert result["prefill_tokens_per_s"]["mean"] == pytest.approx(statistics.fmean(prefill))
    assert result["decode_tokens_per_s"]["mean"] == pytest.approx(statistics.fmean(decode))
    assert result["ttft_s"]["mean"] == pytest.approx(statistics.fmean(r["prefill_s"] for r in runs))
    if len(runs) > 1:
        assert result["decode_tokens_per_s"]["std"] == pytest.approx(statistics.stdev(decode))
    assert result["peak_memory_bytes"] > result["weights_bytes"] > 0
    assert 0 < result["bandwidth_fraction"]


# -- the command on the demo model ---------------------------------------------------------------


def test_demo_bench_json_fields_and_consistency(run_cli, tmp_path):
    data = bench_json(run_cli, tmp_path, "demo-qwen", "-p", "8,16", "-n", "5", "--repeat", "2", "--warmup", "1")
    assert data["model"] == "demo-qwen" and data["device"] == "cpu" and data["dtype"] == "float32"
    for key in ("llmcli", "torch", "device_name", "threads", "dtype", "memory_bandwidth_bytes_per_s"):
        assert key in data["env"]
    assert data["env"]["memory_bandwidth_bytes_per_s"] > 1e8
    results = data["results"]
    assert [(r["prompt_tokens"], r["gen_tokens"], r["batch"]) for r in results] == [(8, 5, 1), (16, 5, 1)]
    demo = load_model("demo-qwen", ensure_demo("demo-qwen"), device="cpu", dtype="float32").model
    assert all(layer.self_attn.window is None for layer in demo.model.layers)
    for result in results:
        assert RESULT_FIELDS <= set(result)
        assert result["backend"] == "llmcli" and len(result["runs"]) == 2
        assert_consistent(result)
        # Bandwidth use is the bytes a step reads (weights, and the cache at the steps' mean context) x steps per
        # second / measured bandwidth.
        # The demo's layers attend to every key: the 4 steps read prompt + 1 .. prompt + 4 keys' rows, 2.5 past the
        # prompt on average.
        cache = demo.make_cache(1, 1).bytes_per_token() * (result["prompt_tokens"] + 2.5)
        assert result["decode_cache_bytes_per_token"] == pytest.approx(cache) and cache > 0
        expected = ((result["decode_weight_bytes_per_token"] + cache) * result["decode_tokens_per_s"]["mean"]
                    / data["env"]["memory_bandwidth_bytes_per_s"])
        assert result["bandwidth_fraction"] == pytest.approx(expected)


def test_product_paths_name_how_each_linear_runs(monkeypatch):
    from llmcli.backends import bf16_kernel
    from llmcli.backends.linear import prepacking_available

    path = ensure_demo("demo-qwen")
    plain = load_model("demo-qwen", path, device="cpu", dtype="float32").model
    layers = bench.product_paths(plain)["F.linear"]
    compiled = load_model("demo-qwen", path, device="cpu", dtype="float32", compile=True).model  # not compiled yet
    assert bench.product_paths(compiled) == {"F.linear, compiled one-row steps multiply-and-sum": layers}
    bf16 = bench.product_paths(load_model("demo-qwen", path, device="cpu", dtype="bfloat16").model)
    if bf16_kernel.available()[0]:
        assert bf16 == {bf16_kernel.label(): layers}  # the tied head too
    monkeypatch.setenv("LLMCLI_BF16_KERNEL", "0")
    bf16 = bench.product_paths(load_model("demo-qwen", path, device="cpu", dtype="bfloat16").model)
    if prepacking_available():
        assert bf16 == {"oneDNN prepacked": layers - 1, "F.linear": 1}  # a tied head stays plain for oneDNN


def test_table_on_stdout_and_batch(run_cli):
    code, out, err = run_cli("bench", "demo-qwen", "-p", "6", "-n", "3", "--batch", "1,2", "-r", "1", "-w", "0")
    assert code == 0, err
    assert "prefill tok/s" in out and "decode tok/s" in out and "pp6+tg3" in out and "×2" in out
    assert "threads" in out and "memory bandwidth" in out and "products: F.linear" in out  # the environment line
    assert ("| 2 MiB pages" if machine.huge_pages()[0] else "| 4 KiB pages") in out  # what the weights are read through
    assert "random weights" in err  # demo notice
    assert "peak mem is the process's" not in out  # one backend: the peak is llmcli's


def test_json_to_stdout_is_pure_json_and_csv(run_cli, tmp_path):
    csv_file = tmp_path / "out.csv"
    code, out, err = run_cli("bench", "demo-qwen", "-p", "4", "-n", "3", "-b", "2", "-r", "1", "-w", "0",
                             "--json", "-", "--csv", csv_file)
    assert code == 0, err
    data = json.loads(out)  # the table went to stderr
    assert "decode tok/s" in err
    (result,) = data["results"]
    assert result["batch"] == 2
    assert_consistent(result)
    rows = list(csv.DictReader(io.StringIO(csv_file.read_text())))
    assert len(rows) == 1 and rows[0]["backend"] == "llmcli" and rows[0]["batch"] == "2"
    assert float(rows[0]["decode_tokens_per_s_mean"]) == pytest.approx(result["decode_tokens_per_s"]["mean"])


def test_parameters_are_the_models_whatever_the_storage(run_cli, monkeypatch):
    """Stored elements are not parameters once quantised: int4 packs two a byte, a tied head quantised is a second
    copy of the embedding (demo-qwen ties it); the count stays the model's."""
    monkeypatch.setenv("LLMCLI_INT8_KERNEL", "0")  # torch's paths: no kernel build inside this test
    counts = {}
    for quantize in ("none", "int8"):
        code, out, err = run_cli("bench", "demo-qwen", "-p", "4", "-n", "2", "-r", "1", "-w", "0", "--device", "cpu",
                                 "--quantize", quantize, "--json", "-")
        assert code == 0, err
        counts[quantize] = json.loads(out)["parameters"]
    assert counts["int8"] == counts["none"] > 0


def test_threads_option_applies_and_is_restored(run_cli):
    before = torch.get_num_threads()
    code, out, err = run_cli("bench", "demo-qwen", "-p", "4", "-n", "2", "-r", "1", "-w", "0", "-t", "1",
                             "--json", "-")
    assert code == 0, err
    assert json.loads(out)["env"]["threads"] == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("args, message", [
    (("-p", "0"), "-p takes positive integers"),
    (("-p", "12,x"), "-p takes positive integers"),
    (("-n", "-3"), "-n takes positive integers"),
    (("--batch", "0"), "--batch takes positive integers"),
    (("-p", "4000", "-n", "200"), "exceed the context"),
    (("--json", "-", "--csv", "-"), "cannot both write to stdout"),
    (("--compare", "llama.cpp"), "llama.cpp"),
])
def test_bad_options_are_one_line_errors(run_cli, args, message):
    code, out, err = run_cli("bench", "demo-qwen", *args)
    assert code == 2
    *notes, last = err.strip().splitlines()  # the demo notice may come first
    assert last.startswith("error: ") and message in last
    assert all(line.startswith("note: ") for line in notes)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_exits_2(run_cli):
    code, _, err = run_cli("bench", "demo-qwen", "--device", "cuda")
    assert code == 2 and err.strip().splitlines()[-1] == "error: --device cuda: CUDA is not available on this machine"


def test_compare_without_transformers_is_clear(run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    code, _, err = run_cli("bench", "demo-qwen", "-p", "4", "-n", "2", "-r", "1", "--compare", "transformers")
    assert code == 1
    assert "needs the transformers package" in err and len(err.strip().splitlines()) == 2  # demo notice + error


# -- --compare transformers ----------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False)
    return save_hf_model(transformers.Qwen2ForCausalLM(config).eval(), tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="module")
def tiny_deepseek(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        n_group=4, topk_group=2, first_k_dense_replace=1, max_position_embeddings=256, bos_token_id=None,
        eos_token_id=None)
    return save_hf_model(transformers.DeepseekV3ForCausalLM(config).eval(), tmp_path_factory.mktemp("deepseek"))


def check_compared(data: dict, workloads: int) -> None:
    results = data["results"]
    assert [r["backend"] for r in results] == ["llmcli", "transformers"] * workloads  # rows interleaved
    assert data["env"]["transformers"] == transformers.__version__
    for mine, theirs in zip(results[::2], results[1::2], strict=True):
        for key in ("prompt_tokens", "gen_tokens", "batch", "decode_steps"):
            assert mine[key] == theirs[key]
        assert [r["generated_tokens"] for r in mine["runs"]] == [r["generated_tokens"] for r in theirs["runs"]]
        assert mine["weights_bytes"] == theirs["weights_bytes"]  # the same weights on both sides
        for result in (mine, theirs):
            assert_consistent(result)
        ratio = mine["ratio_vs_transformers"]
        assert ratio["decode"] == pytest.approx(mine["decode_tokens_per_s"]["mean"]
                                                / theirs["decode_tokens_per_s"]["mean"])
        assert ratio["prefill"] == pytest.approx(mine["prefill_tokens_per_s"]["mean"]
                                                 / theirs["prefill_tokens_per_s"]["mean"])


def test_compare_transformers_qwen2(run_cli, tmp_path, tiny_qwen2):
    data = bench_json(run_cli, tmp_path, tiny_qwen2, "-p", "5,9", "-n", "4", "-r", "2", "-w", "0",
                      "--compare", "transformers")
    check_compared(data, workloads=2)


def test_compared_peak_memory_says_it_is_the_process(run_cli, tiny_qwen2):
    code, out, err = run_cli("bench", str(tiny_qwen2), "-p", "4", "-n", "2", "-r", "1", "-w", "0",
                             "--compare", "transformers")
    assert code == 0, err
    assert "peak mem is the process's, with both backends' weights loaded" in out


def test_backends_decode_identical_tokens(tiny_qwen2):
    """Same ids in, same greedy ids out (float32): the two backends really run the same workload."""
    loaded = load_model("tiny", tiny_qwen2, device="cpu", dtype="float32")
    mine = bench.LlmcliBackend(loaded.model, loaded.device)
    theirs = bench.TransformersBackend(tiny_qwen2, loaded.device, loaded.dtype, "qwen2")
    settings = bench.BenchSettings([bench.Workload(7, 6, batch=2)], repeat=1, warmup=0)
    rows = bench.run_bench(mine, settings, bandwidth=1e10, reference=theirs)
    assert rows[0].runs[0].token_ids == rows[1].runs[0].token_ids
    assert len(rows[0].runs[0].token_ids) == 2 and len(rows[0].runs[0].token_ids[0]) == 6


@pytest.mark.skipif(not HAS_DEEPSEEK, reason="llmcli.models.deepseek is not built yet")
def test_compare_transformers_deepseek(run_cli, tmp_path, tiny_deepseek):
    data = bench_json(run_cli, tmp_path, tiny_deepseek, "-p", "6", "-n", "4", "-r", "1", "-w", "1",
                      "--compare", "transformers")
    check_compared(data, workloads=1)
    assert data["results"][0]["active_experts_per_moe_layer"] == 2


@pytest.mark.skipif(not HAS_DEEPSEEK, reason="llmcli.models.deepseek is not built yet")
def test_moe_batch_counts_distinct_experts(tiny_deepseek):
    loaded = load_model("tiny", tiny_deepseek, device="cpu", dtype="float32")
    settings = bench.BenchSettings([bench.Workload(5, 4, batch=3)], repeat=1, warmup=1)
    (row,) = bench.run_bench(bench.LlmcliBackend(loaded.model, loaded.device), settings, bandwidth=1e10)
    assert 2 <= row.active_experts <= 6  # top-2 of 8 for each of 3 sequences, counted while decoding
    assert row.decode_bytes_per_step == bench.decode_weight_bytes(loaded.model, 3, row.active_experts)


# -- accounting against formulas ---------------------------------------------------------------


def qwen_config(tied: bool) -> ModelConfig:
    return config_from_dict({
        "model_type": "qwen2", "vocab_size": 1000, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": tied,
    })


@pytest.mark.parametrize("tied", [True, False])
def test_decode_bytes_dense(tied):
    from llmcli.models.qwen import QwenForCausalLM

    model = QwenForCausalLM(qwen_config(tied)).to(torch.bfloat16)
    h, v, i, kv = 32, 1000, 48, 2 * 8
    # per layer: q (h*h + h), k and v (h*kv + kv each), o (h*h), mlp 3*h*i, two norms
    layer = h * h + h + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    head = v * h
    read = 2 * (2 * layer + h + head + (0 if tied else 3 * h))  # untied: 3 embedding rows, not the table
    assert bench.decode_weight_bytes(model, batch=3) == read
    total, count = bench.parameter_bytes(model)
    assert total == 2 * count == 2 * (2 * layer + h + head * (1 if tied else 2))


def test_decode_bytes_int8_with_a_tied_head():
    """int8 gives the tied head its own int8 copy: the bf16 embedding table is then only indexed."""
    from llmcli.backends.int8 import Int8Linear
    from llmcli.backends.prepare import swap_linears
    from llmcli.models.qwen import QwenForCausalLM

    model = QwenForCausalLM(qwen_config(True)).to(torch.bfloat16)
    with torch.no_grad():
        swap_linears(model, lambda name, linear: Int8Linear(linear))
    h, v = 32, 1000
    int8_bytes = sum(m.weight.numel() + 2 * m.scales.numel() + (0 if m.bias is None else 2 * m.bias.numel())
                     for m in model.modules() if isinstance(m, Int8Linear))
    norms = 2 * (2 * 2 * h + h)  # two per layer and the final one, bf16
    assert bench.decode_weight_bytes(model, batch=1) == int8_bytes + norms + 2 * h  # one embedding row
    assert bench.parameter_bytes(model)[0] == int8_bytes + norms + 2 * v * h  # the table is still held


def test_weight_bytes_match_the_checkpoint_in_bfloat16(run_cli, tmp_path):
    """On CPU, bfloat16 linears are prepacked into opaque oneDNN tensors; they still count, once."""
    from safetensors import safe_open

    from llmcli.demo import ensure_demo

    path = ensure_demo("demo-qwen")
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        numel = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    loaded = load_model("demo-qwen", path, device="cpu", dtype="bfloat16")
    assert bench.parameter_bytes(loaded.model) == (2 * numel, numel)  # tied head: saved once, counted once
    data = bench_json(run_cli, tmp_path, "demo-qwen", "--dtype", "bfloat16", "-p", "4", "-n", "3", "-r", "1")
    assert data["weights_bytes"] == 2 * numel and data["dtype"] == "bfloat16"
    assert_consistent(data["results"][0])


class FakeMoELayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(8, 4, bias=False) for _ in range(6))


class FakeMoE(nn.Module):
    """Parameters named like a DeepSeek checkpoint: layer 0 dense, layers 1-2 with 6 routed experts."""

    def __init__(self):
        super().__init__()
        self.config = ModelConfig(family="deepseek_v3", vocab_size=50, hidden_size=8, intermediate_size=16,
                                  num_layers=3, num_heads=1, num_kv_heads=1, head_dim=8, n_routed_experts=6,
                                  num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=4,
                                  first_k_dense_replace=1, tie_word_embeddings=False)
        self.embed_tokens = nn.Embedding(50, 8)
        self.dense = nn.Linear(8, 16, bias=False)
        self.layers = nn.ModuleList(FakeMoELayer() for _ in range(2))  # "layers.0.experts.3.weight"
        self.shared = nn.Linear(8, 4, bias=False)
        self.lm_head = nn.Linear(8, 50, bias=False)


def test_decode_bytes_moe_counts_active_experts_only():
    model = FakeMoE()
    expert = 8 * 4 * 4
    fixed = 8 * 16 * 4 + 8 * 4 * 4 + 50 * 8 * 4  # dense + shared + lm_head, float32
    assert bench.decode_weight_bytes(model, batch=1) == fixed + 8 * 4 + 2 * 2 * expert  # one row, top-2 x 2 layers
    assert bench.decode_weight_bytes(model, batch=2) == fixed + 2 * 8 * 4 + 2 * 4 * expert  # bound: 4 distinct
    assert bench.decode_weight_bytes(model, batch=8) == fixed + 8 * 8 * 4 + 2 * 6 * expert  # at most all 6
    assert bench.decode_weight_bytes(model, batch=8, active_experts=3.5) == fixed + 8 * 8 * 4 + 2 * 3.5 * expert


# -- statistics, memory, bandwidth ---------------------------------------------------------------


def test_stat_is_mean_and_sample_std():
    values = [3.0, 5.0, 10.0]
    stat = bench.Stat.of(values)
    assert stat.mean == pytest.approx(6.0) and stat.std == pytest.approx(statistics.stdev(values))
    assert bench.Stat.of([4.0]).std == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-run RSS peak needs /proc")
def test_peak_memory_is_per_run():
    memory = machine.PeakMemory(torch.device("cpu"))
    big = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB resident before the run...
    del big  # ...and released: a lifetime peak would still count it
    memory.start()
    peak, added = memory.stop()
    assert memory.method == "rss_hwm"
    assert added is not None and added < 32 << 20
    memory.start()
    block = torch.ones(48 << 20, dtype=torch.uint8)
    peak2, added2 = memory.stop()
    assert added2 >= 47 << 20 and peak2 >= peak + (47 << 20)
    del block


def test_bandwidth_is_measured_once_per_machine(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(machine, "measure_bandwidth", lambda device: calls.append(device) or 12.5e9)
    monkeypatch.setattr(machine, "load_average", lambda: 0.0)
    cache = tmp_path / "bw.json"
    assert machine.machine_bandwidth(torch.device("cpu"), cache) == (12.5e9, "measured")
    assert machine.machine_bandwidth(torch.device("cpu"), cache) == (12.5e9, "cached")
    assert len(calls) == 1
    assert machine.machine_bandwidth(torch.device("cpu"), cache, remeasure=True) == (12.5e9, "measured")
    assert len(calls) == 2


def test_a_figure_from_a_busy_machine_is_measured_again_when_idle(tmp_path, monkeypatch):
    figures, load = iter([5e9, 20e9]), [64.0]
    monkeypatch.setattr(machine, "measure_bandwidth", lambda device: next(figures))
    monkeypatch.setattr(machine, "load_average", lambda: load[0])
    cache = tmp_path / "bw.json"
    assert machine.machine_bandwidth(torch.device("cpu"), cache) == (5e9, "measured")
    assert machine.machine_bandwidth(torch.device("cpu"), cache) == (5e9, "cached")  # still busy: keep it
    load[0] = 0.0
    value, source = machine.machine_bandwidth(torch.device("cpu"), cache)
    assert value == 20e9 and source.startswith("re-measured")
    assert machine.machine_bandwidth(torch.device("cpu"), cache) == (20e9, "cached")
    assert machine.bandwidth_entry(torch.device("cpu"), cache)["load_average_1m"] == 0.0


def test_bench_measures_again_when_a_run_reads_faster_than_the_cached_figure(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCLI_HOME", str(tmp_path))
    key = machine._machine_key(torch.device("cpu"))
    (tmp_path / "bandwidth.json").write_text(json.dumps({key: {"bytes_per_s": 1000.0, "load_average_1m": 0.0}}))
    monkeypatch.setattr(machine, "load_average", lambda: 0.0)
    out = tmp_path / "bench.json"
    code, _, err = run_cli("bench", "demo-qwen", "-p", "4", "-n", "3", "-r", "1", "-w", "0", "--json", out)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["env"]["memory_bandwidth_source"].startswith("re-measured")
    assert report["env"]["memory_bandwidth_bytes_per_s"] > 1e8
    assert all(row["bandwidth_fraction"] is None or row["bandwidth_fraction"] < 10 for row in report["results"])


def test_measured_bandwidth_is_plausible():
    # A 32 MiB copy is 64 MiB of traffic: any machine that runs torch moves it faster than 100 MB/s.
    assert machine.measure_bandwidth(torch.device("cpu")) > 1e8


def test_prompt_ids_are_seeded_and_in_range():
    w = bench.Workload(12, 3, batch=2)
    a, b = bench.prompt_ids(w, 50, seed=1), bench.prompt_ids(w, 50, seed=1)
    assert torch.equal(a, b) and a.shape == (2, 12) and int(a.max()) < 50
    assert not torch.equal(a, bench.prompt_ids(w, 50, seed=2))


def test_original_qwen_cannot_be_compared():
    with pytest.raises(LlmcliError, match="trust_remote_code"):
        bench.TransformersBackend(".", torch.device("cpu"), torch.float32, "qwen")
