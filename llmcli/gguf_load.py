"""A GGUF model as the loader sees it: config, tokenizer and checkpoint tensors (torch, in the names and
layouts the models load), read one at a time from the file.

Q8_0, Q4_0 and Q4_1 tensors are dequantised with torch (`gguf_dequant`), other quantised types with the gguf
package's numpy code to float32; either way one tensor (one expert, or a few MiB of rows of a big tensor) at a
time, copied straight into the parameter: peak memory is the model in its run dtype plus one dequantised
layer matrix. `--quantize int8` then re-quantises each linear
as it loads, like a safetensors model; `--quantize int4` takes Q4_0, Q4_1 and Q4_K linears' own 4-bit codes
and scales (`codes_in_parts`), re-quantising only the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from llmcli.config import ModelConfig
from llmcli.formats.gguf import GGUFFile, open_gguf, unsupported_error
from llmcli.formats.gguf_config import gguf_config
from llmcli.formats.gguf_int4 import (
    INT4_TYPES,
    INT5_TYPES,
    INT8_TYPES,
    Q6_TYPES,
    int4_codes,
    int5_codes,
    int8_codes,
    q6_k_codes,
)
from llmcli.formats.gguf_names import Piece, checkpoint_pieces, tensor_infos
from llmcli.formats.safetensors import TensorInfo
from llmcli.gguf_dequant import TORCH_TYPES, dequantize_into
from llmcli.tokenizer import Tokenizer


def _to_torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype == np.uint16:  # BF16 bits
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


# The types each kind of stored codes comes from, and their extractor
STORED_CODES = {"int4": (INT4_TYPES, int4_codes), "int5": (INT5_TYPES, int5_codes), "int8": (INT8_TYPES, int8_codes),
                "q6_k": (Q6_TYPES, q6_k_codes)}

# Dequantising makes float32 copies (gguf's numpy code holds two): big tensors (embeddings, heads) are read
# this many values at a time, so that loading peaks at the model plus a few dozen MiB.
PART_VALUES = 1 << 22


def _read_in_parts(piece: Piece, out: torch.Tensor) -> torch.Tensor:
    rows = piece.shape[0]
    step = max(1, PART_VALUES // max(1, out.numel() // max(rows, 1)))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        out[start:stop].copy_(_to_torch(piece.rows(start, stop)))
    return out


class GGUFSource:
    def __init__(self, path: Path):
        self.gguf: GGUFFile = open_gguf(path)
        self.path = self.gguf.path
        self.config: ModelConfig = gguf_config(self.gguf)
        bad = self.gguf.unsupported()
        if bad is not None:
            raise unsupported_error(bad)
        self.pieces: list[Piece] = checkpoint_pieces(self.gguf, self.config)
        self.by_name = {piece.name: piece for piece in self.pieces}

    def codes_in_parts(self, name: str, kind: str, part_rows: int) -> Iterator[tuple] | None:
        """The codes of checkpoint tensor `name` as the file stores them, `part_rows` rows at a time, or None where the
        file does not store it so (extracting a vocabulary-sized head's codes at once held several copies of them:
        Qwen3-30B-A3B's Q6_K head, 1.5 GB). `kind`, with the codes' form (formats/gguf_int4.py):
        "int4" (q, scale, zero): Q4_0, Q4_1, Q4_K, zero None for Q4_0; "int5" (q, scale, low): Q5_0, Q5_1, Q5_K, low
        None for Q5_0; "int8" (q, scale, None): Q8_0; "q6_k" (q, int8 sub-scale per 16, d per 256): Q6_K."""
        types, extract = STORED_CODES[kind]
        if not self.stores(name, types):
            return None
        piece = self.by_name[name]
        rows = piece.shape[0]
        if piece.raw_rows is not None:  # read a part at a time too: the whole head's bytes are its size again
            raw_part = piece.raw_rows
        else:
            whole = piece.raw()
            if whole is None:
                return None
            raw_part = lambda start, stop: whole[start:stop]  # noqa: E731
        type_name = self.gguf.tensors[piece.source].type_name

        def parts() -> Iterator[tuple]:
            for start in range(0, rows, part_rows):
                codes = extract(raw_part(start, min(rows, start + part_rows)), type_name, piece.shape[1])
                yield tuple(None if part is None else torch.from_numpy(part) for part in codes)
        return parts()

    def stored_bits(self, name: str) -> float | None:
        """Bits per weight of the file's tensor that holds checkpoint tensor `name` (None: not in the file)."""
        piece = self.by_name.get(name)
        return None if piece is None else self.gguf.tensors[piece.source].bits

    def layer_bits(self) -> float | None:
        return self.gguf.layer_bits()

    def layer_types(self) -> set[str]:
        return self.gguf.layer_types()

    def stores(self, name: str, types: tuple[str, ...] = INT4_TYPES) -> bool:
        """Is checkpoint tensor `name` a matrix in one of `types` (4-bit ones: what `int4_codes` takes as stored)?"""
        piece = self.by_name.get(name)
        return (piece is not None and self.gguf.tensors[piece.source].type_name in types
                and piece.raw is not None and len(piece.shape) == 2)

    def _dequantises(self, piece: Piece) -> bool:
        """Is `piece` in a type that gguf_dequant reads, with its stored rows at hand?"""
        return self.gguf.tensors[piece.source].type_name in TORCH_TYPES and (piece.raw or piece.rows) is not None

    def _raw(self, piece: Piece) -> torch.Tensor:
        """`piece`'s stored blocks, [rows, bytes per row] (raw bytes are 3.5-7x smaller than the float32 values)."""
        raw = piece.raw() if piece.raw is not None else self.gguf.raw(piece.source).reshape(piece.shape[0], -1)
        return torch.from_numpy(np.ascontiguousarray(raw))

    def check_tokenizer(self) -> None:
        """Refuse a tokenizer llmcli cannot build before the weights load (it is built while they do)."""
        from llmcli.gguf_tokenizer import check_tokenizer

        check_tokenizer(self.gguf)

    def tokenizer(self) -> Tokenizer:
        from llmcli.gguf_tokenizer import gguf_tokenizer

        return gguf_tokenizer(self.gguf)

    def tensors(self, unread: Callable[[str], bool] | None = None) -> Iterator[tuple[str, Path, Callable]]:
        """(name, file, load) for weights.load_weights; load(out=parameter) fills the parameter in place, except
        where `unread(name)`: a weight that loading replaces from the file's own codes is left as allocated."""
        for piece in self.pieces:
            def load(piece=piece, out=None):
                fills = out is not None and out.device.type == "cpu" and tuple(out.shape) == piece.shape
                if fills and unread is not None and unread(piece.name):
                    return out
                if fills and len(piece.shape) == 2 and out.is_contiguous() and self._dequantises(piece):
                    return dequantize_into(self._raw(piece), self.gguf.tensors[piece.source].type_name, out)
                if fills and piece.rows is not None and piece.shape:
                    return _read_in_parts(piece, out)
                tensor = _to_torch(piece.read())
                if out is not None and out.device.type == "cpu" and tuple(out.shape) == tuple(tensor.shape):
                    out.copy_(tensor)  # converts to the run dtype with no second full-size copy
                    return out
                return tensor

            yield piece.name, self.gguf.tensors[piece.source].file, load

    def tensor_infos(self) -> dict[str, TensorInfo]:
        return tensor_infos(self.gguf, self.pieces)
