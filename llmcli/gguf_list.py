"""The GGUF models `llmcli list` shows: .gguf files in Hugging Face cache snapshots (run them by
`ORG/REPO/FILE.gguf` or by path) and the models in Ollama's store (`ollama:NAME:TAG`)."""

from __future__ import annotations

from pathlib import Path

from llmcli import download as dl
from llmcli import ollama
from llmcli.errors import LlmcliError
from llmcli.formats.gguf import SPLIT_NAME, open_gguf
from llmcli.formats.gguf_config import gguf_config


def _facts(path: Path) -> tuple[str, int | None]:
    """(family, parameters) from the file's header; ("unknown", None) when it cannot be read."""
    try:
        gg = open_gguf(path)
    except LlmcliError:
        return "unknown", None
    try:
        family = gguf_config(gg).family
    except LlmcliError:
        family = f"{gg.architecture} (unsupported)"
    return family, sum(t.numel for t in gg.tensors.values())


def hf_cache_ggufs() -> list[tuple[str, Path]]:
    """(ORG/REPO/FILE.gguf, path) for each GGUF model in the newest snapshot of each cached repo."""
    cache = dl.hub_cache_dir()
    found = []
    for folder in sorted(cache.glob("models--*")) if cache.is_dir() else []:
        repo = folder.name[len("models--"):].replace("--", "/")
        snapshots = [p for p in (folder / "snapshots").glob("*") if p.is_dir()]
        if not snapshots:
            continue
        snapshot = max(snapshots, key=lambda p: p.stat().st_mtime)
        for path in sorted(snapshot.rglob("*.gguf")):
            split = SPLIT_NAME.fullmatch(path.name)
            if path.is_file() and not (split and int(split.group(2)) != 1):
                found.append((f"{repo}/{path.relative_to(snapshot).as_posix()}", path))
    return found


def gguf_rows(row) -> list[dict]:
    """`list` rows (built by `row`, the command's own row maker) for every GGUF model found."""
    rows = []
    for name, path in hf_cache_ggufs():
        family, params = _facts(path)
        size = sum(p.stat().st_size for p in open_gguf(path).files) if params is not None else path.stat().st_size
        rows.append(row(name, name.rsplit("/", 1)[0], family, params, "yes", size, "GGUF in the HF cache", path))
    for model in ollama.installed():
        family, params = _facts(model.blob)
        rows.append(row(f"{ollama.PREFIX}{model.name}", None, family, params, "yes", model.size, "Ollama store",
                        model.blob))
    return rows
