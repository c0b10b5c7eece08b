"""Original Qwen's `qwen.tiktoken` vocabulary as a `tokenizers` byte-level BPE.

qwen.tiktoken holds one `base64(token bytes) rank` line per token; the rank is the token id and
also the merge priority. tiktoken's rank-BPE repeatedly joins the adjacent pair whose concatenation
has the lowest rank. The same result comes from a Hugging Face BPE whose merges are every split
(left, right) of every token into two tokens, ordered by the rank of the whole token, with
`ignore_merges` (a pre-token that is itself a token is taken whole, as tiktoken does).
Text is NFC-normalised (as QWenTokenizer does) and split with Qwen's regex; the 208 special tokens
follow the BPE tokens.

Converting takes a few seconds, so the result is stored as tokenizer.json in llmcli's cache,
keyed by the file's SHA-256; later loads read that file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import tempfile
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from llmcli.errors import LlmcliError
from llmcli.templates import CHATML_TEMPLATE

FILE_NAME = "qwen.tiktoken"
CONVERTER_VERSION = 1  # bump when the produced tokenizer.json changes
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
# Original Qwen repositories ship no tokenizer_config.json: llmcli supplies one. Its eos token, ChatML template,
# and "stop_tokens" (llmcli's own key, read by Tokenizer.stop_token_ids): the tokens besides eos at which its
# chat code stopped generating, as a chat turn ends there.
TOKENIZER_DEFAULTS = {
    "eos_token": "<|endoftext|>",
    "chat_template": CHATML_TEMPLATE,
    "stop_tokens": ["<|im_end|>", "<|im_start|>"],
}


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what ByteLevel pre-tokenizers emit):
    printable Latin-1 bytes stand for themselves, the rest are shifted to U+0100 onwards."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise LlmcliError(f"{path} not found (original Qwen models need their qwen.tiktoken vocabulary)") from None
    except OSError as exc:
        raise LlmcliError(f"cannot read {path}: {exc.strerror or exc}") from None


def parse_ranks(data: bytes, path: Path) -> dict[bytes, int]:
    """Parse qwen.tiktoken's bytes; any malformed line, duplicate or gap in the ranks is an error."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError
            token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        except (ValueError, binascii.Error):
            raise LlmcliError(f"{path} line {number} is not 'base64-token rank': malformed vocabulary") from None
        if not token:
            raise LlmcliError(f"{path} line {number} holds an empty token")
        if token in ranks:
            raise LlmcliError(f"{path} line {number} repeats a token")
        ranks[token] = rank
    if not ranks:
        raise LlmcliError(f"{path} holds no tokens")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise LlmcliError(f"{path}: ranks are not 0..{len(ranks) - 1} (each once), so they cannot be token ids")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise LlmcliError(f"{path} lacks {len(missing)} single-byte tokens (e.g. byte {missing[0]}); "
                          "it cannot encode every text")
    return ranks


def convert(ranks: dict[bytes, int]) -> tokenizers.Tokenizer:
    """Build the byte-level BPE equivalent to tiktoken's rank-BPE over `ranks`."""
    to_char = byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []  # (rank of the merged token, left rank, right rank, left, right)
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            left_rank, right_rank = ranks.get(left), ranks.get(right)
            if left_rank is not None and right_rank is not None:
                merges.append((rank, left_rank, right_rank, left, right))
    merges.sort()
    bpe = models.BPE(vocab=vocab, merges=[(text(left), text(right)) for *_, left, right in merges],
                     ignore_merges=True)
    tok = tokenizers.Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # Specials get the ids right after the BPE tokens (151,643 onwards in the real vocabulary).
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    for offset, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != len(ranks) + offset:
            raise LlmcliError(f"special token {token} did not get id {len(ranks) + offset}")
    return tok


def cache_path(digest: str) -> Path:
    from llmcli.paths import cache_home

    return cache_home() / "tokenizers" / f"qwen-tiktoken-{digest[:32]}-v{CONVERTER_VERSION}.json"


def _write_atomically(tok: tokenizers.Tokenizer, target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".qwen-tiktoken-", suffix=".json", dir=target.parent)
        os.close(fd)
        try:
            tok.save(tmp, pretty=False)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 is stricter than a cache needs
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass  # a read-only cache only costs the conversion next time


def load_qwen_tiktoken(model_dir: Path) -> tokenizers.Tokenizer:
    """The tokenizer for a directory holding qwen.tiktoken, converted once and then read from the cache."""
    path = Path(model_dir) / FILE_NAME
    data = read_file(path)
    cached = cache_path(hashlib.sha256(data).hexdigest())
    if cached.is_file():
        try:
            return tokenizers.Tokenizer.from_file(str(cached))
        except Exception:  # a damaged cache entry: convert again and overwrite it
            pass
    tok = convert(parse_ranks(data, path))
    _write_atomically(tok, cached)
    return tok
