"""Where llmcli keeps its files: one cache home, and the folders inside it."""

from __future__ import annotations

import os
from pathlib import Path

from llmcli.options import home_override


def cache_home() -> Path:
    """llmcli's own cache (demo models, converted tokenizers, built kernels); $LLMCLI_HOME overrides it."""
    override = home_override()
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llmcli"


def kernel_builds() -> Path:
    """Built CPU kernels, one folder per source, torch version, flags and CPU."""
    return cache_home() / "extensions"


def inductor_cache() -> Path:
    """torch.compile's on-disk caches (unless TORCHINDUCTOR_CACHE_DIR is set)."""
    return cache_home() / "inductor"
