"""Checkpoint reading: safetensors (single or sharded), one tensor at a time.

The model is built on the meta device, materialised uninitialised in the target dtype and device,
and each checkpoint tensor is converted and copied straight into its parameter, so peak memory is
the model plus one tensor. Families adapt names through the model's `checkpoint_tensors` (e.g.
original Qwen splits its fused QKV); FP8 block-quantised weights are dequantised here.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from llmcli.errors import LlmcliError
from llmcli.formats import safetensors
from llmcli.models.base import CausalLM

SCALE_SUFFIX = "_scale_inv"
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # e2m1


# safetensors dtype codes -> torch dtypes (those this torch has).
DTYPES = {code: getattr(torch, name) for code, name in safetensors.DTYPE_NAMES.items() if hasattr(torch, name)}


@dataclass
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


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
        infos = safetensors.read_checkpoint(self.dir)  # raises for a bad index or a listed shard that is missing
        if infos is None:  # no .safetensors files at all
            if any(any(self.dir.glob(pattern)) for pattern in ("*.bin", "*.pt", "*.pth")):  # glob: a lazy iterator
                raise LlmcliError(
                    f"{self.dir} has only pickle weights (.bin/.pt); llmcli loads safetensors only "
                    "because pickle files can execute code"
                )
            raise LlmcliError(f"{self.dir} has no *.safetensors weights")
        entries = {}
        for name, info in infos.items():
            if info.dtype not in DTYPES:  # a code the header reader knows but this torch lacks (e.g. F8_E8M0)
                raise LlmcliError(f"{info.file}: tensor {name} has dtype {info.dtype}, "
                                  f"which torch {torch.__version__} does not have")
            entries[name] = TensorEntry(info.file, DTYPES[info.dtype], info.shape, info.start, info.nbytes)
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
            handle = self.handle(entry.file)
            handle.seek(entry.start)
            if handle.readinto(view) != entry.nbytes:
                raise LlmcliError(f"{entry.file} ended while reading tensor {name}")
        return target

    def handle(self, file: Path):
        """The open file (opened once per checkpoint file)."""
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = open(file, "rb")  # noqa: SIM115
        return handle

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
    if weight.dim() != 2:  # block scales exist for matrices only; a header may claim anything
        raise LlmcliError(f"FP8 weight has shape {tuple(weight.shape)}; block-scaled weights are matrices")
    rows, cols = weight.shape
    br, bc = block
    expected = (math.ceil(rows / br), math.ceil(cols / bc))
    if tuple(scale_inv.shape) != expected:
        raise LlmcliError(
            f"FP8 scale has shape {tuple(scale_inv.shape)}, expected {expected} for {tuple(weight.shape)}"
        )
    scale = scale_inv.float().repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    return (weight.float() * scale).to(dtype)


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, dtype) -> torch.Tensor:
    """FP4 (e2m1) weights packed two per byte, low nibble first ([rows, cols / 2], int8 or uint8), times one
    scale per block of columns ([rows, cols / block]; DeepSeek-V4's experts: blocks of 32, ue8m0 scales)."""
    if packed.dim() != 2 or scale.dim() != 2:
        raise LlmcliError(f"FP4 weight {tuple(packed.shape)} / scale {tuple(scale.shape)}: both must be matrices")
    rows, cols = packed.shape[0], 2 * packed.shape[1]
    if scale.shape[0] != rows or not scale.shape[1] or cols % scale.shape[1]:
        raise LlmcliError(f"FP4 scale has shape {tuple(scale.shape)}, which does not tile the "
                          f"{rows} x {cols} values of a packed {tuple(packed.shape)} weight")
    nibbles = packed.contiguous().view(torch.uint8)
    codes = torch.stack((nibbles & 0xF, nibbles >> 4), dim=-1).reshape(rows, cols).long()
    values = torch.tensor(FP4_VALUES)[codes]
    factor = scale.view(torch.uint8).float().sub(127).exp2() if scale.dtype in (torch.uint8, torch.float8_e8m0fnu) \
        else scale.float()
    return (values.view(rows, scale.shape[1], -1) * factor[..., None]).view(rows, cols).to(dtype)


def scale_name_of(name: str, present: set[str]) -> str | None:
    """The block scales of weight `name`: `<name>_scale_inv` (transformers), or `<stem>.scale` beside
    `<stem>.weight` (DeepSeek-V4's reference naming)."""
    stem = name.removesuffix(".weight")
    for candidate in (name + SCALE_SUFFIX, stem + ".scale" if stem != name else None):
        if candidate in present:
            return candidate
    return None


def is_scale(name: str, present: set[str]) -> bool:
    return name.endswith(SCALE_SUFFIX) or (name.endswith(".scale") and name[:-6] + ".weight" in present)


def checkpoint_tensors(ckpt: Checkpoint, fp8_block: tuple[int, int] | None, dtype) -> Iterator[tuple[str, Callable]]:
    """(name, loader) pairs; FP8 (and FP4-packed) weights come out dequantised and their scales are consumed."""
    names = ckpt.names()
    present = set(names)
    for name in names:
        if is_scale(name, present):
            if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] not in present:
                raise LlmcliError(f"{name} in {ckpt.file_of(name)} has no matching weight")
            continue

        def load(name=name, out=None):
            tensor = ckpt.get(name, out)
            scale_name = scale_name_of(name, present)
            if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                if scale_name is None:
                    raise LlmcliError(f"FP8 weight {name} in {ckpt.file_of(name)} has no {name + SCALE_SUFFIX}")
                return dequantize_fp8(tensor, ckpt.get(scale_name), fp8_block or (128, 128), dtype)
            if tensor.dtype in (torch.int8, torch.uint8) and scale_name is not None:
                return dequantize_fp4(tensor, ckpt.get(scale_name), dtype)
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


def materialise(model_factory: Callable[[], CausalLM], dtype, device) -> CausalLM:
    """Build the model on the meta device, then allocate (without initialising) in dtype/device."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in dtype: no second copy to convert
    try:
        with torch.device("meta"), parameters_left_uninitialised():
            model = model_factory()
    finally:
        torch.set_default_dtype(previous)
    # Not Module.to_empty: its empty_like on meta tensors imports torch's meta registrations and sympy (about
    # 1 s, a fifth of a first answer); empty() of the same shape allocates the same uninitialised memory.
    model = model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    model.init_buffers(device)
    return model


def load_weights(model: CausalLM, model_dir: Path, progress: Callable[[int], None] | None = None,
                 loaded: Callable[[str], None] | None = None,
                 tensors: Iterable[tuple[str, Path, Callable]] | None = None) -> list[str]:
    """Copy every checkpoint tensor into `model`, telling `loaded` each parameter name as it is filled.
    Returns notes (e.g. skipped tensors) for the caller. The model's `checkpoint_tensors` renames, splits
    or drops tensors; a tensor under its own name is read straight into its parameter. `tensors` gives
    (name, file, load) from another format (GGUF) instead of the safetensors files in `model_dir`."""
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers()))
    tied = model.tied_parameters()
    expected = set(model.state_dict()) - tied
    dtype = next(iter(params.values())).dtype
    seen: set[str] = set()
    with contextlib.ExitStack() as stack, torch.no_grad():
        if tensors is None:
            ckpt = stack.enter_context(Checkpoint(model_dir))
            tensors = ((name, ckpt.file_of(name), load)
                       for name, load in checkpoint_tensors(ckpt, model.config.fp8_block_size, dtype))
        for name, source, load in tensors:
            if name in tied:
                continue  # a tied head saved alongside the embedding: same values
            destination = params.get(name)
            pieces = list(model.checkpoint_tensors(
                name, functools.partial(load, out=destination.data if destination is not None else None)) or ())
            del destination
            while pieces:  # popped, so that nothing here holds a tensor once `loaded` has replaced it (int8, int4)
                # or while the next is read (a float head alive through the embedding's read: Qwen2.5-7B shape's BF16
                # file under --quantize int4 peaked at 1.52x its weights, now 1.31x)
                target, tensor = pieces.pop(0)
                if target in tied:
                    continue
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
                size = tensor.numel() * param.element_size()
                del params[target], tensor, param  # no reference left here: `loaded` may replace it and free it
                if loaded:
                    loaded(target)
                if progress:
                    progress(size)
    missing = sorted(expected - seen)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LlmcliError(f"tensor {missing[0]} is missing from the checkpoint in {model_dir}{more}")
    return model.load_notes()
