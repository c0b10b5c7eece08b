"""Tokenizer: a thin wrapper over the `tokenizers` library, plus chat templates and streaming detokenisation.

The goal is to give the same token ids and the same rendered prompts as Hugging Face transformers (which the
tests use as an oracle) without depending on transformers at run time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmcli.errors import LlmcliError
from llmcli.template_sandbox import render

if TYPE_CHECKING:
    import tokenizers

_REPLACEMENT = "\ufffd"


def _one_line(text: object) -> str:
    """Error messages must fit on one line (the CLI prints them as such)."""
    return " ".join(str(text).split())


def _token_str(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens either as plain strings or, in older files (e.g.
    # DeepSeek's), as serialised AddedToken dicts {"__type": "AddedToken", "content": ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick_template(template: Any, tools: Any = None) -> str | None:
    # A template may be a list of named templates; like transformers, prefer "tool_use" when tools are given.
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named["tool_use"] if tools and named.get("tool_use") else named.get("default")
    return template if isinstance(template, str) else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlmcliError(f"cannot read {path}: {_one_line(e)}") from None


# --- chat templates ---------------------------------------------------------------------------------------

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _prepare_messages(messages: list[dict]) -> list[dict]:
    """Shallow-copy the messages the way transformers normalises them before rendering."""
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise LlmcliError(f"chat messages must be dicts, got {type(message).__name__}")
        # Keys whose value is None are dropped: templates test `is defined`, and None would render as "None".
        m = {k: v for k, v in message.items() if v is not None}
        # Reasoning arrives under several names; templates read `reasoning_content` (gpt-oss: `thinking`).
        reasoning = next((m[k] for k in _REASONING_FIELDS if k in m), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


# --- tokenizer ----------------------------------------------------------------------------------------------


class Tokenizer:
    def __init__(self, tok: tokenizers.Tokenizer, config: dict | None = None,
                 chat_template: str | list | None = None):
        self._tok = tok
        self.config = dict(config or {})
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        self.bos_token: str | None = _token_str(self.config.get("bos_token"))
        self.eos_token: str | None = _token_str(self.config.get("eos_token"))
        self.bos_token_id: int | None = self.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id: int | None = self.token_to_id(self.eos_token) if self.eos_token else None
        # A str, or a list of named templates (kept whole so tool_use can be picked when tools are passed).
        self._template_source = self.config.get("chat_template") if chat_template is None else chat_template
        self.chat_template: str | None = _pick_template(self._template_source)
        self.chat_encoder: Any = None  # a built-in chat format written in Python (`with_chat_encoder`)

        # Special ids: added tokens flagged special in tokenizer.json or tokenizer_config.json, plus bos/eos.
        self.special_ids: set[int] = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        added = self.config.get("added_tokens_decoder")
        for i, entry in (added if isinstance(added, dict) else {}).items():
            if isinstance(entry, dict) and entry.get("special") and str(i).isdigit():
                self.special_ids.add(int(i))
        self.special_ids |= {i for i in (self.bos_token_id, self.eos_token_id) if i is not None}
        self._post_processor_ids: tuple[list[int], list[int]] | None = None  # learnt on first use

    # construction

    @classmethod
    def from_tokenizers(cls, tok: tokenizers.Tokenizer, config: dict | None = None,
                        chat_template: str | list | None = None) -> Tokenizer:
        return cls(tok, config, chat_template)

    def with_chat_template(self, chat_template: str) -> Tokenizer:
        """The same vocabulary and special tokens with another chat template."""
        return Tokenizer(self._tok, self.config, chat_template)

    def with_chat_encoder(self, encoder: Any, name: str) -> Tokenizer:
        """The same vocabulary with a chat format llmcli implements in Python (for models whose repos ship
        theirs as code, which is never run): `encoder(messages, add_generation_prompt, enable_thinking,
        **extra)` -> text. `chat_template` then holds the format's name."""
        out = Tokenizer(self._tok, self.config, None)
        out.chat_template, out.chat_encoder = name, encoder
        return out

    @classmethod
    def from_dir(cls, path: Path) -> Tokenizer:
        import tokenizers

        path = Path(path)
        tok_file = path / "tokenizer.json"
        if tok_file.is_file():
            try:
                tok = tokenizers.Tokenizer.from_file(str(tok_file))
            except Exception as e:  # the Rust side raises plain Exception for any parse error
                raise LlmcliError(f"{tok_file} is not a valid tokenizer file: {_one_line(e)}") from None
        elif (path / "qwen.tiktoken").is_file():
            # Original (pre-2.0) Qwen checkpoints ship a tiktoken vocabulary instead of tokenizer.json.
            # The converter lives in its own module so the tiktoken dependency stays optional.
            try:
                from llmcli.qwen_tiktoken import load_qwen_tiktoken
            except ImportError:
                raise LlmcliError(
                    f"{path / 'qwen.tiktoken'}: original-Qwen (tiktoken) vocabularies are not supported yet"
                ) from None
            tok = load_qwen_tiktoken(path)
        else:
            raise LlmcliError(f"{tok_file} not found")

        config_file = path / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        if not isinstance(config, dict):
            raise LlmcliError(f"{config_file} is not a JSON object")
        if not tok_file.is_file():  # original Qwen ships neither a chat template nor an eos token: use its ChatML
            from llmcli.qwen_tiktoken import TOKENIZER_DEFAULTS

            config = {**TOKENIZER_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}

        # Newer checkpoints keep the template in its own file, which transformers prefers over the config.
        chat_template = None
        if (path / "chat_template.jinja").is_file():
            try:
                chat_template = (path / "chat_template.jinja").read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise LlmcliError(f"cannot read {path / 'chat_template.jinja'}: {_one_line(e)}") from None
        elif (path / "chat_template.json").is_file():
            data = _read_json(path / "chat_template.json")
            chat_template = data.get("chat_template") if isinstance(data, dict) else None
        return cls(tok, config, chat_template)

    # encoding and decoding

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """The ids of `text`. With add_special_tokens, BOS/EOS follow the files (see `_policy_ids`): each of
        tokenizer_config.json's add_bos_token / add_eos_token, when present, decides whether that token is
        added; when absent, tokenizer.json's post-processor decides, as it does for every other token."""
        if not add_special_tokens:
            return self._tok.encode(text, add_special_tokens=False).ids
        add_bos, add_eos = self._flag("add_bos_token"), self._flag("add_eos_token")
        if add_bos is None and add_eos is None:
            return self._tok.encode(text, add_special_tokens=True).ids
        ids = self._tok.encode(text, add_special_tokens=False).ids
        prefix, suffix = self._policy_ids(add_bos, add_eos)
        bos, eos = self.bos_token_id, self.eos_token_id
        # A flag that says "add" adds its token only where it is not already (e.g. the text starts with BOS).
        if add_bos and prefix[:1] == [bos] and ids[:1] == [bos]:
            prefix = prefix[1:]
        if add_eos and suffix[-1:] == [eos] and ids[-1:] == [eos]:
            suffix = suffix[:-1]
        return [*prefix, *ids, *suffix]

    def encode_prompt(self, text: str) -> list[int]:
        """The ids of a raw (non-chat) prompt: BOS/EOS as the tokenizer files say (chat templates write
        their own)."""
        return self.encode(text, add_special_tokens=True)

    @property
    def adds_bos(self) -> bool:
        """Whether raw prompts get a BOS token by the files' policy (for display)."""
        if self.bos_token_id is None:
            return False
        prefix, _ = self._policy_ids(self._flag("add_bos_token"), self._flag("add_eos_token"))
        return self.bos_token_id in prefix

    def stop_token_ids(self, eos_ids: Iterable[int]) -> list[int]:
        """Where generation stops: `eos_ids` (config.json and generation_config.json's, in their order), the
        tokenizer's eos token, then the extra stop tokens its config declares under "stop_tokens" (llmcli's
        key; e.g. original Qwen's chat turns end at <|im_end|>); deduplicated, first occurrence kept. Stop
        tokens missing from the vocabulary are skipped."""
        ids = [int(i) for i in eos_ids]
        if self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        extra = self.config.get("stop_tokens") or []
        extra = [extra] if isinstance(extra, (str, dict)) else extra if isinstance(extra, list) else []
        for token in extra:
            token = _token_str(token)
            token_id = self.token_to_id(token) if token else None
            if token_id is not None:
                ids.append(token_id)
        return list(dict.fromkeys(ids))

    def _flag(self, key: str) -> bool | None:
        """tokenizer_config.json's add_bos_token / add_eos_token; None when absent (or null)."""
        value = self.config.get(key)
        return None if value is None else bool(value)

    def _post_processor_parts(self) -> tuple[list[int], list[int]]:
        """The ids tokenizer.json's post-processor puts before and after a single sequence. Post-processors
        (TemplateProcessing, Bert/Roberta, ByteLevel, sequences of them) add the same ids whatever the
        text, so one probe learns them."""
        if self._post_processor_ids is None:
            prefix: list[int] = []
            suffix: list[int] = []
            if self._tok.post_processor is not None:
                probe = "a b"
                core = self._tok.encode(probe, add_special_tokens=False).ids
                full = self._tok.encode(probe, add_special_tokens=True).ids
                prefix = full  # if the probe's own ids cannot be found, all that is added counts as prefix
                for start in range(len(full) - len(core) + 1) if core else ():
                    if full[start:start + len(core)] == core:
                        prefix, suffix = full[:start], full[start + len(core):]
                        break
            self._post_processor_ids = (prefix, suffix)
        return self._post_processor_ids

    def _policy_ids(self, add_bos: bool | None, add_eos: bool | None) -> tuple[list[int], list[int]]:
        """The ids a raw prompt gets before and after its text: the post-processor's, with BOS (EOS) removed
        or put first (last) where add_bos_token (add_eos_token) is present. (transformers 4.x's LlamaTokenizerFast
        rebuilt its post-processor from these flags; 5.x ignores them for ByteLevel files, e.g. DeepSeek V3/R1's,
        whose flag says true while their post-processor adds nothing.)"""
        prefix, suffix = (list(part) for part in self._post_processor_parts())
        bos, eos = self.bos_token_id, self.eos_token_id
        if add_bos is not None:
            prefix = [i for i in prefix if i != bos]
            if add_bos and bos is not None:
                prefix.insert(0, bos)
        if add_eos is not None:
            suffix = [i for i in suffix if i != eos]
            if add_eos and eos is not None:
                suffix.append(eos)
        return prefix, suffix

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = list(ids)
        if skip_special_tokens:
            # Filter here too: the library skips only tokens it flags special, not tokenizer_config.json's.
            ids = [i for i in ids if i not in self.special_ids]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self._tok.id_to_token(id)

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """The text of each token decoded alone (part of a multi-byte character shows as U+FFFD)."""
        return [self._tok.decode([i], skip_special_tokens=False) for i in ids]

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    # chat

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            enable_thinking: bool | None = None, **extra: Any) -> str:
        if self.chat_encoder is not None:
            return self.chat_encoder(_prepare_messages(messages), add_generation_prompt=add_generation_prompt,
                                     enable_thinking=enable_thinking, **extra)
        source = _pick_template(self._template_source, extra.get("tools"))
        if not source:
            raise LlmcliError("this tokenizer has no chat template; use a raw prompt instead")

        # Variables as transformers passes them: the special-token strings, tools/documents defaulting to None
        # (templates test `tools is not none`), then caller extras, which override everything before them.
        context: dict[str, Any] = {
            k: _token_str(self.config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
            if _token_str(self.config.get(k)) is not None
        }
        context.update(tools=None, documents=None)
        if enable_thinking is not None:  # templates test `enable_thinking is defined`: only set if asked
            context["enable_thinking"] = enable_thinking
        context.update(extra)
        context.update(messages=_prepare_messages(messages), add_generation_prompt=add_generation_prompt)
        return render(source, context)


class StreamDecoder:
    """UTF-8-safe incremental detokenisation.

    Decoding one token at a time is wrong in two ways: a byte-level token may hold only part of a UTF-8
    character (decoding it alone gives U+FFFD), and some decoders treat the first token of a sequence
    specially (metaspace drops its leading space), so decode(suffix) is not a suffix of decode(all). As in
    text-generation-inference we therefore decode a small window ids[prefix:] and emit what it adds beyond
    ids[prefix:read], holding text back while it still ends in U+FFFD (an incomplete character).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window (already emitted)
        self._read = 0  # end of what has been emitted
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            delta = new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self._ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """Emit whatever is held back, e.g. an incomplete character (as U+FFFD) at the end of generation."""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        delta = new_text[len(prefix_text):] if new_text.startswith(prefix_text) else ""
        self._prefix = self._read = len(self._ids)
        self.text += delta
        return delta
