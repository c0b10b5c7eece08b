"""GGUF files (llama.cpp, Ollama, LM Studio): metadata, the tensor table and tensor data, without torch.

A GGUF file is a header (magic "GGUF", version, counts), typed key/value metadata, a table of tensors
(name, dims in ggml order, type, offset) and then the aligned tensor data. Large models are split into
`name-00001-of-0000N.gguf` files, each with its own header; the first holds the metadata.

The header is parsed here with plain reads from a memory map (the `gguf` package's reader builds a numpy
array per string: 6 s for a 49k-token vocabulary); the `gguf` package (llama.cpp's own) supplies the type
table and dequantises the data. Tensor bytes are read with file reads, not mapped, so loading keeps one
tensor's bytes at a time outside the model.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmcli.errors import LlmcliError
from llmcli.formats.gguf_int4 import INT4_TYPES, dequantize_4bit

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# The tensor types llmcli reads: floats, and the quantisations llama.cpp's common files use.
# What llama.cpp's quantisation mixes write: Q4_K_M also writes Q5_0 and Q8_0 for matrices whose width is not a
# multiple of 256 (Qwen2.5-0.5B's 896), Q5_K_M Q5_1, IQ4_XS IQ4_NL. Each is read with the gguf package's numpy
# code (llama.cpp's formulas), or with torch where gguf_dequant has it.
FLOAT_TYPES = ("F32", "F16", "BF16")
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_S")
SPLIT_NAME = re.compile(r"(.*)-(\d{5})-of-(\d{5})\.gguf")

# GGUF value types: code -> struct format (scalars); 8 string, 9 array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


class _Corrupt(ValueError):
    pass


class _Cursor:
    """Reads little-endian values from a byte buffer, never past its end."""

    def __init__(self, data, offset: int = 0):
        self.data, self.pos = data, offset

    def take(self, n: int):
        if n < 0 or self.pos + n > len(self.data):
            raise _Corrupt(f"the header runs past the end of the file (at byte {self.pos})")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def scalar(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size))[0]

    def string(self) -> str:
        raw = self.take(self.scalar("Q"))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", "replace")  # some vocabularies hold partial UTF-8 byte tokens

    def _strings(self, count: int) -> list[str]:
        """An array of strings (a vocabulary: 150k of them), in one tight loop: bounds are checked once at the
        end (a slice past the end is short, and unpack_from past it raises), half the time of checking each."""
        data, pos, raw = self.data, self.pos, []
        length = _U64.unpack_from
        try:
            for _ in range(count):
                (n,) = length(data, pos)
                raw.append(data[pos + 8:pos + 8 + n])
                pos += 8 + n
        except struct.error:
            pos = len(data) + 1
        if pos > len(data):
            raise _Corrupt(f"the header runs past the end of the file (at byte {self.pos})")
        self.pos = pos
        return [item.decode("utf-8", "replace") for item in raw]  # some vocabularies hold partial UTF-8

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.scalar("I"), self.scalar("Q")
            if count > len(self.data) - self.pos:  # every item takes at least one byte
                raise _Corrupt(f"an array claims {count} items")
            if item == _STRING:
                return self._strings(count)
            if item in _SCALARS and item != 7:
                fmt = _SCALARS[item]
                raw = self.take(count * struct.calcsize(fmt))
                return np.frombuffer(raw, dtype="<" + fmt).tolist()
            return [self.value(item) for _ in range(count)]
        raise _Corrupt(f"unknown metadata value type {kind}")


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type_name: str  # ggml type, e.g. "Q4_K"
    type_code: int
    shape: tuple[int, ...]  # rows first, as torch and numpy see it (ggml's dims reversed)
    file: Path
    start: int  # absolute byte offset
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits(self) -> float:
        """Bits per weight as stored (blocks' scales included)."""
        return 8 * self.nbytes / max(self.numel, 1)


@dataclass
class GGUFFile:
    path: Path  # the first (or only) file
    files: list[Path]
    metadata: dict = field(default_factory=dict)
    tensors: dict[str, GGUFTensor] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def size_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def layer_matrices(self) -> list[GGUFTensor]:
        """The layers' matrices (attention, MLPs, experts: not the embedding or the head), F32 ones left out:
        llama.cpp keeps in F32 what it never quantises (Qwen3.5's conv kernels, tensors too narrow for a block)."""
        return [t for t in self.tensors.values()
                if len(t.shape) >= 2 and t.name.startswith("blk.") and t.type_name != "F32"]

    def layer_bits(self) -> float | None:
        """Bits per weight of `layer_matrices` as stored; None when they are all floats (F16, BF16)."""
        matrices = self.layer_matrices()
        if not matrices or all(t.type_name in FLOAT_TYPES for t in matrices):
            return None
        return 8 * sum(t.nbytes for t in matrices) / sum(t.numel for t in matrices)

    def layer_types(self) -> set[str]:
        """The types `layer_matrices` are stored in."""
        return {t.type_name for t in self.layer_matrices()}

    def wide_layer_types(self) -> set[str]:
        """The types of `layer_matrices` stored in more than INT4_FILE_BITS a weight (a Q4_K_M's Q6_K and Q5_0):
        what an int4 run of a 4-bit file takes in int5 where its kernel runs (backends/prepare.py)."""
        return {t.type_name for t in self.layer_matrices() if t.bits > INT4_FILE_BITS}

    def head_type(self) -> str | None:
        """The type the output head is stored in: output.weight's, or a tied head's token_embd.weight's."""
        tensor = self.tensors.get("output.weight") or self.tensors.get("token_embd.weight")
        return None if tensor is None else tensor.type_name

    def unsupported(self) -> GGUFTensor | None:
        """The first tensor of a type llmcli cannot read, if any."""
        return next((t for t in self.tensors.values() if t.type_name not in SUPPORTED_TYPES), None)

    def raw(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """A tensor's bytes (rows start..stop of its first dimension), read from its file."""
        tensor = self.tensors[name]
        rows = tensor.shape[0] if tensor.shape else 1
        stop = rows if stop is None else stop
        row_bytes = tensor.nbytes // max(rows, 1)
        out = np.empty((stop - start) * row_bytes, dtype=np.uint8)
        with open(tensor.file, "rb") as f:
            f.seek(tensor.start + start * row_bytes)
            if f.readinto(memoryview(out)) != out.nbytes:
                raise LlmcliError(f"{tensor.file} is truncated: tensor {name} ends past the end of the file")
        return out

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """A tensor (rows start..stop of its first dimension) as numpy: float32, float16 or, for BF16,
        the stored uint16 bits; quantised types are dequantised to float32 by the gguf package's own code (4-bit
        types by an equal, vectorised one: `gguf_int4`)."""
        tensor = self.tensors[name]
        if tensor.type_name not in SUPPORTED_TYPES:
            raise unsupported_error(tensor)
        shape = tensor.shape
        if shape:
            shape = (shape[0] - start if stop is None else stop - start, *shape[1:])
        data = self.raw(name, start, stop)
        if tensor.type_name == "F32":
            return data.view(np.float32).reshape(shape)
        if tensor.type_name == "F16":
            return data.view(np.float16).reshape(shape)
        if tensor.type_name == "BF16":
            return data.view(np.uint16).reshape(shape)
        if tensor.type_name in INT4_TYPES:
            return dequantize_4bit(data, tensor.type_name, shape)
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize, quant_shape_to_byte_shape

        qtype = GGMLQuantizationType(tensor.type_code)
        return dequantize(data.reshape(quant_shape_to_byte_shape(shape, qtype)), qtype)


# Layers stored at up to this many bits a weight (Q4_0 4.5, Q4_1 5.0, Q4_K_M 4.8, IQ4_XS 4.25, Q3_K_M 3.9) run
# in int4 by default; up to INT5_FILE_BITS (Q5_0 5.5, Q5_1 6.0, Q5_K_M 5.7, and a Q4_K_M whose widths are not
# multiples of 256, which falls back to Q5_0: 5.5) in int5 where its kernel runs; more (Q6_K 6.6, Q8_0 8.5) in
# int8, which loses none of the file's precision.
INT4_FILE_BITS = 5.25
INT5_FILE_BITS = 6.25


def nearest_quantize(layer_bits: float | None, int5: bool = True) -> str | None:
    """--quantize auto's choice on CPU for layers stored at `layer_bits` a weight (None: float layers); `int5`:
    whether int5's kernel runs here (else such files run int8)."""
    if layer_bits is None:
        return None
    if layer_bits <= INT4_FILE_BITS:
        return "int4"
    return "int5" if int5 and layer_bits <= INT5_FILE_BITS else "int8"


def unsupported_error(tensor: GGUFTensor) -> LlmcliError:
    return LlmcliError(f"{tensor.file}: tensor {tensor.name} has type {tensor.type_name}, which llmcli does not "
                       f"read (supported: {', '.join(SUPPORTED_TYPES)})")


def _type_table() -> dict[int, tuple[str, int, int]]:
    """ggml type code -> (name, block size, bytes per block), from the gguf package."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return {int(t): (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}


def _parse(path: Path, data) -> tuple[dict, dict[str, GGUFTensor]]:
    if bytes(data[:4]) != MAGIC:
        raise _Corrupt("it does not start with the GGUF magic bytes")
    cur = _Cursor(data, 4)
    version = cur.scalar("I")
    if version not in (2, 3):
        raise _Corrupt(f"GGUF version {version} is not supported (2 and 3 are)")
    count, kv_count = cur.scalar("Q"), cur.scalar("Q")
    if count > len(data) or kv_count > len(data):
        raise _Corrupt(f"it claims {count} tensors and {kv_count} metadata entries")
    metadata = {}
    for _ in range(kv_count):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("I"))
    types = _type_table()
    infos = []
    for _ in range(count):
        name = cur.string()
        dims = [cur.scalar("Q") for _ in range(cur.scalar("I"))]
        code, offset = cur.scalar("I"), cur.scalar("Q")
        infos.append((name, tuple(reversed(dims)), code, offset))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    if alignment <= 0 or alignment & (alignment - 1):
        raise _Corrupt(f"general.alignment {alignment} is not a power of two")
    base = -(-cur.pos // alignment) * alignment
    tensors = {}
    for name, shape, code, offset in infos:
        type_name, block, size = types.get(code, (f"type {code}", 1, 0))
        numel = math.prod(shape)
        if shape and shape[-1] % block:
            raise _Corrupt(f"tensor {name}: row size {shape[-1]} is not a multiple of {type_name}'s block {block}")
        nbytes = numel // block * size
        if base + offset + nbytes > len(data):
            raise LlmcliError(f"{path} is truncated: tensor {name} ends past the end of the file")
        if name in tensors:
            raise _Corrupt(f"tensor {name} appears twice")
        tensors[name] = GGUFTensor(name, type_name, code, shape, path, base + offset, nbytes)
    return metadata, tensors


def read_file(path: Path) -> tuple[dict, dict[str, GGUFTensor]]:
    """One file's metadata and tensors, with the file's problems as one-line errors."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if path.stat().st_size < 24:
                raise _Corrupt("the file is too short")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _parse(path, data)
    except (OSError, ValueError, struct.error, OverflowError, MemoryError) as exc:
        raise LlmcliError(f"{path} is not a readable GGUF file: {exc}") from exc


def split_files(path: Path) -> list[Path]:
    """All files of a split model (`*-00001-of-0000N.gguf`), in order; [path] for a single file."""
    match = SPLIT_NAME.fullmatch(path.name)
    if not match:
        return [path]
    stem, _, total = match.groups()
    files = [path.with_name(f"{stem}-{i:05d}-of-{total}.gguf") for i in range(1, int(total) + 1)]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise LlmcliError(f"{missing[0]} is missing: {path.name} is part of a {int(total)}-file split model")
    return files


def open_gguf(path: Path) -> GGUFFile:
    """The model in `path` (a .gguf file, or any part of a split model) with every part's tensors."""
    files = split_files(Path(path))
    model = GGUFFile(files[0], files)
    for index, file in enumerate(files):
        metadata, tensors = read_file(file)
        if index == 0:
            model.metadata = metadata
        for name, tensor in tensors.items():
            if name in model.tensors:
                raise LlmcliError(f"{file}: tensor {name} appears in two parts of the split model")
            model.tensors[name] = tensor
    return model


def gguf_path_of(path: Path) -> Path | None:
    """The GGUF file a model path names (a .gguf file, or a directory holding one model and no
    config.json); None for a safetensors model directory."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        return None
    return find_gguf(path)


def find_gguf(path: Path) -> Path | None:
    """The GGUF model a path names: a .gguf file, or the one model in a directory (for a split model, its
    first part); None when there is none. A directory with several models is an error."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix == ".gguf" or _has_magic(path) else None  # Ollama's blobs have no suffix
    if not path.is_dir():
        return None
    found = sorted(p for p in path.glob("*.gguf") if p.is_file() and not _later_part(p))
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:4])
        raise LlmcliError(f"{path} holds several GGUF models ({names}); name the file")
    return found[0] if found else None


def _later_part(path: Path) -> bool:
    match = SPLIT_NAME.fullmatch(path.name)
    return bool(match) and int(match.group(2)) != 1


def _has_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False
