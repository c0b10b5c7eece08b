"""Model directory -> ready model: config, device and dtype choice, weights, tokenizer."""

from __future__ import annotations

import ctypes
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmcli.config import ModelConfig, load_config
from llmcli.errors import LlmcliError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str = "auto") -> torch.device:
    if name not in DEVICES:
        raise LlmcliError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}", exit_code=2)
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if name == "cuda" and not cuda:
        raise LlmcliError("--device cuda: CUDA is not available on this machine", exit_code=2)
    if name == "mps" and not mps:
        raise LlmcliError("--device mps: MPS is not available on this machine", exit_code=2)
    return torch.device(name)


def resolve_dtype(name: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """auto: the checkpoint's dtype (FP8 checkpoints: bfloat16); float32 when it is unknown."""
    if name != "auto":
        if name not in DTYPES:
            raise LlmcliError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}", exit_code=2)
        return DTYPES[name]
    saved = (cfg.torch_dtype or "").replace("torch.", "")
    if cfg.fp8_block_size is not None:
        return torch.bfloat16
    if saved in DTYPES:
        if saved == "float16" and device.type == "cpu":
            return torch.bfloat16  # CPU float16 matmuls are slow; bfloat16 keeps the range
        return DTYPES[saved]
    return torch.float32


def model_class(cfg: ModelConfig):
    if cfg.family in ("qwen", "qwen2", "qwen3"):
        from llmcli.models.qwen import QwenForCausalLM

        return QwenForCausalLM
    if cfg.family in ("deepseek_v2", "deepseek_v3"):
        from llmcli.models.deepseek import DeepseekForCausalLM

        return DeepseekForCausalLM
    raise LlmcliError(f"no model implementation for {cfg.family!r}")


QUANTIZE_MODES = ("int8",)


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only). Moving thousands of MiB-sized expert weights
    into stacks leaves the old ones as free heap chunks that the stacks (separately mapped) never reuse:
    measured +430 MiB resident on the DeepSeek-V3-shaped benchmark model without this."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def prepare_weights(module: torch.nn.Module, quantize: str | None, keep, prefix: str = "",
                    pack: bool = False, compiled: bool = False) -> None:
    """Fuse projections that read the same input, quantise, and reorder bfloat16 linears for CPU products
    (`pack`; for a `compiled` step only into layouts it can read), within `module`: a decoder layer as soon
    as its tensors are loaded, then the whole model (parts already done are left alone)."""
    for part in [m for m in module.modules() if hasattr(m, "fuse_projections")]:  # parents only
        if not getattr(part, "projections_fused", False):
            part.fuse_projections()
            part.projections_fused = True
    if quantize == "int8":
        from llmcli.quantize import quantize_model

        quantize_model(module, skip=lambda name: keep(prefix + name))
    if pack:
        from llmcli.models.packed import pack_linears

        pack_linears(module, keep=lambda name: keep(prefix + name), compiled=compiled)


class LayerwisePreparation:
    """Called with each parameter name as it is loaded: prepares each MoE expert, then each decoder layer,
    once all of its tensors are in, and frees what that replaced before more is read (the model is
    allocated but untouched pages take no memory). So the load peaks at about the final model plus one
    layer's dense part or one expert, instead of the loaded and the final weights together (a MoE layer
    of DeepSeek-V3 is 22 GB in bfloat16). Measured before: Qwen2.5-0.5B shape, int8, 1.97x the
    weights; DeepSeek-V3 shape, bfloat16 reordered for oneDNN, 1.21x."""

    UNITS = (re.compile(r"^(.*?\.layers\.\d+\.mlp\.experts\.\d+\.)"), re.compile(r"^(.*?\.layers\.\d+\.)"))

    def __init__(self, model: torch.nn.Module, quantize: str | None, keep, pack: bool, compiled: bool = False):
        self.model, self.quantize, self.keep, self.pack, self.compiled = model, quantize, keep, pack, compiled
        self.pending: dict[str, set[str]] = {}
        for name in model.state_dict():
            for prefix in self.prefixes(name):
                self.pending.setdefault(prefix, set()).add(name)

    def prefixes(self, name: str) -> list[str]:
        """The units `name` belongs to, innermost first."""
        return [match.group(1) for match in (unit.match(name) for unit in self.UNITS) if match]

    def __call__(self, name: str) -> None:
        for prefix in self.prefixes(name):
            remaining = self.pending.get(prefix)
            if remaining is None:
                continue
            remaining.discard(name)
            if not remaining:
                del self.pending[prefix]
                with torch.no_grad():
                    prepare_weights(self.model.get_submodule(prefix[:-1]), self.quantize, self.keep, prefix, self.pack,
                                    self.compiled)
                if prefix == self.prefixes(prefix)[-1]:  # a whole layer: trimming after every expert took 8 ms each
                    release_freed_memory()


def build_model(cfg: ModelConfig, model_dir: Path, dtype: torch.dtype, device: torch.device,
                quantize: str | None = None, compile: bool = False):
    from llmcli.weights import load_weights, materialise

    cls = model_class(cfg)
    model = materialise(lambda: cls(cfg), dtype, device)
    keep = getattr(model, "keeps_dense_weight", lambda name: False)
    notes = []
    if device.type == "cpu" and (quantize == "int8" or dtype == torch.bfloat16):
        from llmcli import bf16_kernel, int8_kernel

        note = (int8_kernel if quantize == "int8" else bf16_kernel).build()[1]
        notes += [note] if note else []
    # bfloat16 linears are reordered for CPU products; the compiled step reads plain or kernel layouts only.
    pack = device.type == "cpu"
    preparation = LayerwisePreparation(model, quantize, keep, pack, compile)
    notes = load_weights(model, model_dir, loaded=preparation) + notes
    with torch.no_grad():
        # what is outside the layers (the head), and any layer left
        prepare_weights(model, quantize, keep, pack=pack, compiled=compile)
        release_freed_memory()
        for module in [m for m in model.modules() if hasattr(m, "stack_experts")]:
            if compile or module.experts_in_kernel_blocks():  # eager: a decode step's experts in 2 calls
                module.stack_experts()
                release_freed_memory()
    model.eval()
    if compile:
        from llmcli.compile import enable_compiled_decode

        enable_compiled_decode(model, device)
    return model, notes


@dataclass
class LoadedModel:
    name: str
    path: Path
    config: ModelConfig
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    notes: list[str] = field(default_factory=list)


def load_model(name: str, path: Path, device: str = "auto", dtype: str = "auto",
               quantize: str | None = None, compile: bool = False) -> LoadedModel:
    from llmcli.tokenizer import Tokenizer

    path = Path(path)
    if not path.is_dir():
        raise LlmcliError(f"{path} is not a directory")
    dev = resolve_device(device)
    cfg = load_config(path)
    dt = resolve_dtype(dtype, cfg, dev)
    if quantize not in (None, *QUANTIZE_MODES):
        raise LlmcliError(f"unknown --quantize {quantize!r}; choose {', '.join(QUANTIZE_MODES)}", exit_code=2)
    start = time.perf_counter()
    tokenizer = Tokenizer.from_dir(path)
    with torch.inference_mode(False):
        model, notes = build_model(cfg, path, dt, dev, quantize, compile)
    return LoadedModel(name, path, cfg, model, tokenizer, dev, dt, time.perf_counter() - start, notes)
