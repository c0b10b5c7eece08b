"""Tensor and expert parallelism: real torchrun launches of 2 gloo ranks on CPU, compared in float32 with the
single-process run of the same checkpoints (logits within 1e-5, identical greedy tokens), and so are `trace`'s
figures; `bench` reports time in collectives and each rank's memory; a rank that fails ends the job; layouts
that do not divide the model are refused before loading; `show --tp` planning."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmcli.config import config_from_dict, load_config
from llmcli.loader import load_model
from llmcli.parallel_plan import Layout, plan
from tests.conftest import save_hf_model
from tests.test_deepseek_v32 import build_reference as build_v32
from tests.test_qwen1 import qwen1_tensors, random_weights, write_qwen1
from tests.test_qwen_moe import CASES as QWEN_MOE
from tests.test_qwen_moe import build_reference as build_qwen_moe

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "parallel_worker.py"
PROMPT_IDS = [5, 77, 300, 12, 190, 41, 41, 250, 3, 99, 160, 7]
STEPS = 6
TIMEOUT = 240  # a launch that has not ended by then hangs


def environment(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(*args: str, timeout: float = TIMEOUT) -> list[subprocess.CompletedProcess]:
    """Two torchrun launches of one process each, meeting over loopback as nodes 0 and 1 of a 2-node job."""
    port = str(free_port())
    launches = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
         str(node), "--master-addr", "127.0.0.1", "--master-port", port, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(), cwd=ROOT) for node in (0, 1)]
    done = []
    for launch in launches:
        try:
            out, err = launch.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in launches:
                other.kill()
            raise
        done.append(subprocess.CompletedProcess(launch.args, launch.returncode, out, err))
    return done


def hf_checkpoint(kind: str, path: Path, **config) -> Path:
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{kind}Config")(**config, attn_implementation="eager")
    model = getattr(transformers, f"{kind}ForCausalLM")(cfg).eval()
    with torch.no_grad():  # biases and a choice bias that are not zeros, sharper logits
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith((".bias", "e_score_correction_bias")):
                tensor.normal_(0, 0.3)
            elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
                tensor.normal_(0, 0.5)
    return save_hf_model(model, path)


DEEPSEEK = dict(vocab_size=384, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2,
                first_k_dense_replace=1, max_position_embeddings=256, bos_token_id=None, eos_token_id=None)
QWEN = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, bos_token_id=None, eos_token_id=None)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parallel")
    return {
        # GQA, 2 kv heads: one per rank; q/k/v biases.
        "qwen2": hf_checkpoint("Qwen2", root / "qwen2", **QWEN, num_key_value_heads=2),
        # 1 kv head replicated on both ranks; q/k norms; a tied head over an odd vocabulary (padded split).
        "qwen3": hf_checkpoint("Qwen3", root / "qwen3", **{**QWEN, "vocab_size": 383}, num_key_value_heads=1,
                               head_dim=16, tie_word_embeddings=True),
        "v3": hf_checkpoint("DeepseekV3", root / "v3", **DEEPSEEK, q_lora_rank=24, n_group=4, topk_group=2,
                            routed_scaling_factor=2.5, norm_topk_prob=True),
        "v2": hf_checkpoint("DeepseekV2", root / "v2", **DEEPSEEK, q_lora_rank=None, topk_method="greedy"),
        # V3.2: MLA with the sparse attention indexer (kept whole on every rank); prompt longer than its top-k.
        "v32": build_v32(root / "v32") and root / "v32",
        # Qwen MoE: a shared expert behind a sigmoid gate and a dense layer; Qwen3-MoE: no shared expert.
        "qwen2_moe": build_qwen_moe(*QWEN_MOE["qwen2_moe"], root / "qwen2_moe") and root / "qwen2_moe",
        "qwen3_moe": build_qwen_moe(*QWEN_MOE["qwen3_moe"], root / "qwen3_moe") and root / "qwen3_moe",
        # Original Qwen: fused c_attn (Q|K|V rows, each split by heads); LogN past its 16-token seq_length.
        "qwen1": write_qwen1(root / "qwen1", qwen1_tensors(random_weights())),
    }


# name: (checkpoint, tp, ep)
CASES = {"qwen1-tp2": ("qwen1", 2, 1), "qwen2-tp2": ("qwen2", 2, 1), "qwen3-tp2": ("qwen3", 2, 1),
         "v3-tp2": ("v3", 2, 1), "v3-ep2": ("v3", 1, 2), "v3-tp2-ep2": ("v3", 2, 2), "v2-tp2": ("v2", 2, 1),
         "v32-tp2-ep2": ("v32", 2, 2), "qwen2moe-tp2-ep2": ("qwen2_moe", 2, 2), "qwen3moe-ep2": ("qwen3_moe", 1, 2)}


def single_process(path: Path, ids: list[int], steps: int) -> tuple[torch.Tensor, list[int]]:
    runner = load_model("single", path, device="cpu", dtype="float32", check_memory=False).runner
    cache = runner.make_cache(1, len(ids) + steps + 1)
    with torch.inference_mode():
        logits, tokens = [runner(torch.tensor([ids]), cache)[0]], []
        for _ in range(steps):
            tokens.append(int(logits[-1][-1].argmax()))
            logits.append(runner(torch.tensor([[tokens[-1]]]), cache)[0])
    return torch.cat(logits), tokens


# The CLI under torchrun, each with rank 0's stdin, and the flags a single process leaves out.
FLOAT32 = ["--device", "cpu", "--dtype", "float32"]
CLI = [(["generate", "{v3}", "--raw", "-p", "parallel ranks agree", "-n", "10", "--json", *FLOAT32], "",
        ["--tp", "2", "--ep", "2"]),
       (["generate", "{qwen2}", "--raw", "-n", "8", "--json", *FLOAT32], "a prompt piped in\n", ["--tp", "2"]),
       (["chat", "{qwen2}", "-n", "5", *FLOAT32], "first message\n/stats\nsecond message\n", ["--tp", "2"]),
       # the compiled decode step on each rank (the head's gather is traced into it) against eager, one process
       (["generate", "{qwen2}", "--raw", "-p", "compiled ranks", "-n", "8", "--json", *FLOAT32], "",
        ["--tp", "2", "--compile"])]


# trace and bench in the same launch (named runs): the trace's JSON on rank 0 alone, compared with one process's.
TRACE = ["trace", "-p", "ranks trace the same model", "-g", "2", "--logit-lens", "3", "--attention-stats",
         "--json", "-", *FLOAT32]
TRACED = {"qwen2-tp2": ("qwen2", 2, 1), "v3-tp2-ep2": ("v3", 2, 2), "v32-tp2": ("v32", 2, 1)}  # checkpoint, tp, ep
BENCH = ["bench", "{qwen2}", "-p", "12", "-n", "5", "-r", "2", "-w", "0", "--json", "-", *FLOAT32, "--tp", "2"]


def named_runs(checkpoints) -> list[dict]:
    runs = [{"name": f"trace-{name}", "stdin": "",
             "args": cli_args([TRACE[0], f"{{{ckpt}}}", *TRACE[1:], "--tp", str(tp), "--ep", str(ep)], checkpoints)}
            for name, (ckpt, tp, ep) in TRACED.items()]
    return runs + [{"name": "bench", "args": cli_args(BENCH, checkpoints), "stdin": ""}]


def cli_args(args: list[str], checkpoints) -> list[str]:
    return [arg.format(**{name: str(path) for name, path in checkpoints.items()}) for arg in args]


@pytest.fixture(scope="module")
def launched(checkpoints, tmp_path_factory):
    """Every case (and the CLI's generate) runs on 2 ranks started as a 2-node job: two torchrun launches on
    this machine, rendezvous over loopback (what `--nnodes 2` does across machines)."""
    out = tmp_path_factory.mktemp("parallel-out")
    spec = {"cases": [{"name": name, "path": str(checkpoints[ckpt]), "tp": tp, "ep": ep, "ids": PROMPT_IDS,
                       "steps": STEPS} for name, (ckpt, tp, ep) in CASES.items()],
            "cli": [{"args": cli_args(args + parallel, checkpoints), "stdin": stdin} for args, stdin, parallel in CLI]
            + named_runs(checkpoints)}
    (out / "spec.json").write_text(json.dumps(spec))
    for done in two_nodes(str(WORKER), "cases", str(out / "spec.json"), str(out)):
        assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_ranks_match_single_process(name, checkpoints, launched):
    ckpt, tp, ep = CASES[name]
    expected_logits, expected_tokens = single_process(checkpoints[ckpt], PROMPT_IDS, STEPS)
    logits = load_file(str(launched / f"{name}.safetensors"))["logits"]
    result = json.loads((launched / f"{name}.json").read_text())
    assert logits.shape == expected_logits.shape
    assert expected_logits.abs().max() > 0.5  # large enough for the bound to mean something
    assert (logits - expected_logits).abs().max().item() <= 1e-5
    assert result["tokens"] == expected_tokens
    # Rank 0's weights are exactly what `show --tp` plans (float32, DeepSeek's router in float32 too).
    cfg = load_config(checkpoints[ckpt])
    assert result["weight_bytes"] == plan(cfg, tp, ep, "float32")["weight_bytes_per_rank"]


def test_tokens_are_not_all_one_repetition(launched):
    """Greedy runs that repeat one token would compare little: most cases do not (qwen3's tied head and
    qwen2_moe do; their logits still match at every position)."""
    varied = [name for name in CASES if len(set(json.loads((launched / f"{name}.json").read_text())["tokens"])) > 2]
    assert len(varied) >= len(CASES) - 2


@pytest.mark.parametrize("index", range(len(CLI)))
def test_cli_under_torchrun_prints_once_and_matches(index, checkpoints, launched, run_cli, monkeypatch):
    """generate with -p and with a piped prompt, and a piped chat (cache reused between turns): rank 0 reads
    stdin, every rank decodes the same tokens, only rank 0 prints: the single-process output exactly."""
    args, stdin, _ = CLI[index]
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code, out, err = run_cli(*cli_args(args, checkpoints))
    assert code == 0, err
    ranked = (launched / f"cli-{index}.txt").read_text()
    if "--json" in args:
        assert len(ranked.splitlines()) == 1  # rank 0's JSON only
        assert json.loads(ranked)["token_ids"] == json.loads(out)["token_ids"]
        assert json.loads(ranked)["prompt_tokens"] == json.loads(out)["prompt_tokens"]
    else:
        assert ranked == out and len(out.splitlines()) == 2


def assert_close(ranked, single, where="trace"):
    """Same keys, lists and exact ints/strings (token ids, expert choices); floats as float32 sums in another
    order allow (the JSON keeps 7 digits)."""
    if isinstance(single, dict):
        assert ranked.keys() == single.keys(), where
        for key in single:
            assert_close(ranked[key], single[key], f"{where}.{key}")
    elif isinstance(single, list):
        assert len(ranked) == len(single), where
        for i, (a, b) in enumerate(zip(ranked, single, strict=True)):
            assert_close(a, b, f"{where}[{i}]")
    elif isinstance(single, float):
        assert ranked == pytest.approx(single, rel=1e-4, abs=1e-5), where
    else:
        assert ranked == single, where


@pytest.mark.parametrize("name", sorted(TRACED))
def test_trace_under_torchrun_equals_single_process(name, checkpoints, launched, run_cli):
    """Every figure of the trace (RMS and max |x| per point, router choices and weights, shared/routed RMS,
    attention facts, per-head attention statistics, the logit lens, sparse attention's picks) is rank 0's
    gathered whole: what one process reports."""
    ckpt, tp, ep = TRACED[name]
    code, out, err = run_cli(*cli_args([TRACE[0], f"{{{ckpt}}}", *TRACE[1:]], checkpoints))
    assert code == 0, err
    single, lines = json.loads(out), (launched / f"cli-trace-{name}.txt").read_text().splitlines()
    assert len(lines) == 1  # rank 0's JSON only
    ranked = json.loads(lines[0])
    assert ranked["settings"].pop("ranks") == {"tp": tp, "ep": ep}
    assert_close(ranked, single)
    layers = single["layers"]
    if ckpt != "v32":  # sparse attention layers hand over no probabilities
        assert all(len(layer["attention_stats"]["entropy"]) == 4 for layer in layers)  # every head, in order
    assert layers[0]["attention"]["heads"] == 4  # the whole model's, not a rank's 2
    if ckpt != "qwen2":
        moe = [layer["router"] for layer in layers if layer["router"]]
        assert moe and all(r["shared_rms"] > 0 and r["routed_rms"] > 0 for r in moe)
    if ckpt == "v32":
        assert any(len(kept) < seen for layer in layers[1:]
                   for kept, seen in zip(layer["indexer"]["selected"], layer["indexer"]["visible"], strict=True))


def test_trace_corpus_runs_in_one_process(checkpoints, run_cli, tmp_path):
    (tmp_path / "corpus.txt").write_text("a prompt\n")
    code, out, err = run_cli("trace", str(checkpoints["qwen2"]), "--corpus", str(tmp_path / "corpus.txt"), "--tp", "2")
    assert code == 2 and out == ""
    assert "--corpus traces in one process: leave out --tp/--ep" in err and len(err.strip().splitlines()) == 1


def test_bench_under_torchrun_reports_communication_and_each_rank(launched):
    data = json.loads((launched / "cli-bench.txt").read_text())
    assert data["env"]["ranks"] == {"world": 2, "tp": 2, "ep": 1}
    (row,) = data["results"]
    comm, runs = row["communication"], row["runs"]
    step = sum(r["decode_s"] for r in runs) / len(runs) / row["decode_steps"]
    assert 0 < comm["comm_s_per_decode_step"]["mean"] < step  # all-reduces are part of each step, not all of it
    assert 0 < comm["comm_s_per_prefill"]["mean"] < row["ttft_s"]["mean"]
    assert 0 < comm["comm_fraction_of_decode"] < 1
    assert all(0 < r["decode_comm_s"] < r["decode_s"] and 0 < r["prefill_comm_s"] < r["prefill_s"] for r in runs)
    assert len(comm["peak_memory_bytes_per_rank"]) == 2 and min(comm["peak_memory_bytes_per_rank"]) > 2**20
    assert comm["peak_memory_bytes_per_rank"][0] == row["peak_memory_bytes"]  # the table's is rank 0's
    assert comm["comm_s_per_decode_step_per_rank"][0] == comm["comm_s_per_decode_step"]["mean"]


def test_sharded_weights_are_a_share(checkpoints, launched):
    """Per rank: the split parts halve, the replicated ones stay (qwen2: norms only)."""
    full = plan(load_config(checkpoints["qwen2"]), 1, 1, "float32")["weight_bytes_per_rank"]
    ranked = json.loads((launched / "qwen2-tp2.json").read_text())["weight_bytes"]
    replicated = plan(load_config(checkpoints["qwen2"]), 2, 1, "float32")["replicated_bytes_per_rank"]
    assert ranked - replicated == (full - replicated) // 2


def test_failing_or_silent_rank_ends_the_job(checkpoints):
    """Two jobs at once. In one, rank 1 raises: it exits non-zero, rank 0's collective fails at once and torchrun
    ends the job. In the other, rank 1 hangs: rank 0's all-reduce gives up after LLMCLI_DIST_TIMEOUT seconds."""
    start = time.monotonic()
    jobs = {how: subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
         "fault", str(checkpoints["qwen2"]), how], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=environment(LLMCLI_DIST_TIMEOUT="5"), cwd=ROOT) for how in ("raise", "hang")}
    try:
        ended = {how: (job.communicate(timeout=150)[1], job.returncode) for how, job in jobs.items()}
    finally:
        for job in jobs.values():
            job.kill()
    assert time.monotonic() - start < 150
    assert all(code != 0 for _, code in ended.values())
    assert "error: internal error: RuntimeError: rank 1 fails on purpose" in ended["raise"][0]
    assert "error: rank 0: another rank of this parallel run stopped or did not answer" in ended["hang"][0]


@pytest.mark.parametrize("flags, message", [
    (["--tp", "3"], "--tp 3 --ep 1 does not split this qwen2 model: 4 attention heads over 3 ranks; 2 kv "
                    "heads over 3 ranks (one must divide the other)"),
    (["--tp", "2", "--ep", "2"], "no routed experts to split"),
    (["--tp", "2", "--ep", "3"], "--ep must divide"),
    (["--tp", "2"], "start it with `torchrun --nproc-per-node 2 -m llmcli"),
])
def test_layout_errors_before_loading(flags, message, checkpoints, run_cli):
    code, out, err = run_cli("generate", str(checkpoints["qwen2"]), "-p", "hi", "--device", "cpu", *flags)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


def test_compile_under_ranks_refuses_moe_models_before_loading(checkpoints, run_cli):
    code, out, err = run_cli("generate", str(checkpoints["v3"]), "-p", "hi", "--device", "cpu", "--ep", "2",
                             "--compile")
    assert code == 2 and out == ""
    assert err.strip() == "error: --compile with --tp/--ep runs dense models; leave it out for this MoE model"


def test_a_share_too_large_for_this_machine_is_refused_before_loading(monkeypatch):
    from llmcli import memory
    from llmcli.backends.parallel import check_rank_memory
    from llmcli.errors import LlmcliError

    cfg = config_from_dict(V3_CONFIG)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    needed = 8 * (plan(cfg, 8, 8, "bfloat16")["weight_bytes_per_rank"] + memory.RESERVE_BYTES)  # 1267 GiB
    with pytest.raises(LlmcliError, match=rf"this share of the model needs {memory.gib(needed)} GiB of memory for 8 "):
        check_rank_memory(cfg, Layout(8, 8), torch.bfloat16, torch.device("cpu"))


V3_CONFIG = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
             "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
             "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
             "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256,
             "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "n_group": 8,
             "topk_group": 4, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "max_position_embeddings": 163840}


def test_plan_by_hand():
    """DeepSeek-V3's shape on 8 ranks, --tp 8 --ep 8, bfloat16: each count written out."""
    cfg = config_from_dict(V3_CONFIG)
    h, heads = 7168, 128 // 8
    attention_split = 1536 * heads * 192 + 512 * heads * 256 + heads * 128 * h
    attention_whole = h * 576 + 512 + h * 1536 + 1536 + 2 * h  # latent projections, their norms, 2 layer norms
    dense = 3 * h * 18432 // 8
    moe = 32 * 3 * h * 2048 + 3 * h * 2048 // 8
    router = 256 * h + 256
    split = 2 * 16160 * h + 61 * attention_split + 3 * dense + 58 * moe
    whole = h + 61 * attention_whole
    facts = plan(cfg, 8, 8, "bfloat16", memory=141 * 10**9)
    assert facts["weight_bytes_per_rank"] == 2 * (split + whole) + 4 * 58 * router
    assert facts["cache_bytes_per_token_per_rank"] == 61 * 576 * 2
    assert facts["fits"] is False  # 170 GB a rank in bfloat16: 8 x H200 do not hold it; 16 do
    assert plan(cfg, 16, 16, "bfloat16", memory=141 * 10**9)["fits"] is True
    ep_only = plan(cfg, 1, 8, "bfloat16")
    assert ep_only["replicated_bytes_per_rank"] == 2 * (2 * 129280 * h + whole + 61 * attention_split * 8
                                                        + 3 * 3 * h * 18432) + 4 * 58 * router
    assert Layout(8, 8, rank=3).experts(256) == range(96, 128)


def test_show_plans_per_rank(checkpoints, run_cli):
    path = checkpoints["v3"]
    code, out, err = run_cli("show", str(path), "--tp", "2", "--ep", "2", "--memory", "1MB", "--json")
    assert code == 0, err
    facts = json.loads(out)["parallel"]
    expected = plan(load_config(path), 2, 2, "float32", memory=10**6)
    assert facts == expected and facts["fits"] is True
    assert facts["cache_tokens_that_fit"] == (10**6 - facts["weight_bytes_per_rank"]) // (2 * (32 + 8) * 4)
    code, out, err = run_cli("show", str(path), "--tp", "2", "--memory", "200KB")
    assert code == 0, err
    assert "does NOT fit in 195.3 KiB a rank" in " ".join(out.split())
    code, out, err = run_cli("show", str(path), "--tp", "3")
    assert code == 2 and "4 attention heads over 3 ranks" in err


def test_slices_read_and_dequantise_as_the_whole_tensor_would(tmp_path, monkeypatch):
    """Rows, columns (a few rows at a time), several ranges with padding, and FP8 blocks cut mid-block: each
    slice equals the same slice of the whole tensor, dequantised whole."""
    from safetensors.torch import save_file

    from llmcli.backends import sharded_load
    from llmcli.backends.tensor_parallel import Slice
    from llmcli.weights import Checkpoint, dequantize_fp8

    torch.manual_seed(0)
    plain = torch.randn(300, 260)
    fp8 = (torch.randn(300, 260) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 3) + 0.5
    save_file({"plain": plain, "q": fp8, "q_scale_inv": scale}, str(tmp_path / "model.safetensors"))
    whole = {"plain": plain, "q": dequantize_fp8(fp8, scale, (128, 128), torch.float32)}
    monkeypatch.setattr(sharded_load, "BLOCK_BYTES", 7 * 260 * 4)  # 7 rows a block: 43 reads for 300 rows
    cuts = [Slice(0, ((100, 250),), 150), Slice(1, ((70, 200),), 130), Slice(0, ((0, 10), (150, 160)), 24),
            Slice(1, ((255, 260),), 8), Slice(0, (), 3)]
    with Checkpoint(tmp_path) as ckpt:
        for name in ("plain", "q"):
            for cut in cuts:
                got = sharded_load.read_slice(ckpt, name, cut, torch.float32, (128, 128))
                pieces = [whole[name].narrow(cut.dim, a, b - a) for a, b in cut.ranges]
                shape = list(whole[name].shape)
                shape[cut.dim] = cut.length - sum(b - a for a, b in cut.ranges)
                assert torch.equal(got, torch.cat([*pieces, torch.zeros(shape)], dim=cut.dim))
        names = [name for name, _, _ in sharded_load.sharded_tensors(ckpt, lambda n, s: None, torch.float32, None)]
        assert names == ["plain", "q"]  # scales are consumed with their weights
