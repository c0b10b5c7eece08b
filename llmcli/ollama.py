"""Ollama's model store: `ollama:NAME[:TAG]` -> the GGUF blob its manifest names.

The store ($OLLAMA_MODELS, else ~/.ollama/models) keeps content-addressed blobs (`blobs/sha256-<hex>`) and
one JSON manifest per model under `manifests/<registry>/<namespace>/<name>/<tag>`; the manifest's layer of
media type `application/vnd.ollama.image.model` is the GGUF file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from llmcli.errors import LlmcliError
from llmcli.options import ollama_models_override

PREFIX = "ollama:"
DEFAULT_REGISTRY = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
MODEL_LAYER = "application/vnd.ollama.image.model"
_DIGEST = re.compile(r"sha256[:-]([0-9a-f]{64})")
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class OllamaModel:
    name: str  # as `ollama list` shows it, e.g. "qwen2.5:7b" or "hf.co/user/repo:Q4_K_M"
    manifest: Path
    blob: Path
    size: int


def store() -> Path:
    """Ollama's model directory."""
    override = ollama_models_override()
    return Path(override).expanduser() if override else Path.home() / ".ollama" / "models"


def is_ollama_name(name: str) -> bool:
    return name.startswith(PREFIX)


def _manifest_path(root: Path, name: str) -> Path:
    """NAME[:TAG] -> its manifest: `qwen2.5` is registry.ollama.ai/library/qwen2.5/latest."""
    last = name.rsplit("/", 1)[-1]
    model, tag = (name.rsplit(":", 1) if ":" in last else (name, ""))
    parts = model.split("/")
    if len(parts) == 1:
        parts = [DEFAULT_REGISTRY, DEFAULT_NAMESPACE, *parts]
    elif len(parts) == 2:
        parts = [DEFAULT_REGISTRY, *parts]
    parts.append(tag or "latest")
    if len(parts) != 4 or not all(_PART.fullmatch(p) for p in parts):
        raise LlmcliError(f"{PREFIX}{name} is not an Ollama model name (e.g. ollama:qwen2.5:7b)")
    return root.joinpath("manifests", *parts)


def _blob_of(root: Path, manifest: Path) -> tuple[Path, int]:
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        layer = next(layer for layer in data["layers"] if layer.get("mediaType") == MODEL_LAYER)
        match = _DIGEST.fullmatch(str(layer["digest"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration) as exc:
        raise LlmcliError(f"{manifest} is not an Ollama manifest with a model layer") from exc
    if not match:
        raise LlmcliError(f"{manifest}: model layer digest {layer['digest']!r} is not a sha256 digest")
    blob = root / "blobs" / f"sha256-{match.group(1)}"
    if not blob.is_file():
        raise LlmcliError(f"{blob} is missing: the Ollama store is incomplete (run `ollama pull` again)")
    return blob, int(layer.get("size") or blob.stat().st_size)


def resolve(name: str) -> OllamaModel:
    """`ollama:NAME[:TAG]` (or NAME[:TAG]) -> the model's GGUF blob."""
    bare = name.removeprefix(PREFIX)
    root = store()
    manifest = _manifest_path(root, bare)
    if not manifest.is_file():
        raise LlmcliError(f"{PREFIX}{bare} is not in the Ollama store at {root} (`ollama pull {bare}` fetches it; "
                          "$OLLAMA_MODELS names another store)")
    blob, size = _blob_of(root, manifest)
    return OllamaModel(bare, manifest, blob, size)


def installed() -> list[OllamaModel]:
    """Every model in the store whose manifest names a GGUF blob that is present."""
    root = store()
    found = []
    for manifest in sorted((root / "manifests").glob("*/*/*/*")) if (root / "manifests").is_dir() else []:
        if not manifest.is_file():
            continue
        registry, namespace, model, tag = manifest.relative_to(root / "manifests").parts
        if (registry, namespace) == (DEFAULT_REGISTRY, DEFAULT_NAMESPACE):
            shown = f"{model}:{tag}"
        elif registry == DEFAULT_REGISTRY:
            shown = f"{namespace}/{model}:{tag}"
        else:
            shown = f"{registry}/{namespace}/{model}:{tag}"
        try:
            blob, size = _blob_of(root, manifest)
        except LlmcliError:
            continue  # listing skips what it cannot run; resolving it explains why
        found.append(OllamaModel(shown, manifest, blob, size))
    return found
