"""--compile: the compiled decode step gives the eager step's tokens and logits (float32, so the only
difference is the order of float32 sums), compiles once per cache shape, and is what actually runs."""

from __future__ import annotations

import json

import pytest
import torch
import torch._dynamo

from llmcli.backends import int_dot
from llmcli.demo import ensure_demo
from llmcli.loader import load_model
from tests.test_qwen1 import S, prompt_of, qwen1_tensors, random_weights, write_qwen1

pytestmark = pytest.mark.slow  # each test compiles (seconds to tens of seconds on 2 cores)


@pytest.fixture(autouse=True)
def _small_buckets(monkeypatch):
    """The attended part of the cache grows every 4 positions, so every test crosses several sizes
    (and error_on_recompile below proves one compiled step serves them all)."""
    from llmcli.backends.compile import CompiledDecode

    monkeypatch.setattr(CompiledDecode, "BUCKET", 4)


def decode(model, prompt: torch.Tensor, steps: int, compiled: bool) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Prefill `prompt` [B, T], then `steps` greedy steps; the compiled step is switched on or off."""
    step_fn = model.compiled
    model.compiled = step_fn if compiled else None
    try:
        cache = model.make_cache(prompt.shape[0], prompt.shape[1] + steps)
        with torch.inference_mode():
            logits = model(prompt, cache, last_only=True)
            tokens, all_logits = [], []
            for i in range(steps):
                token = logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(token[:, 0].tolist())
                # After the first compiled step, any recompile would mean the step is not shape-stable.
                with torch._dynamo.config.patch(error_on_recompile=compiled and i > 0):
                    logits = model(token, cache)
                all_logits.append(logits.float())
        return tokens, all_logits
    finally:
        model.compiled = step_fn


def assert_same_decoding(model, prompt, steps, atol=1e-4):
    eager_tokens, eager_logits = decode(model, prompt, steps, compiled=False)
    tokens, logits = decode(model, prompt, steps, compiled=True)
    assert model.compiled.compile_seconds is not None  # the compiled step did run
    assert tokens == eager_tokens
    worst = max((a - b).abs().max().item() for a, b in zip(logits, eager_logits, strict=True))
    assert worst < atol, worst


@pytest.mark.parametrize("name", ["demo-qwen", "demo-deepseek"])
def test_compiled_greedy_tokens_and_logits_equal_eager(name):
    loaded = load_model(name, ensure_demo(name), device="cpu", dtype="float32", compile=True)
    prompt = torch.randint(0, loaded.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    assert_same_decoding(loaded.runner, prompt, steps=16)


def parity_cases():
    from tests import test_deepseek, test_qwen_parity

    return [(module, name) for module in (test_qwen_parity, test_deepseek) for name in sorted(module.CASES)]


@pytest.mark.parametrize(("module", "name"), parity_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_compiled_matches_eager_on_every_parity_checkpoint(module, name, tmp_path):
    """The transformers-checked checkpoints (windows, YaRN, qk-norm, tied heads, V2/V3 routing, with
    and without q_lora): compiled decoding equals eager decoding, which equals transformers."""
    kind, overrides = module.CASES[name]
    reference = module.build_reference(kind, overrides, tmp_path)
    loaded = load_model(name, tmp_path, device="cpu", dtype="float32", compile=True)
    prompt = torch.tensor([module.prompt_ids(tmp_path)])
    assert_same_decoding(loaded.runner, prompt, steps=10)
    # And straight against the oracle: transformers on prompt + the compiled run's tokens.
    tokens, logits = decode(loaded.runner, prompt, steps=10, compiled=True)
    sequence = torch.cat([prompt, torch.tensor([[t[0] for t in tokens]])], dim=1)
    with torch.inference_mode():
        expected = reference(sequence).logits[0, prompt.shape[1]:]
    ours = torch.cat([step[0, -1:] for step in logits])
    assert (ours - expected).abs().max().item() < 1e-4


def test_compiled_batch_of_two():
    """Two sequences: per-sequence attention over the shared-position cache."""
    loaded = load_model("demo-qwen", ensure_demo("demo-qwen"), device="cpu", dtype="float32", compile=True)
    prompt = torch.randint(0, loaded.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    assert_same_decoding(loaded.runner, prompt, steps=6)


def test_moe_batches_decode_eagerly():
    """MoE models compile single sequences only (a batch's gathered experts ran far slower compiled)."""
    loaded = load_model("demo-deepseek", ensure_demo("demo-deepseek"), device="cpu", dtype="float32", compile=True)
    model, compiled = loaded.runner, loaded.runner.compiled
    with torch.inference_mode():
        cache = model.make_cache(2, 12)
        model(torch.tensor([[1, 2, 3], [4, 5, 6]]), cache)
        assert not compiled.accepts(torch.tensor([[7], [8]]), cache, None)
        assert compiled.accepts(torch.tensor([[7]]), cache, None)
        model(torch.tensor([[7], [8]]), cache)  # eager, and nothing compiles
    assert compiled.compile_seconds is None


def test_compiled_qwen1_logn_ntk_and_windows_across_seq_length(tmp_path):
    """Original Qwen: a prompt longer than seq_length (NTK alpha > 1, LogN on), decoding further with a
    sliding window on one layer: all of it is read from outside the graph or masked inside it."""
    path = write_qwen1(tmp_path / "qwen1", qwen1_tensors(random_weights()))
    loaded = load_model("tiny-qwen1", path, device="cpu", dtype="float32", compile=True)
    loaded.model.set_attention_options(windows=[None, 5, None])
    prompt = torch.tensor([prompt_of(S + 3)])
    assert_same_decoding(loaded.runner, prompt, steps=8)


@pytest.mark.parametrize("kernel", ["1", "0"])  # llmcli's int8 kernel in the graph, or inductor's own loops
@pytest.mark.parametrize("name", ["demo-qwen", "demo-deepseek"])
def test_compiled_int8_matches_eager_int8(name, kernel, monkeypatch):
    """int8 weights (for DeepSeek: stacked int8 experts with their scales) in the compiled step."""
    monkeypatch.setenv("LLMCLI_INT8_KERNEL", kernel)
    loaded = load_model(name, ensure_demo(name), device="cpu", dtype="float32", quantize="int8", compile=True)
    blocked = {m.blocked for m in loaded.model.modules() if hasattr(m, "blocked")}
    assert blocked == {kernel == "1"}
    prompt = torch.randint(0, loaded.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(2))
    assert_same_decoding(loaded.runner, prompt, steps=8)


@pytest.mark.skipif(not int_dot.runs_fast(), reason="int5 runs on llmcli's AVX2 integer kernel, not built here")
def test_compiled_int5_matches_eager_int5():
    """int5 weights (stacked int5 experts with their scales and mins) in the compiled step: the ops' shapes come
    from their scales in both low-bit layouts."""
    loaded = load_model("demo-deepseek", ensure_demo("demo-deepseek"), device="cpu", dtype="float32",
                        quantize="int5", compile=True)
    assert any(type(m).__name__ == "Int5Linear" for m in loaded.model.modules())
    prompt = torch.randint(0, loaded.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(2))
    assert_same_decoding(loaded.runner, prompt, steps=8)


def test_generate_with_compile_gives_the_same_tokens(run_cli):
    args = ("generate", "demo-deepseek", "-p", "a b c", "-n", "12", "--raw", "--json")
    code, out, _ = run_cli(*args)
    assert code == 0
    code, out_compiled, err = run_cli(*args, "--compile")
    assert code == 0, err
    assert json.loads(out_compiled)["token_ids"] == json.loads(out)["token_ids"]
    assert "compiling the decode step" in err and "decode step compiled in" in err


def test_a_failing_compile_is_one_clear_error(monkeypatch):
    from llmcli.backends.compile import CompiledDecode
    from llmcli.errors import LlmcliError

    loaded = load_model("demo-qwen", ensure_demo("demo-qwen"), device="cpu", dtype="float32", compile=True)

    def broken(*args, **kwargs):
        raise RuntimeError("C++ compile error\nmany lines of compiler output")

    monkeypatch.setattr(loaded.runner.compiled, "step", broken)
    assert isinstance(loaded.runner.compiled, CompiledDecode)
    cache = loaded.model.make_cache(1, 8)
    with torch.inference_mode():
        loaded.runner(torch.tensor([[1, 2, 3]]), cache)
        with pytest.raises(LlmcliError, match=r"^--compile failed \(RuntimeError: C\+\+ compile error\); run without"):
            loaded.runner(torch.tensor([[4]]), cache)


def test_cache_tensors_are_the_storage():
    loaded = load_model("demo-deepseek", ensure_demo("demo-deepseek"), device="cpu", dtype="float32")
    cache = loaded.model.make_cache(1, 8)
    assert [t.data_ptr() for t in cache.tensors()] == [layer.kv.data_ptr() for layer in cache.layers]


def test_bench_with_compile_says_so(run_cli, tmp_path):
    out_json = tmp_path / "bench.json"
    code, out, err = run_cli("bench", "demo-qwen", "-p", "8", "-n", "4", "-r", "1", "-w", "1", "--compile",
                             "--json", str(out_json))
    assert code == 0, err
    assert "compiled decode" in out
    report = json.loads(out_json.read_text())
    assert report["env"]["compile"] is True
    assert report["results"][0]["decode_tokens_per_s"]["mean"] > 0


def test_generation_stats_leave_out_the_compiling_step():
    from llmcli.generate import Generation

    torch._dynamo.reset()  # else a model of the same structure compiled earlier in this process is reused
    loaded = load_model("demo-qwen", ensure_demo("demo-qwen"), device="cpu", dtype="float32", compile=True)
    gen = Generation(loaded.runner, loaded.tokenizer, [1, 2, 3], max_new_tokens=6, stop_ids=[])
    for _ in gen:
        pass
    assert len(gen.result.token_ids) == 6
    assert gen.result.decode_steps == 4  # 5 steps after the prefill; the first one compiled
    assert 0 < gen.result.decode_seconds < loaded.runner.compiled.compiling_seconds  # it is not in there


@pytest.mark.parametrize("command", [("generate", "-p", "a b c", "--raw"), ("chat",)])
def test_cli_compiles_before_the_prompt_and_never_again(command, run_cli, monkeypatch):
    """The CLI compiles at load (on a tiny cache); the real prompt's steps, whatever the cache size,
    reuse that code: a recompile here would stall the first reply."""
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        code, out, err = run_cli(command[0], "demo-deepseek", *command[1:], "-n", "6", "--compile")
    assert code == 0, err
    assert "decode step compiled in" in err
