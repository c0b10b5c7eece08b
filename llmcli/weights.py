"""Checkpoint reading: safetensors (single or sharded), one tensor at a time.

The model is built on the meta device, materialised uninitialised in the target dtype and device,
and each checkpoint tensor is converted and copied straight into its parameter, so peak memory is
the model plus one tensor. Families adapt names through the model's optional `checkpoint_tensors`
hook (e.g. original Qwen splits its fused QKV); FP8 block-quantised weights are dequantised here.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from llmcli.errors import LlmcliError

SCALE_SUFFIX = "_scale_inv"


# safetensors dtype codes -> torch dtypes.
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse a safetensors header (8-byte little-endian length + JSON) and check it fits the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file too short")
            length = struct.unpack("<Q", head)[0]
            if length > size - 8 or length > 100_000_000:
                raise ValueError("header length exceeds the file")
            header = json.loads(f.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise LlmcliError(f"{path} is not a readable safetensors file: {exc}") from exc
    base = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise LlmcliError(f"{path}: bad header entry for {name}: {exc}") from exc
        if base + end > size:
            raise LlmcliError(f"{path} is truncated: tensor {name} ends past the end of the file")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise LlmcliError(f"{path}: tensor {name} has {end - begin} bytes for shape {shape}")
        entries[name] = TensorEntry(path, dtype, shape, base + begin, end - begin)
    return entries


class Checkpoint:
    """Names and lazily read tensors of a safetensors checkpoint directory.

    Tensors are read with plain file reads, straight into their destination when possible. Unlike
    a memory map, this keeps the file's pages out of the process's resident memory, so loading
    costs one copy of the weights (plus at most one tensor when a dtype conversion is needed)."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        self.entries = self._read_entries()
        self._handles: dict[Path, object] = {}

    def _read_entries(self) -> dict[str, TensorEntry]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise LlmcliError(f"{index} is not a valid safetensors index: {exc}") from exc
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (self.dir / name).is_file():
                    raise LlmcliError(f"{self.dir / name} is listed in the index but missing")
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            weight_map = None
        if not files:
            if any(self.dir.glob(pattern) for pattern in ("*.bin", "*.pt", "*.pth")):
                raise LlmcliError(
                    f"{self.dir} has only pickle weights (.bin/.pt); llmcli loads safetensors only "
                    "because pickle files can execute code"
                )
            raise LlmcliError(f"{self.dir} has no *.safetensors weights")
        entries: dict[str, TensorEntry] = {}
        for name in files:
            entries.update(read_header(self.dir / name))
        if weight_map is not None:
            missing = [n for n in weight_map if n not in entries]
            if missing:
                raise LlmcliError(f"tensor {missing[0]} is listed in {index.name} but not in {weight_map[missing[0]]}")
        return entries

    def names(self) -> list[str]:
        return list(self.entries)

    def file_of(self, name: str) -> Path:
        return self.entries[name].file

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read a tensor. With `out` (a contiguous CPU tensor of the same dtype and shape) the bytes
        go straight into it and `out` is returned: no temporary copy."""
        entry = self.entries[name]
        direct = (out is not None and out.device.type == "cpu" and out.dtype == entry.dtype
                  and tuple(out.shape) == entry.shape and out.is_contiguous())
        target = out if direct else torch.empty(entry.shape, dtype=entry.dtype)
        if entry.nbytes:
            view = memoryview(target.reshape(-1).view(torch.uint8).numpy())
            handle = self._handles.get(entry.file)
            if handle is None:
                handle = self._handles[entry.file] = open(entry.file, "rb")  # noqa: SIM115
            handle.seek(entry.start)
            if handle.readinto(view) != entry.nbytes:
                raise LlmcliError(f"{entry.file} ended while reading tensor {name}")
        return target

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype) -> torch.Tensor:
    """W = fp32(q) * scale of its block; the last blocks of each dimension are cropped."""
    rows, cols = weight.shape
    br, bc = block
    expected = (math.ceil(rows / br), math.ceil(cols / bc))
    if tuple(scale_inv.shape) != expected:
        raise LlmcliError(
            f"FP8 scale has shape {tuple(scale_inv.shape)}, expected {expected} for {tuple(weight.shape)}"
        )
    scale = scale_inv.float().repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    return (weight.float() * scale).to(dtype)


def checkpoint_tensors(ckpt: Checkpoint, fp8_block: tuple[int, int] | None, dtype) -> Iterator[tuple[str, Callable]]:
    """(name, loader) pairs; FP8 weights come out dequantised and their scales are consumed."""
    names = ckpt.names()
    present = set(names)
    for name in names:
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in present:
                raise LlmcliError(f"{name} in {ckpt.file_of(name)} has no matching weight")
            continue

        def load(name=name, out=None):
            tensor = ckpt.get(name, out)
            if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                scale_name = name + SCALE_SUFFIX
                if scale_name not in present:
                    raise LlmcliError(f"FP8 weight {name} in {ckpt.file_of(name)} has no {scale_name}")
                return dequantize_fp8(tensor, ckpt.get(scale_name), fp8_block or (128, 128), dtype)
            return tensor

        yield name, load


INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
                  "kaiming_normal_", "xavier_uniform_", "xavier_normal_")


@contextlib.contextmanager
def parameters_left_uninitialised():
    """Modules initialise their parameters in __init__. On the meta device that computes nothing, yet
    torch runs a meta `normal_` through torch._dynamo, and importing that costs ~75 MiB of resident
    memory (8% of a 0.5B model in bfloat16) in runs that never compile."""
    saved = {name: getattr(torch.nn.init, name) for name in INIT_FUNCTIONS if hasattr(torch.nn.init, name)}
    for name in saved:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def materialise(model_factory: Callable[[], torch.nn.Module], dtype, device) -> torch.nn.Module:
    """Build the model on the meta device, then allocate (without initialising) in dtype/device."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in dtype: no second copy to convert
    try:
        with torch.device("meta"), parameters_left_uninitialised():
            model = model_factory()
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device=device)
    model.init_buffers(device)
    return model


def load_weights(model: torch.nn.Module, model_dir: Path, progress: Callable[[int], None] | None = None,
                 loaded: Callable[[str], None] | None = None) -> list[str]:
    """Copy every checkpoint tensor into `model`, telling `loaded` each parameter name as it is filled.
    Returns notes (e.g. skipped tensors) for the caller.

    The model may define `checkpoint_tensors(name, load) -> list[(param_name, tensor)] | None`
    (None: skip the tensor) to rename, split or drop tensors."""
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers()))
    tied = model.tied_parameters() if hasattr(model, "tied_parameters") else set()
    expected = set(model.state_dict()) - tied
    dtype = next(iter(params.values())).dtype
    adapt = getattr(model, "checkpoint_tensors", None)
    seen: set[str] = set()
    notes: list[str] = []
    fp8_block = getattr(model.config, "fp8_block_size", None)
    with Checkpoint(model_dir) as ckpt, torch.no_grad():
        for name, load in checkpoint_tensors(ckpt, fp8_block, dtype):
            source = ckpt.file_of(name)
            if adapt is None:
                if name in tied:
                    continue  # a tied head saved alongside the embedding: same values
                param = params.get(name)
                pieces = [(name, load(out=param.data if param is not None else None))]
            else:
                pieces = adapt(name, load)
            if pieces is None:
                continue
            for target, tensor in pieces:
                if target in tied:
                    continue  # a tied head saved alongside the embedding: same values
                param = params.get(target)
                if param is None:
                    what = "appears twice" if target in seen else "is unexpected"
                    raise LlmcliError(f"tensor {name} in {source} {what}")
                if tuple(tensor.shape) != tuple(param.shape):
                    raise LlmcliError(
                        f"tensor {name} in {source} has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(param.shape)}"
                    )
                if tensor.data_ptr() != param.data_ptr():  # not already read in place
                    param.copy_(tensor.to(param.dtype))
                seen.add(target)
                del params[target]  # no reference left here: `loaded` may replace it (int8) and free it
                if loaded:
                    loaded(target)
                if progress:
                    progress(tensor.numel() * param.element_size())
                del tensor, param
    missing = sorted(expected - seen)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LlmcliError(f"tensor {missing[0]} is missing from the checkpoint in {model_dir}{more}")
    return notes + list(getattr(model, "load_notes", []))
