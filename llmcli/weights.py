"""Checkpoint reading: safetensors (single or sharded), memory-mapped, one tensor at a time.

The model is built on the meta device, materialised uninitialised in the target dtype and device,
and each checkpoint tensor is converted and copied straight into its parameter, so peak memory is
the model plus one tensor. Families adapt names through the model's optional `checkpoint_tensors`
hook (e.g. original Qwen splits its fused QKV); FP8 block-quantised weights are dequantised here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from llmcli.errors import LlmcliError

SCALE_SUFFIX = "_scale_inv"


class Checkpoint:
    """Names and lazily read tensors of a safetensors checkpoint directory."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}
        self.files = self._shard_map()

    def _shard_map(self) -> dict[str, str]:
        """tensor name -> file name."""
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise LlmcliError(f"{index} is not a valid safetensors index: {exc}") from exc
            for name in set(weight_map.values()):
                if not (self.dir / name).is_file():
                    raise LlmcliError(f"{self.dir / name} is listed in the index but missing")
            return dict(weight_map)
        files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            if list(self.dir.glob("*.bin")) or list(self.dir.glob("*.pt")) or list(self.dir.glob("*.pth")):
                raise LlmcliError(
                    f"{self.dir} has only pickle weights (.bin/.pt); llmcli loads safetensors only "
                    "because pickle files can execute code"
                )
            raise LlmcliError(f"{self.dir} has no *.safetensors weights")
        mapping = {}
        for name in files:
            for key in self._open(name).keys():
                mapping[key] = name
        return mapping

    def _open(self, file_name: str):
        handle = self._handles.get(file_name)
        if handle is None:
            path = self.dir / file_name
            try:
                handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
            except (SafetensorError, OSError, ValueError) as exc:
                raise LlmcliError(f"{path} is not a readable safetensors file: {exc}") from exc
            self._handles[file_name] = handle
        return handle

    def names(self) -> list[str]:
        return list(self.files)

    def file_of(self, name: str) -> Path:
        return self.dir / self.files[name]

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._open(self.files[name]).get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise LlmcliError(f"cannot read tensor {name} from {self.file_of(name)}: {exc}") from exc

    def shape(self, name: str) -> list[int]:
        return list(self._open(self.files[name]).get_slice(name).get_shape())

    def close(self) -> None:
        self._stack.close()
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

        def load(name=name):
            tensor = ckpt.get(name)
            if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                scale_name = name + SCALE_SUFFIX
                if scale_name not in present:
                    raise LlmcliError(f"FP8 weight {name} in {ckpt.file_of(name)} has no {scale_name}")
                return dequantize_fp8(tensor, ckpt.get(scale_name), fp8_block or (128, 128), dtype)
            return tensor

        yield name, load


def materialise(model_factory: Callable[[], torch.nn.Module], dtype, device) -> torch.nn.Module:
    """Build the model on the meta device, then allocate (without initialising) in dtype/device."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in dtype: no second copy to convert
    try:
        with torch.device("meta"):
            model = model_factory()
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device=device)
    model.init_buffers(device)
    return model


def load_weights(model: torch.nn.Module, model_dir: Path, progress: Callable[[int], None] | None = None) -> list[str]:
    """Copy every checkpoint tensor into `model`. Returns notes (e.g. skipped tensors) for the caller.

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
            pieces = adapt(name, load) if adapt else [(name, load())]
            if pieces is None:
                continue
            for target, tensor in pieces:
                if target in tied:
                    continue  # a tied head saved alongside the embedding: same values
                param = params.get(target)
                if param is None:
                    raise LlmcliError(f"unexpected tensor {name} in {source}")
                if tuple(tensor.shape) != tuple(param.shape):
                    raise LlmcliError(
                        f"tensor {name} in {source} has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(param.shape)}"
                    )
                param.copy_(tensor.to(param.dtype))
                seen.add(target)
                if progress:
                    progress(tensor.numel() * param.element_size())
                del tensor
    missing = sorted(expected - seen)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LlmcliError(f"tensor {missing[0]} is missing from the checkpoint in {model_dir}{more}")
    return notes + list(getattr(model, "load_notes", []))
