"""Sharded loading: each rank reads only its slices of the safetensors tensors.

`sharded_tensors` yields (name, file, load) like a checkpoint (`llmcli.weights.load_weights` takes it), where
`load()` reads the rank's `Slice` of the tensor (`llmcli.backends.tensor_parallel.slicer`) and skips the
tensors the rank holds none of. Reads are plain positioned file reads, not a memory map, as the single-process
loader does (a map's pages would count in each rank's resident memory): a slice of rows is one read; a slice
of columns is read a block of rows at a time (at most BLOCK_BYTES held), so a rank never holds a whole tensor
it keeps only part of. FP8 block-quantised weights are dequantised slice by slice with their blocks' scales.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch

from llmcli.backends.tensor_parallel import Slice
from llmcli.errors import LlmcliError
from llmcli.weights import SCALE_SUFFIX, Checkpoint, TensorEntry

BLOCK_BYTES = 16 * 2**20
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _read(handle, entry: TensorEntry, offset: int, target: torch.Tensor, name: str) -> None:
    view = memoryview(target.reshape(-1).view(torch.uint8).numpy())
    handle.seek(entry.start + offset)
    if handle.readinto(view) != len(view):
        raise LlmcliError(f"{entry.file} ended while reading tensor {name}")


def read_range(ckpt: Checkpoint, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
    """Rows (dim 0) or columns (dim 1) start..stop of a checkpoint tensor."""
    entry = ckpt.entries[name]
    shape, element = entry.shape, entry.dtype.itemsize
    handle = ckpt.handle(entry.file)
    if dim == 0:
        row = math.prod(shape[1:]) * element
        out = torch.empty((stop - start, *shape[1:]), dtype=entry.dtype)
        if out.numel():
            _read(handle, entry, start * row, out, name)
        return out
    if len(shape) != 2:
        raise LlmcliError(f"tensor {name} has shape {shape}; only matrices are split by columns")
    rows, cols = shape
    out = torch.empty((rows, stop - start), dtype=entry.dtype)
    block = max(1, BLOCK_BYTES // max(cols * element, 1))
    for first in range(0, rows, block):
        chunk = torch.empty((min(block, rows - first), cols), dtype=entry.dtype)
        _read(handle, entry, first * cols * element, chunk, name)
        out[first: first + chunk.shape[0]] = chunk[:, start:stop]
    return out


def _block_scale(scale: torch.Tensor, block: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]):
    """The float32 scale of each value in rows x cols of a block-scaled matrix."""
    (br, bc), (r0, r1), (c0, c1) = block, rows, cols
    part = scale[r0 // br: -(-r1 // br), c0 // bc: -(-c1 // bc)].float()
    part = part.repeat_interleave(br, 0)[r0 - r0 // br * br:][: r1 - r0]
    return part.repeat_interleave(bc, 1)[:, c0 - c0 // bc * bc:][:, : c1 - c0]


def read_slice(ckpt: Checkpoint, name: str, part: Slice | None, dtype: torch.dtype,
               fp8_block: tuple[int, int] | None) -> torch.Tensor:
    """The slice of `name` (None: all of it), FP8 dequantised to `dtype`."""
    entry = ckpt.entries[name]
    if part is None:
        part = Slice(0, ((0, entry.shape[0]),), entry.shape[0]) if entry.shape else None
        if part is None:
            return ckpt.get(name)
    fp8 = entry.dtype in FP8
    if fp8:
        scale_name = name + SCALE_SUFFIX
        if scale_name not in ckpt.entries or len(entry.shape) != 2:
            raise LlmcliError(f"FP8 weight {name} in {entry.file} has no {scale_name}")
        scale, block = ckpt.get(scale_name), fp8_block or (128, 128)
        expected = tuple(math.ceil(n / b) for n, b in zip(entry.shape, block, strict=True))
        if tuple(scale.shape) != expected:
            raise LlmcliError(f"FP8 scale {scale_name} has shape {tuple(scale.shape)}, expected {expected}")
    pieces = []
    for start, stop in part.ranges:
        piece = read_range(ckpt, name, part.dim, start, stop)
        if fp8:
            whole = [(0, n) for n in entry.shape]
            whole[part.dim] = (start, stop)
            piece = (piece.float() * _block_scale(scale, block, *whole)).to(dtype)
        pieces.append(piece)
    shape = list(entry.shape)
    shape[part.dim] = part.length - sum(stop - start for start, stop in part.ranges)
    pieces.append(torch.zeros(shape, dtype=dtype if fp8 else entry.dtype))  # padding (or a rank's zero bias)
    return torch.cat(pieces, dim=part.dim)


def sharded_tensors(ckpt: Checkpoint, slice_of, dtype: torch.dtype,
                    fp8_block: tuple[int, int] | None) -> Iterator[tuple[str, Path, object]]:
    """(name, file, load) for every tensor this rank holds some of."""
    for name in ckpt.names():
        if name.endswith(SCALE_SUFFIX):
            continue
        part = slice_of(name, ckpt.shape(name))
        if part is False:
            continue

        def load(name=name, part=part, out=None):
            return read_slice(ckpt, name, part, dtype, fp8_block)

        yield name, ckpt.file_of(name), load
