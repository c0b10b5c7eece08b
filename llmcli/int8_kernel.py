"""The int8 decode kernel: weight-only int8 products for a few rows, on CPU, from `kernels/int8_gemv.cpp`.

A decode step reads every weight once, so int8 should be twice as fast as bf16. torch's own one-row
paths read int8 weights at about half the memory bandwidth here (benchmarks/int8_gemv.py: 12-20 GB/s
for inductor's loop, 15 GB/s for `_weight_int8pack_mm`), which left int8 only 1.14x faster than
bf16 with --compile. This kernel reads weights stored in blocks of 8 rows x 16 inputs, in the order it
uses them, at about 30 GB/s.

It is compiled once per machine and torch version with torch's extension builder (a C++ compiler and
ninja are needed; about 8 s) into llmcli's cache. Where it cannot be built, int8 layers keep their
row-major weights and torch's kernels: slower, same results up to rounding.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import time
from pathlib import Path

import torch

ROWS, CHUNK = 8, 16  # the kernel's block: output rows x inputs (kRows, kChunk in the C++ source)
SOURCE = Path(__file__).with_name("kernels") / "int8_gemv.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp"]


def build() -> tuple[bool, str]:
    """Build (or load the cached build of) the kernel: (usable, a note for the user, empty if none)."""
    if os.environ.get("LLMCLI_INT8_KERNEL", "1") == "0":
        return False, "int8 decode kernel disabled (LLMCLI_INT8_KERNEL=0)"
    return load_once()


@functools.cache
def load_once() -> tuple[bool, str]:
    """Once per process: a library registers its ops when loaded, and a second registration aborts."""
    start = time.perf_counter()
    try:
        compile_library("llmcli", FLAGS)
    except KernelBuildError as exc:
        return False, f"int8 decode kernel unavailable ({exc}); using torch's slower int8 paths"
    register_fake()
    seconds = time.perf_counter() - start
    if seconds < 2:  # loaded from the cache: nothing worth saying
        return True, ""
    return True, f"built the int8 decode kernel in {seconds:.1f} s (cached for later runs)"


class KernelBuildError(Exception):
    pass


def compile_library(namespace: str, flags: list[str]) -> None:
    """Build the source with `flags` (or reuse the cached build) and load it: its op is then
    torch.ops.<namespace>.int8_gemv. Other namespaces are for tests (e.g. the portable loop)."""
    from torch.utils import cpp_extension

    directory = build_directory(namespace, flags)
    flags = [*flags, f"-DLLMCLI_OPS_NAMESPACE={namespace}"]
    remove_stale_lock(directory / "lock")
    # torch logs a page-wide warning when the compiler is not the one it was built with: say it in one line
    cpp_logger = logging.getLogger(cpp_extension.__name__)
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(directory.name, [str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                           build_directory=str(directory), is_python_module=False, verbose=False)
    except Exception as exc:  # no compiler, no ninja, an unsupported platform: fall back, say why
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if reason.startswith("Error building extension"):
            reason = f"the C++ build failed; `ninja -C {directory}` shows why"
        raise KernelBuildError(reason[:200]) from exc
    finally:
        cpp_logger.setLevel(level)


def build_directory(namespace: str, flags: list[str]) -> Path:
    """Where a build lives, keyed by source, torch version, flags and CPU (-march=native code runs only
    on CPUs like this one)."""
    from llmcli.demo import cache_home

    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([torch.__version__, *flags, cpu_model()]).encode())
    return cache_home() / "extensions" / f"{namespace}_int8_{key.hexdigest()[:12]}"


STALE_LOCK_SECONDS = 300  # a build takes 5-30 s


def remove_stale_lock(lock: Path) -> None:
    """torch's builder waits, without limit, for the lock file of a build in progress to go away; a build
    killed mid-way leaves it behind, which would hang every later run."""
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            lock.unlink()
    except FileNotFoundError:
        pass


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def register_fake() -> None:
    """Output shapes for torch.compile, which traces the op without running it."""
    @torch.library.register_fake("llmcli::int8_gemv")
    def _(x, w, scales, experts):
        return x.new_empty(x.shape[0], w.shape[1] * w.shape[3])

    @torch.library.register_fake("llmcli::int8_unblock")
    def _(w, dtype):
        return w.new_empty(w.shape[0] * w.shape[2], w.shape[1] * w.shape[3], dtype=dtype)


def fits(shape: torch.Size | tuple[int, ...]) -> bool:
    """Can a [out, in] weight be stored in the kernel's blocks?"""
    return len(shape) == 2 and shape[0] % ROWS == 0 and shape[1] % CHUNK == 0


def usable(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and fits(weight.shape) and build()[0]


def to_blocks(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] int8 -> [out/8, in/16, 8, 16]: each block of 8 rows stored in the order the kernel reads it."""
    out, inputs = weight.shape
    return weight.reshape(out // ROWS, ROWS, inputs // CHUNK, CHUNK).permute(0, 2, 1, 3).contiguous()


def from_blocks(blocks: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The inverse of `to_blocks`: a row-major copy (converted to `dtype` in the same pass), for products
    over many rows. The kernel's loop is 2.2x faster than torch's strided copy (1.2 ms for 9728x896)."""
    return torch.ops.llmcli.int8_unblock(blocks, dtype or blocks.dtype)


def gemv(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
         experts: torch.Tensor | None = None) -> torch.Tensor:
    """(x @ w.T) * scales for x [..., in] with few rows. `blocks` is one matrix [out/8, in/16, 8, 16] with
    scales [out], or a stack [E, ...] with scales [E, out] and `experts` naming each row's matrix."""
    if blocks.dim() == 4:
        blocks, scales = blocks.unsqueeze(0), scales.unsqueeze(0)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.ops.llmcli.int8_gemv(rows, blocks, scales.to(x.dtype), experts)
    return out.reshape(*x.shape[:-1], out.shape[-1])
