"""llmcli's CPU kernels (`kernels/*.cpp`): how they are built, cached and loaded.

torch's extension builder compiles them once per machine and torch version (a C++ compiler and ninja
are needed; about 10 s) into llmcli's cache, with -march=native: the code uses the instructions this
CPU has (AVX-512, AVX512-BF16). Where they cannot be built, llmcli keeps torch's own paths (slower,
same results up to rounding) and says so in one line. The kernels themselves are described in
int8_kernel.py and bf16_kernel.py; which layers use them is decided in prepare.py.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
import time
from pathlib import Path

import torch

from llmcli.paths import kernel_builds

SOURCES = [Path(__file__).with_name("kernels") / name for name in ("int8_gemv.cpp", "bf16_gemm.cpp")]
FLAGS = ["-O3", "-march=native", "-fopenmp"]


@functools.cache
def load_once() -> tuple[bool, str]:
    """Once per process (a library registers its ops when loaded, and a second registration aborts):
    (loaded, a note for the user, empty if none)."""
    start = time.perf_counter()
    try:
        compile_library("llmcli", FLAGS)
    except KernelBuildError as exc:
        return False, f"CPU kernels unavailable ({exc}); using torch's slower paths"
    register_fake()
    seconds = time.perf_counter() - start
    if seconds < 2:  # loaded from the cache: nothing worth saying
        return True, ""
    return True, f"built llmcli's CPU kernels in {seconds:.1f} s (cached for later runs)"


def has_avx512_bf16() -> bool:
    """Were the kernels built with AVX512-BF16 (this CPU has it)? Their bfloat16 products need it."""
    return load_once()[0] and bool(torch.ops.llmcli.built_with_avx512_bf16())


class KernelBuildError(Exception):
    pass


def compile_library(namespace: str, flags: list[str]) -> None:
    """Build the sources with `flags` (or reuse the cached build) and load them: the ops are then
    torch.ops.<namespace>.*. Other namespaces than "llmcli" are for tests (e.g. the portable loops)."""
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
        cpp_extension.load(directory.name, [str(s) for s in SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"],
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
    sources = b"".join(source.read_bytes() for source in SOURCES)
    key = hashlib.sha256(sources + " ".join([torch.__version__, *flags, cpu_model()]).encode())
    return kernel_builds() / f"{namespace}_{key.hexdigest()[:12]}"


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
    """Output shapes for torch.compile, which traces the ops without running them."""
    @torch.library.register_fake("llmcli::int8_gemv")
    def _(x, w, scales, experts):
        return x.new_empty(x.shape[0], w.shape[1] * w.shape[3])

    @torch.library.register_fake("llmcli::int8_unblock")
    def _(w, dtype):
        return w.new_empty(w.shape[0] * w.shape[2], w.shape[1] * w.shape[3], dtype=dtype)

    @torch.library.register_fake("llmcli::bf16_linear")
    def _(x, w, bias, experts):
        return x.new_empty(x.shape[0], w.shape[1] * w.shape[3])

    @torch.library.register_fake("llmcli::int8_gemm")
    def _(x, w, scales, bias):
        return x.new_empty(x.shape[0], w.shape[0] * w.shape[2])
