"""CUDA: parity with transformers on the GPU, the compiled decode step (CUDA graphs) against eager, int8,
and the CLI with `--device cuda`. Skipped on machines without CUDA (CI has none); run on a GPU machine
with `python -m pytest tests/test_cuda.py` (benchmarks/cuda_suite.sh does, with the CUDA benchmarks)."""

from __future__ import annotations

import json

import pytest
import torch

from llmcli.demo import ensure_demo
from llmcli.loader import load_model

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")


def greedy(model, prompt: torch.Tensor, steps: int, compiled: bool) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Prefill `prompt` [B, T] then `steps` greedy steps, with the compiled step switched on or off; every
    step's logits are kept (CUDA graphs overwrite their output buffers: what is returned must not be those)."""
    step_fn = model.compiled
    model.compiled = step_fn if compiled else None
    try:
        cache = model.make_cache(prompt.shape[0], prompt.shape[1] + steps)
        tokens, kept = [], []
        with torch.inference_mode():
            logits = model(prompt.to(CUDA), cache, last_only=True)
            for _ in range(steps):
                token = logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(token[:, 0].tolist())
                logits = model(token, cache)
                kept.append(logits)
        return tokens, [t.float().cpu() for t in kept]
    finally:
        model.compiled = step_fn


def worst_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def random_prompt(vocab: int, batch: int = 1, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["demo-qwen", "demo-deepseek"])
def test_compiled_cuda_graphs_equal_eager_float32(name):
    loaded = load_model(name, ensure_demo(name), device="cuda", dtype="float32", compile=True)
    prompt = random_prompt(loaded.config.vocab_size)
    eager_tokens, eager_logits = greedy(loaded.runner, prompt, 16, compiled=False)
    tokens, logits = greedy(loaded.runner, prompt, 16, compiled=True)
    assert loaded.runner.compiled.compile_seconds is not None  # the compiled step did run
    assert tokens == eager_tokens
    assert worst_difference(logits, eager_logits) < 2e-4
    # A second generation (a new cache at new addresses) replays correctly too.
    again, again_logits = greedy(loaded.runner, prompt, 16, compiled=True)
    assert again == eager_tokens and worst_difference(again_logits, eager_logits) < 2e-4


def test_compiled_cuda_batch_of_four_equals_eager():
    loaded = load_model("demo-qwen", ensure_demo("demo-qwen"), device="cuda", dtype="float32", compile=True)
    prompt = random_prompt(loaded.config.vocab_size, batch=4, length=9, seed=1)
    eager_tokens, eager_logits = greedy(loaded.runner, prompt, 6, compiled=False)
    tokens, logits = greedy(loaded.runner, prompt, 6, compiled=True)
    assert tokens == eager_tokens and worst_difference(logits, eager_logits) < 2e-4


@pytest.mark.parametrize("name", ["demo-qwen", "demo-deepseek"])
def test_compiled_bfloat16_logits_close_to_eager(name):
    """bfloat16: the compiled step rounds at other places than eager (fused products), so logits agree to
    bfloat16 precision rather than exactly."""
    loaded = load_model(name, ensure_demo(name), device="cuda", dtype="bfloat16", compile=True)
    prompt = random_prompt(loaded.config.vocab_size, seed=3)
    eager_tokens, eager_logits = greedy(loaded.runner, prompt, 8, compiled=False)
    # Teacher-forced on the eager tokens, so one flipped near-tie cannot make the two runs diverge.
    cache = loaded.model.make_cache(1, prompt.shape[1] + 8)
    with torch.inference_mode():
        loaded.runner(prompt.to(CUDA), cache, last_only=True)
        compiled = [loaded.runner(torch.tensor([t], device=CUDA), cache).float().cpu() for t in eager_tokens]
    scale = max(t.abs().max().item() for t in eager_logits)
    assert worst_difference(compiled, eager_logits) < 0.03 * scale


@pytest.mark.parametrize("name", ["demo-qwen", "demo-deepseek"])
def test_int8_compiled_equals_eager_and_stays_close_to_float32(name):
    int8 = load_model(name, ensure_demo(name), device="cuda", dtype="float32", quantize="int8", compile=True)
    prompt = random_prompt(int8.config.vocab_size, seed=2)
    eager_tokens, eager_logits = greedy(int8.model, prompt, 8, compiled=False)
    tokens, logits = greedy(int8.model, prompt, 8, compiled=True)
    assert tokens == eager_tokens and worst_difference(logits, eager_logits) < 1e-3
    # Against the float32 weights, on the same prompt (decoded tokens may differ: random models have ties).
    full = load_model(name, ensure_demo(name), device="cuda", dtype="float32")
    with torch.inference_mode():
        quantised, reference = (m.model(prompt.to(CUDA), m.model.make_cache(1, 16), last_only=True).float().cpu()
                                for m in (int8, full))
    assert (quantised - reference).abs().max().item() < 0.05 * reference.abs().max().item()


def qwen_case(tmp_path):
    from tests import test_qwen_parity as parity

    kind, overrides = parity.CASES["qwen2-sliding"]
    return parity, parity.build_reference(kind, overrides, tmp_path)


def deepseek_case(tmp_path):
    from tests import test_deepseek as parity

    kind, overrides = parity.CASES["v3"]
    return parity, parity.build_reference(kind, overrides, tmp_path)


@pytest.mark.parametrize("case", [qwen_case, deepseek_case], ids=["qwen2-sliding", "deepseek-v3"])
def test_logits_match_transformers_on_cuda(case, tmp_path):
    """The oracle on the GPU too: transformers and llmcli both on CUDA in float32, prefill and compiled steps."""
    parity, reference = case(tmp_path)
    reference = reference.to(CUDA)
    loaded = load_model("parity", tmp_path, device="cuda", dtype="float32", compile=True)
    prompt = torch.tensor([parity.prompt_ids(tmp_path)])
    tokens, logits = greedy(loaded.runner, prompt, 6, compiled=True)
    sequence = torch.cat([prompt, torch.tensor([[t[0] for t in tokens]])], dim=1).to(CUDA)
    with torch.inference_mode():
        expected = reference(sequence).logits[0].float().cpu()
        cache = loaded.model.make_cache(1, sequence.shape[1])
        prefill = loaded.runner(sequence, cache)[0].float().cpu()
    assert expected.abs().max() > 0.5
    assert (prefill - expected).abs().max().item() < 2e-4
    ours = torch.cat([step[0, -1:] for step in logits])
    assert (ours - expected[prompt.shape[1]:]).abs().max().item() < 2e-4


def test_generate_on_cuda_with_compile_gives_the_same_tokens(run_cli):
    args = ("generate", "demo-qwen", "-p", "a b c", "-n", "12", "--raw", "--json", "--device", "cuda")
    code, out, err = run_cli(*args)
    assert code == 0, err
    code, out_compiled, err = run_cli(*args, "--compile")
    assert code == 0, err
    assert json.loads(out_compiled)["token_ids"] == json.loads(out)["token_ids"]


def test_bench_on_cuda_with_compile(run_cli, tmp_path):
    out_json = tmp_path / "bench.json"
    code, out, err = run_cli("bench", "demo-deepseek", "--device", "cuda", "-p", "8", "-n", "6", "-r", "1",
                             "--compile", "--json", str(out_json))
    assert code == 0, err
    report = json.loads(out_json.read_text())
    assert report["device"] == "cuda" and report["env"]["compile"] is True
    assert report["env"]["device_name"] == torch.cuda.get_device_name()
    row = report["results"][0]
    assert row["decode_tokens_per_s"]["mean"] > 0 and row["peak_memory_method"] == "cuda_max_allocated"


def test_grouped_experts_on_cuda_match_the_loop():
    """bfloat16 MoE prompts on CUDA run as grouped products by default; the expert-by-expert loop gives the
    same logits to bfloat16 precision."""
    from llmcli.backends.grouped_experts import GroupedExperts

    grouped = load_model("demo-deepseek", ensure_demo("demo-deepseek"), device="cuda", dtype="bfloat16")
    loop = load_model("demo-deepseek", ensure_demo("demo-deepseek"), device="cuda", dtype="bfloat16",
                      expert_products="loop")
    assert any(isinstance(m, GroupedExperts) for m in grouped.model.modules())
    assert not any(isinstance(m, GroupedExperts) for m in loop.model.modules())
    prompt = random_prompt(grouped.config.vocab_size, batch=2, length=33, seed=4).to(CUDA)
    with torch.inference_mode():
        a = grouped.runner(prompt, grouped.model.make_cache(2, 40)).float()
        b = loop.runner(prompt, loop.model.make_cache(2, 40)).float()
    assert (a - b).abs().max().item() < 0.03 * b.abs().max().item()
