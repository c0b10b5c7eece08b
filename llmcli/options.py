"""How the user asked llmcli to run: one `Options` object built at the edge (CLI flags, or the Python API's
keywords) and handed to loading; and the only place the documented LLMCLI_* environment overrides are read.

Environment variables (each read when `Options.from_env` or the function naming it is called, never at import):
  LLMCLI_HOME               llmcli's cache directory (paths.cache_home)
  LLMCLI_MODEL              the model a command uses when none is named
  LLMCLI_DEBUG              show a traceback for internal errors
  LLMCLI_BF16_KERNEL=0      do not use llmcli's bfloat16 CPU kernel
  LLMCLI_INT8_KERNEL=0      do not use llmcli's int8 CPU kernel
  LLMCLI_INT_DOT=0          int8/int4 decode on AVX2 without quantising activations to int8 (backends/int_dot.py)
  LLMCLI_FUSED_DECODE=0     eager CPU steps without llmcli's fused RMSNorm and attention ops
  LLMCLI_PREPACK=0          do not reorder bfloat16 weights for oneDNN
  LLMCLI_CUDA_GEMV=linear   CUDA compiled one-row products through cuBLAS instead of multiply-and-sum
  LLMCLI_REALIZE_THRESHOLD  inductor's realize_opcount_threshold for the compiled decode step
  LLMCLI_DIST_TIMEOUT       seconds a --tp/--ep run's collectives wait for the other ranks (default 600)
  LLMCLI_EXPERT_PRODUCTS    how a MoE layer's routed experts run many rows: "grouped" (sorted by expert, one
                            grouped product per projection), "loop" (expert after expert) or "auto" (grouped
                            on CUDA and for float32 weights on CPU, else the loop)
  LLMCLI_CROSSOVER          how many rows a product runs in llmcli's CPU kernels before a GEMM on the converted weight:
                            "measured" on this CPU once and cached (the default), "remeasure", "cached" (a figure
                            measured before, else the fixed ones; parallel runs) or "fixed" (the figures of the
                            project's own machine; the tests use them)
  LLMCLI_KERNEL_BUILD       when the CPU kernels are not built yet: "wait" for the build, or build them in the
                            "background" while this run uses torch's paths (generate, chat, run and serve
                            default to background, every other command waits)
and one of another tool: OLLAMA_MODELS, Ollama's model store (`ollama:NAME` models).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from llmcli.errors import LlmcliError

QUANTIZE_MODES = ("int8", "int5", "int4")
# "auto" (the CLI's default): a quantised GGUF file's own precision on CPU (loader.file_quantize), else none
AUTO_QUANTIZE = "auto"
CUDA_GEMV_MODES = ("sum", "linear")
KERNEL_BUILD_MODES = ("wait", "background")
EXPERT_PRODUCT_MODES = ("auto", "grouped", "loop")
CROSSOVER_MODES = ("measured", "remeasure", "cached", "fixed")


def _flag(name: str, default: bool = True) -> bool:
    value = os.environ.get(name)
    return default if value is None else value != "0"


@dataclass(frozen=True)
class Options:
    """Everything that decides how a loaded model runs (the model's numbers do not depend on it beyond
    rounding, except `quantize`)."""

    device: str = "auto"  # auto, cpu, cuda, mps
    dtype: str = "auto"  # auto (the checkpoint's), float32, bfloat16, float16
    quantize: str | None = None  # None, "int8" (a scale per output channel), "int5"/"int4" (scale + min per 32), "auto"
    compile: bool = False  # compile the one-token decode step (torch.compile)
    bf16_kernel: bool = True  # llmcli's bfloat16 CPU kernel, where the CPU has AVX512-BF16
    int8_kernel: bool = True  # llmcli's int8 CPU kernel, for --quantize int8
    int_dot: bool = True  # int8/int4 decode on AVX2 CPUs: activations quantised to int8, integer dot products
    fused_decode: bool = True  # eager CPU steps: fused RMSNorm and attention ops (backends/decode_ops.py)
    prepack: bool = True  # eager CPU bfloat16 linears in oneDNN's blocked layout where the kernel does not run
    cuda_gemv: str = "sum"  # CUDA compiled one-row products: "sum" (inductor's loop) or "linear" (cuBLAS)
    realize_threshold: int = 8  # inductor's realize_opcount_threshold for the compiled step
    check_memory: bool = True  # refuse to load a model larger than the available memory (--force: try anyway)
    tp: int = 1  # tensor-parallel ranks (under torchrun; llmcli.parallel_plan)
    ep: int = 1  # expert-parallel groups of DeepSeekMoE's routed experts
    dist_timeout: float = 600.0  # seconds a parallel run's collective waits for the others (ranks load at once)
    kernel_build: str | None = None  # unbuilt CPU kernels: "wait" or "background"; None: the command decides
    expert_products: str = "auto"  # routed experts over many rows: "grouped", "loop", or auto (CUDA, CPU float32)
    crossover: str = "measured"  # many-row products: kernel or converted weight, as measured here, or "fixed" figures

    def __post_init__(self) -> None:
        if self.quantize not in (None, AUTO_QUANTIZE, *QUANTIZE_MODES):
            raise LlmcliError(f"unknown --quantize {self.quantize!r}; choose one of {', '.join(QUANTIZE_MODES)}",
                              exit_code=2)
        if self.cuda_gemv not in CUDA_GEMV_MODES:
            raise LlmcliError(f"LLMCLI_CUDA_GEMV must be one of {', '.join(CUDA_GEMV_MODES)}, got {self.cuda_gemv!r}",
                              exit_code=2)
        if self.kernel_build not in (None, *KERNEL_BUILD_MODES):
            raise LlmcliError(f"LLMCLI_KERNEL_BUILD must be one of {', '.join(KERNEL_BUILD_MODES)}, got "
                              f"{self.kernel_build!r}", exit_code=2)

        if self.expert_products not in EXPERT_PRODUCT_MODES:
            raise LlmcliError(f"LLMCLI_EXPERT_PRODUCTS must be one of {', '.join(EXPERT_PRODUCT_MODES)}, got "
                              f"{self.expert_products!r}", exit_code=2)
        if self.crossover not in CROSSOVER_MODES:
            raise LlmcliError(f"LLMCLI_CROSSOVER must be one of {', '.join(CROSSOVER_MODES)}, got {self.crossover!r}",
                              exit_code=2)

    @classmethod
    def from_env(cls, **given) -> Options:
        """Options with the LLMCLI_* overrides applied, then `given` (flags win over the environment)."""
        unknown = set(given) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        try:
            threshold = int(os.environ.get("LLMCLI_REALIZE_THRESHOLD", "8"))
        except ValueError:
            raise LlmcliError("LLMCLI_REALIZE_THRESHOLD must be an integer", exit_code=2) from None
        try:
            timeout = float(os.environ.get("LLMCLI_DIST_TIMEOUT", "600"))
        except ValueError:
            raise LlmcliError("LLMCLI_DIST_TIMEOUT must be a number of seconds", exit_code=2) from None
        env = {
            "dist_timeout": timeout,
            "bf16_kernel": _flag("LLMCLI_BF16_KERNEL"),
            "int8_kernel": _flag("LLMCLI_INT8_KERNEL"),
            "int_dot": _flag("LLMCLI_INT_DOT"),
            "prepack": _flag("LLMCLI_PREPACK"),
            "fused_decode": _flag("LLMCLI_FUSED_DECODE"),
            "cuda_gemv": os.environ.get("LLMCLI_CUDA_GEMV", "sum"),
            "realize_threshold": threshold,
            "kernel_build": os.environ.get("LLMCLI_KERNEL_BUILD") or None,
            "expert_products": os.environ.get("LLMCLI_EXPERT_PRODUCTS") or "auto",
            "crossover": os.environ.get("LLMCLI_CROSSOVER") or "measured",
        }
        return cls(**{**env, **{k: v for k, v in given.items() if v is not None}})

    def replace(self, **changes) -> Options:
        return dataclasses.replace(self, **changes)


def home_override() -> str | None:
    """$LLMCLI_HOME: llmcli's cache directory, when set."""
    return os.environ.get("LLMCLI_HOME") or None


def default_model_override() -> str | None:
    """$LLMCLI_MODEL: the model commands use when none is named."""
    return os.environ.get("LLMCLI_MODEL") or None


def debug() -> bool:
    """$LLMCLI_DEBUG: internal errors show their traceback."""
    return bool(os.environ.get("LLMCLI_DEBUG"))


def ollama_models_override() -> str | None:
    """$OLLAMA_MODELS: where Ollama keeps its models, when not ~/.ollama/models."""
    return os.environ.get("OLLAMA_MODELS") or None
