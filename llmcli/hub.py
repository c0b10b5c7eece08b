"""Model name -> local directory: local paths, built-in demos, aliases, the Hugging Face cache."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llmcli.errors import LlmcliError
from llmcli.registry import ALIASES

DEFAULT_MODEL = "demo-qwen"
# What llmcli loads from a repository; never *.py (no remote code) and never pickle weights.
LOADABLE_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "qwen.tiktoken",
]


@dataclass
class ResolvedModel:
    name: str  # what the user asked for (or the default)
    path: Path
    repo: str | None = None
    is_demo: bool = False


def default_model_name() -> str:
    return os.environ.get("LLMCLI_MODEL") or DEFAULT_MODEL


def _looks_like_path(name: str) -> bool:
    # Repo ids have exactly one slash; anything else with slashes or a leading ./ ~ is a path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def cached_snapshot(repo: str, revision: str | None = None) -> Path | None:
    """The local snapshot of `repo` in the HF cache, or None when it is not there."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo, revision=revision, local_files_only=True,
                                 allow_patterns=LOADABLE_PATTERNS)
    except Exception:  # huggingface_hub raises several types for "not in the cache"
        return None
    path = Path(path)
    return path if (path / "config.json").is_file() else None


def resolve(name: str | None) -> ResolvedModel:
    from llmcli.demo import ensure_demo, is_demo

    name = name or default_model_name()
    if is_demo(name):
        return ResolvedModel(name, ensure_demo(name), is_demo=True)
    path = Path(name).expanduser()
    if path.is_dir():
        return ResolvedModel(name, path)
    if _looks_like_path(name) or path.exists():
        raise LlmcliError(f"no such model directory: {name}")
    alias = ALIASES.get(name.lower())
    repo = alias.repo if alias else name
    if "/" not in repo:
        known = ", ".join(sorted(ALIASES))
        raise LlmcliError(f"unknown model {name!r}: not a directory, alias or repo id (aliases: {known})")
    snapshot = cached_snapshot(repo)
    if snapshot is None:
        raise LlmcliError(f"{name} is not downloaded; run: llmcli download {name}")
    return ResolvedModel(name, snapshot, repo=repo)
