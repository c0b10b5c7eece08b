"""The tokenizer a GGUF file carries (`tokenizer.ggml.*`) -> llmcli's Tokenizer (a `tokenizers` BPE).

llama.cpp's converter stores the vocabulary in id order (token types say which are control tokens,
user-defined added tokens or unused padding), the merges as "a b" strings, and the name of the
pre-tokenizer, which stands for the Hugging Face tokenizer.json's split rules: those are rebuilt here per
name (the same regexes and normaliser tokenizer.json has), so that ids equal the original tokenizer's.
"""

from __future__ import annotations

import json

from llmcli.errors import LlmcliError
from llmcli.formats.gguf import GGUFFile
from llmcli.tokenizer import Tokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
# Qwen3.5's: combining marks (\p{M}) count as letters
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_DEEPSEEK3 = [r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
              "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
              "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"]
_DEEPSEEK_CODER = ["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"]
# deepseek-llm's letter class, as its tokenizer.json spells it (Latin, Greek, Cyrillic, ... letters).
_DEEPSEEK_LLM_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
    "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481"
    "\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf"
    "\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d"
    "\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4"
    "\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
    "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17"
    "\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb"
    "\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943"
)
_DEEPSEEK_LLM = ["[\r\n]", f"\\s?[{_DEEPSEEK_LLM_LETTERS}]+",
                 "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+", "\\s+$",
                 "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"]
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# pre-tokenizer name -> (split regexes, split digits one by one, NFC, ignore_merges)
PRE_TOKENIZERS = {
    "qwen2": ([_QWEN2], False, True, False),
    "deepseek-r1-qwen": ([_QWEN2], False, True, False),
    "llama-bpe": ([_LLAMA3], False, False, True),
    "llama3": ([_LLAMA3], False, False, True),
    "qwen35": ([_QWEN35], False, True, False),
    "deepseek-v3": (_DEEPSEEK3, False, False, False),
    # llama.cpp's converter (0.3.36's) names DeepSeek-V3's own vocabulary so: JoyAI-LLM ships the same tokenizer,
    # its entry comes later in the converter's list of hashes, and the later match wins
    "joyai-llm": (_DEEPSEEK3, False, False, False),
    "deepseek-llm": (_DEEPSEEK_LLM, True, False, False),
    "deepseek-coder": (_DEEPSEEK_CODER, True, False, False),
    "smollm": ([_GPT2], False, False, False),
    "gpt-2": ([_GPT2], False, False, False),
    "default": ([_GPT2], False, False, False),
}


def _field(gg: GGUFFile, key: str, default=None):
    return gg.metadata.get(f"tokenizer.ggml.{key}", default)


def _pre_tokenizer(name: str) -> tuple[dict, dict | None, bool]:
    if name not in PRE_TOKENIZERS:
        raise LlmcliError(f"GGUF pre-tokenizer {name!r} is not supported (supported: {', '.join(PRE_TOKENIZERS)})")
    regexes, digits, nfc, ignore_merges = PRE_TOKENIZERS[name]
    steps = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False} for r in regexes]
    if digits:
        steps.append({"type": "Digits", "individual_digits": True})
    steps.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False})
    return {"type": "Sequence", "pretokenizers": steps}, {"type": "NFC"} if nfc else None, ignore_merges


def check_tokenizer(gg: GGUFFile) -> None:
    """Stop (LlmcliError) on a tokenizer llmcli cannot build, before anything slow: the metadata checks of
    `tokenizer_json`, without building it."""
    model = _field(gg, "model")
    if model != "gpt2":
        raise LlmcliError(f"{gg.path}: GGUF tokenizer model {model!r} is not supported (supported: gpt2, the "
                          "byte-level BPE of Qwen, DeepSeek and Llama 3)")
    tokens, merges = _field(gg, "tokens"), _field(gg, "merges", [])  # no merges: a vocabulary of bytes
    if not isinstance(tokens, list) or not isinstance(merges, list):
        raise LlmcliError(f"{gg.path}: GGUF metadata has no tokenizer.ggml.tokens list")
    types = _field(gg, "token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise LlmcliError(f"{gg.path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    _pre_tokenizer(str(_field(gg, "pre", "default")))


def tokenizer_json(gg: GGUFFile) -> str:
    """The tokenizer.json that the metadata stands for."""
    check_tokenizer(gg)
    tokens, merges = _field(gg, "tokens"), _field(gg, "merges", [])
    types = _field(gg, "token_type") or [NORMAL] * len(tokens)
    pre, normalizer, ignore_merges = _pre_tokenizer(str(_field(gg, "pre", "default")))
    vocab, added = {}, []
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind in (CONTROL, USER_DEFINED):
            added.append({"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": kind == CONTROL})
        # Added tokens are in the model's vocabulary too (else `tokenizers` gives them new ids); unused
        # padding ids ("[PAD151669]") are never produced and are left out.
        if kind != UNUSED:
            vocab.setdefault(token, i)
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": pre,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                           "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges},
    })


def tokenizer_config(gg: GGUFFile) -> dict:
    """tokenizer_config.json's fields: special tokens, the BOS/EOS flags and the chat template."""
    tokens = _field(gg, "tokens") or []

    def token(key: str) -> str | None:
        index = _field(gg, key)
        return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None

    config = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id")}
    for flag in ("add_bos_token", "add_eos_token"):
        if isinstance(_field(gg, flag), bool):
            config[flag] = _field(gg, flag)
    template = gg.metadata.get("tokenizer.chat_template")
    if isinstance(template, str):
        config["chat_template"] = template
    return config


def gguf_tokenizer(gg: GGUFFile) -> Tokenizer:
    import tokenizers

    text = tokenizer_json(gg)
    try:
        tok = tokenizers.Tokenizer.from_str(text)
    except Exception as exc:  # the Rust side raises plain Exception for any problem
        raise LlmcliError(f"{gg.path}: the GGUF tokenizer cannot be built: {' '.join(str(exc).split())}") from None
    return Tokenizer(tok, tokenizer_config(gg))
