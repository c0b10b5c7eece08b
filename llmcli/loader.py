"""Model directory -> ready model: config, device and dtype choice, weights prepared for the options,
tokenizer."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmcli import memory
from llmcli.backends import int4, int_dot
from llmcli.backends.prepare import Preparation
from llmcli.backends.runner import Runner
from llmcli.chat_dsv4 import with_v4_chat_format
from llmcli.chat_dsv32 import with_builtin_chat_format
from llmcli.config import ModelConfig, load_config
from llmcli.errors import LlmcliError
from llmcli.formats.gguf import gguf_path_of, nearest_quantize
from llmcli.formats.gguf_int4 import INT4_TYPES, INT5_TYPES, Q6_TYPES, int8_runs_take_as_stored
from llmcli.formats.safetensors import read_checkpoint
from llmcli.gguf_load import GGUFSource
from llmcli.models.base import CausalLM
from llmcli.options import AUTO_QUANTIZE, Options
from llmcli.parallel_plan import check_layout
from llmcli.tokenizer import Tokenizer
from llmcli.weights import load_weights, materialise

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


def model_class(cfg: ModelConfig) -> type[CausalLM]:
    """The family's model (imported here: a first answer should not wait for every family's modules)."""
    if cfg.family in ("qwen", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "llama"):
        from llmcli.models.qwen import QwenForCausalLM

        return QwenForCausalLM
    if cfg.family in ("deepseek_v2", "deepseek_v3", "deepseek_v32"):
        from llmcli.models.deepseek import DeepseekForCausalLM

        return DeepseekForCausalLM
    if cfg.family == "deepseek_v4":
        from llmcli.models.deepseek_v4 import DeepseekV4ForCausalLM

        return DeepseekV4ForCausalLM
    if cfg.layer_types:  # Qwen3-Next, Qwen3.5, Qwen3.5-MoE: Gated DeltaNet + gated attention
        from llmcli.models.qwen_hybrid import QwenHybridForCausalLM

        return QwenHybridForCausalLM
    raise LlmcliError(f"no model implementation for {cfg.family!r}")


def build_model(cfg: ModelConfig, model_dir: Path, dtype: torch.dtype, device: torch.device,
                options: Options, gguf: GGUFSource | None = None) -> tuple[Runner, list[str]]:
    """The model with its weights, prepared for `options` layer by layer as they load; its runner.
    `gguf`: a GGUF model's tensors instead of model_dir's safetensors (its 4-bit weights taken as stored under
    --quantize int4, without reading them as floats first: see `Preparation`)."""
    cls = model_class(cfg)
    model = materialise(lambda: cls(cfg), dtype, device)
    preparation = Preparation(model, options, gguf)
    tensors = gguf.tensors(unread=preparation.takes_stored_int4) if gguf else None
    notes = load_weights(model, model_dir, loaded=preparation.loaded, tensors=tensors)
    preparation.finish()
    return preparation.runner(), notes + preparation.notes


def file_quantize(gguf: GGUFSource | None, device: torch.device) -> tuple[str | None, str]:
    """--quantize auto: the integer format nearest a quantised GGUF file's layers on CPU (None elsewhere, and for
    float files and checkpoint directories), and a note saying so."""
    bits = gguf.gguf.layer_bits() if gguf is not None else None
    if bits is None or device.type != "cpu":
        return None, ""
    chosen = nearest_quantize(bits)
    if chosen == "int5" and not int_dot.runs_fast():  # int5 has no path but the AVX2 integer kernel
        chosen = nearest_quantize(bits, int5=False)
    if chosen in ("int4", "int5") and int4.available(device.type):
        return chosen, (f"the file's layers are {bits:.1f} bits a weight: running them in {chosen} "
                        f"({low_bit_note(gguf, chosen)}); --quantize int8 keeps more, none dequantises to --dtype")
    types = gguf.layer_types()
    kept = sorted(types) if int_dot.runs_fast() and int8_runs_take_as_stored(types) else []
    as_stored = f"; its {' and '.join(kept)} codes as stored" if kept else ""
    return "int8", (f"the file's layers are {bits:.1f} bits a weight: running them in int8{as_stored}; --quantize "
                    "int5 or int4 reads fewer bytes (re-quantised), none dequantises to --dtype")


def low_bit_note(gguf: GGUFSource, chosen: str) -> str:
    """What an int4 or int5 run of a file does with its layers' types: e.g. "4-bit codes as stored; Q5_0 codes as
    stored, Q6_K re-quantised, in int5" (an int4 run's wider parts take int5 where its kernel runs)."""
    types = gguf.layer_types()
    wide = gguf.gguf.wide_layer_types() if chosen == "int4" and int_dot.runs_fast() else set()
    kept = set(INT4_TYPES + (INT5_TYPES if chosen == "int5" else ()))

    def listed(names: set[str], what: str) -> list[str]:
        return [f"{', '.join(sorted(names))} {what}"] if names else []

    stored = "4-bit codes as stored" if chosen == "int4" else "4- and 5-bit codes as stored"
    note = ", ".join([stored, *listed(types - kept - wide, "re-quantised")])
    in_int5 = listed(wide & set(INT5_TYPES), "codes as stored") + listed(wide - set(INT5_TYPES), "re-quantised")
    head = "; its Q6_K head as stored" if int_dot.runs_fast() and gguf.gguf.head_type() in Q6_TYPES else ""
    return note + (f"; {', '.join(in_int5)}, in int5" if in_int5 else "") + head


def check_memory(cfg: ModelConfig, model_dir: Path, dtype: torch.dtype, device: torch.device,
                 quantize: str | None, tensors=None) -> None:
    """Stop, before any weight is read, when the model will not fit in the memory left (llmcli.memory says
    what it counts). Only the safetensors headers are read (or a GGUF model's `tensors`); without weights
    loading reports what is missing."""
    tensors = read_checkpoint(model_dir) if tensors is None else tensors
    if tensors is None:
        return
    name = str(dtype).removeprefix("torch.")
    needed = memory.for_checkpoint(cfg, tensors, name, quantize)
    instead = memory.for_checkpoint(cfg, tensors, name, "int8") if quantize is None else None
    if device.type == "cuda":
        memory.require(needed, torch.cuda.mem_get_info(device)[0], f"GPU memory on {device}", instead)
    else:  # CPU, and MPS's memory shared with it
        memory.require(needed, memory.available_bytes(), "memory", instead)


@dataclass
class LoadedModel:
    name: str
    path: Path
    config: ModelConfig
    runner: Runner  # what drivers call: the model, with its compiled decode step under --compile
    tokenizer: Tokenizer
    device: torch.device
    dtype: torch.dtype
    options: Options
    load_seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def model(self) -> CausalLM:
        return self.runner.model


def load_model(name: str, path: Path, options: Options | None = None, **settings) -> LoadedModel:
    """Load the model in directory `path` (or the GGUF file it is or holds) for `options` (built from the
    environment and `settings`, e.g. device="cpu", dtype="bfloat16", quantize="int8", compile=True, when not given)."""
    options = options.replace(**settings) if options is not None else Options.from_env(**settings)
    path = Path(path)
    gguf = GGUFSource(gguf_file) if (gguf_file := gguf_path_of(path)) is not None else None
    if gguf is None and not path.is_dir():
        raise LlmcliError(f"{path} is not a model directory or a .gguf file")
    dev = resolve_device(options.device)
    cfg = gguf.config if gguf else load_config(path)
    notes: list[str] = []
    if options.quantize == AUTO_QUANTIZE:
        quantize, note = file_quantize(gguf, dev)
        options, notes = options.replace(quantize=quantize), [note] if note else []
    layout = None
    if options.tp > 1 or options.ep > 1:  # a share of the model per torchrun process: llmcli.backends.parallel
        from llmcli.backends import parallel

        if options.compile and cfg.is_moe:  # a rank's share of the routed experts depends on the tokens' routes
            raise LlmcliError("--compile with --tp/--ep runs dense models; leave it out for this MoE model",
                              exit_code=2)
        layout, dev = parallel.start(check_layout(cfg, options.tp, options.ep, gguf is not None), options, dev)
    dt = resolve_dtype(options.dtype, cfg, dev)
    if options.check_memory and layout is not None:
        parallel.check_rank_memory(cfg, layout, dt, dev)
    elif options.check_memory:
        check_memory(cfg, path, dt, dev, options.quantize, gguf.tensor_infos() if gguf else None)
    start = time.perf_counter()
    if gguf:
        gguf.check_tokenizer()  # a tokenizer that cannot be built stops the run now, not after the weights
    with ThreadPoolExecutor(1) as pool, torch.inference_mode(False):
        # a GGUF's tokenizer builds (Python and Rust, 0.3 s for SmolLM2) while the weights load (torch's ops,
        # which release the GIL); a directory's tokenizer.json loads at once, so a broken one stops the run first
        building = pool.submit(gguf.tokenizer) if gguf else None
        tokenizer = None if gguf else Tokenizer.from_dir(path)
        if layout is not None:
            runner, loaded_notes = parallel.build_parallel(model_class(cfg), cfg, path, dt, dev, options, layout)
        else:
            runner, loaded_notes = build_model(cfg, path, dt, dev, options, gguf)
        tokenizer = building.result() if building is not None else tokenizer
        tokenizer = with_v4_chat_format(with_builtin_chat_format(tokenizer, cfg.family), cfg.family)
    return LoadedModel(name, path, cfg, runner, tokenizer, dev, dt, options, time.perf_counter() - start,
                       notes + loaded_notes)
