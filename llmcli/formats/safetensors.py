"""safetensors checkpoints without torch: each file's tensor table and the list of a checkpoint's files.

A .safetensors file is an 8-byte little-endian header length, that much JSON (name -> dtype, shape and
data_offsets counted from the end of the header), then the tensor bytes. Loading (llmcli.weights) and
`llmcli show` both read checkpoints through here; show never imports torch, so this module must not.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from llmcli.errors import LlmcliError

# safetensors dtype code -> bytes per element
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
# safetensors dtype code -> torch dtype name (getattr(torch, name) where torch is wanted)
DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu", "I64": "int64", "I32": "int32", "I16": "int16",
    "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit: a longer header means a corrupt file
MAX_ELEMENTS = 2**63 - 1  # torch's sizes and strides are int64 (the library's too), even beside a zero dimension
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are. Once read_header has checked it, nbytes == numel x element size
    (dtypes outside DTYPE_BYTES, kept only on request, have just their byte range checked)."""

    file: Path
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path, *, unknown_dtypes: bool = False) -> dict[str, TensorInfo]:
    """The tensors of one file, each checked to lie inside the file and to have as many bytes as its
    shape and dtype need. unknown_dtypes=True keeps dtype codes missing from DTYPE_BYTES (show reports
    them; loading has no torch dtype for them)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file too short")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES:  # checked before reading, so a corrupt length allocates nothing
                raise ValueError(f"header length {length} is over the {MAX_HEADER_BYTES}-byte limit")
            if length > size - 8:
                raise ValueError(f"header length {length} runs past the end of the file ({size} bytes)")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: JSON and UTF-8; RecursionError: deep nesting
        raise LlmcliError(f"{path} is not a readable safetensors file: {exc}") from exc
    base = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not name.isprintable():  # names end up in error messages, which must stay on one line
            raise LlmcliError(f"{path}: tensor name {name!r} has unprintable characters")
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if not isinstance(dtype, str) or (dtype not in DTYPE_BYTES and not unknown_dtypes):
                raise ValueError(f"unknown dtype {dtype!r}")
            if not all(type(n) is int and n >= 0 for n in (*shape, begin, end)) or begin > end:
                raise ValueError(f"shape {list(shape)} or data_offsets {[begin, end]} are not valid")
            if math.prod(n or 1 for n in shape) > MAX_ELEMENTS:
                raise ValueError(f"shape {list(shape)} is too large")
        except (KeyError, TypeError, ValueError) as exc:
            problem = f"no {exc}" if isinstance(exc, KeyError) else exc
            raise LlmcliError(f"{path}: bad header entry for {name}: {problem}") from exc
        if base + end > size:
            raise LlmcliError(f"{path} is truncated: tensor {name} ends past the end of the file")
        expected = math.prod(shape) * DTYPE_BYTES.get(dtype, 0)
        if dtype in DTYPE_BYTES and end - begin != expected:
            raise LlmcliError(f"{path}: tensor {name} has {end - begin} bytes for shape {shape} of {dtype} "
                              f"(expected {expected})")
        entries[name] = TensorInfo(path, dtype, shape, base + begin, end - begin)
    return entries


def _shown(text: object) -> str:
    """Text from a file as an error message shows it: quoted when it holds line breaks or control characters."""
    text = str(text)
    return text if text.isprintable() else repr(text)


def _listing(model_dir: Path, missing_ok: bool) -> tuple[list[Path], dict[str, str] | None]:
    """The files (the shards an index names, else every *.safetensors) and the index's weight_map."""
    index = model_dir / INDEX_NAME
    if not index.is_file():
        return sorted(model_dir.glob("*.safetensors")), None
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        outside = [name for name in weight_map.values() if Path(name).is_absolute() or ".." in Path(name).parts]
        if outside:  # a repo's index must not make llmcli read files elsewhere on the machine
            raise ValueError(f"shard {outside[0]!r} lies outside the model directory")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise LlmcliError(f"{index} is not a valid safetensors index: {exc}") from exc
    missing = [f for f in files if not f.is_file()]
    if missing and not missing_ok:
        raise LlmcliError(f"{_shown(missing[0])} is listed in the index but missing")
    return files, weight_map


def checkpoint_files(model_dir: Path, *, missing_ok: bool = False) -> list[Path]:
    """The checkpoint's .safetensors files: the shards its index names, else every *.safetensors; [] when
    none. A shard the index names but the directory lacks is an error, or listed anyway with missing_ok."""
    return _listing(Path(model_dir), missing_ok)[0]


def read_checkpoint(model_dir: Path, *, missing_ok: bool = False,
                    unknown_dtypes: bool = False) -> dict[str, TensorInfo] | None:
    """Every tensor of the checkpoint by name, or None when it has no .safetensors files (or, with
    missing_ok, lacks a shard its index names, e.g. a model whose weights are not downloaded)."""
    model_dir = Path(model_dir)
    files, weight_map = _listing(model_dir, missing_ok)
    if not files or not all(f.is_file() for f in files):
        return None
    entries: dict[str, TensorInfo] = {}
    for file in files:
        entries.update(read_header(file, unknown_dtypes=unknown_dtypes))
    missing = [name for name in weight_map or () if name not in entries]
    if missing:  # the index promises a tensor that its shard does not have
        name = missing[0]
        raise LlmcliError(f"tensor {_shown(name)} is listed in {INDEX_NAME} but not in {_shown(weight_map[name])}")
    return entries
