"""llmcli's CPU kernels (`kernels/*.cpp`): how they are built, cached and loaded.

torch's extension builder compiles them once per machine and torch version (a C++ compiler and ninja
are needed; 10-50 s) into llmcli's cache, with -march=native: the code uses the instructions this
CPU has (AVX-512, AVX512-BF16). Where they cannot be built, llmcli keeps torch's own paths (slower,
same results up to rounding) and says so in one line. The kernels themselves are described in
int8_kernel.py and bf16_kernel.py; which layers use them is decided in prepare.py.

Several processes may start on an empty cache at once: one builds, under a lock that the OS releases if
it dies, in a scratch folder renamed into place once the library is linked; the others wait and load
that. (torch's own lock is a file that a killed build leaves behind, and every later build then waits
for it forever; a build killed mid-way could also leave half-written files where the next one looks.)
Commands that answer a user (generate, chat, serve) do not wait for a first build: it runs in a background
process while they use torch's paths (`load_if_built`).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from llmcli.paths import kernel_builds

KERNELS = Path(__file__).with_name("kernels")
SOURCES = [KERNELS / name for name in ("int8_gemv.cpp", "bf16_gemm.cpp", "int_dot.cpp")]  # one compile each
# compiled inside int_dot.cpp's unit: torch's headers alone take ~10 s of a unit's compile on a 2-core machine
INCLUDED = [KERNELS / name for name in ("low_bit_block.cpp", "int6_dot.cpp", "decode_ops.cpp", "attention_chunks.cpp",
                                        "decode_layer.cpp", "deltanet_step.cpp", "dispatch.h")]
FLAGS = ["-O3", "-march=native", "-fopenmp"]
BUILD_WAIT_SECONDS = 600  # for another process's build (10-50 s); past this it is stuck, not slow


@functools.cache
def load_once() -> tuple[bool, str]:
    """Once per process (a library registers its ops when loaded, and a second registration aborts):
    (loaded, a note for the user, empty if none). Builds first when the cache has no build."""
    start = time.perf_counter()
    try:
        built = compile_library("llmcli", FLAGS)
    except KernelBuildError as exc:
        return False, f"CPU kernels unavailable ({exc}); using torch's slower paths"
    register_fake()
    seconds = time.perf_counter() - start
    if built:
        return True, f"built llmcli's CPU kernels in {seconds:.1f} s (cached for later runs)"
    if seconds >= 2:
        return True, f"waited {seconds:.1f} s for another llmcli process to build the CPU kernels"
    return True, ""  # loaded from the cache: nothing worth saying


_BUILDS_AT_EXIT: set[Path] = set()  # build folders this process starts a background build of when it exits


def load_if_built() -> tuple[bool, str]:
    """Like load_once, but never waits for a build: with none cached, start one in a background process (for
    the next run) and answer (False, a note). A first `llmcli generate` then answers in seconds on torch's
    paths instead of after a 10-50 s compile."""
    if load_once.cache_info().currsize:
        return load_once()
    directory = build_directory("llmcli", FLAGS)
    if library_of(directory).is_file():
        return load_once()
    if directory.is_dir():  # an earlier build failed there: say so once per run, do not retry in a loop
        return False, f"CPU kernels unavailable (their build failed: `ninja -C {directory}` shows why); " \
                      "using torch's slower paths"
    if building(directory):
        return False, "another llmcli process is building the CPU kernels; this run uses torch's slower paths"
    # at exit: a build beside this run would take its cores (OpenMP threads then wait on each other, 5-20x slower);
    # once, however many of the run's backends asked
    if directory not in _BUILDS_AT_EXIT:
        _BUILDS_AT_EXIT.add(directory)
        atexit.register(start_background_build, directory)
    return False, ("llmcli's CPU kernels are not built yet: this run uses torch's slower paths, and they build in "
                   f"the background when it ends (once, 10-50 s; log: {log_path(directory)})")


def library_of(directory: Path) -> Path:
    """The built library in a build folder, as torch's builder names it (gcc and clang platforms)."""
    return directory / f"{directory.name}.so"


def log_path(directory: Path) -> Path:
    return directory.with_name(f"{directory.name}.log")


def building(directory: Path) -> bool:
    """Does another process hold the build lock of `directory`?"""
    from filelock import FileLock, Timeout

    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(f"{directory}.lock", timeout=0):
            return False
    except Timeout:
        return True


def start_background_build(directory: Path) -> None:
    """Start `python -m llmcli.backends.cpu_kernels` detached and at low priority, unless one is building."""
    if building(directory) or library_of(directory).is_file():
        return
    log = log_path(directory)
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "llmcli.backends.cpu_kernels"], stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,  # outlives this run, and a Ctrl-C in its terminal
            preexec_fn=lambda: os.nice(10), close_fds=True)
    log.with_suffix(".pid").write_text(f"{process.pid}\n")


def has_avx512_bf16() -> bool:
    """Were the kernels built with AVX512-BF16 (this CPU has it)? Their bfloat16 products need it."""
    return load_once()[0] and bool(torch.ops.llmcli.built_with_avx512_bf16())


def bf16_isa() -> str | None:
    """What the bfloat16 kernel was built for here: "avx512_bf16", "avx2", "portable"; None when not built."""
    return str(torch.ops.llmcli.bf16_isa()) if load_once()[0] else None


class KernelBuildError(Exception):
    pass


def compile_library(namespace: str, flags: list[str]) -> bool:
    """Build the sources with `flags` (or reuse the cached build) and load them: the ops are then
    torch.ops.<namespace>.*. True when this process built them. Other namespaces than "llmcli" are for tests
    (e.g. the portable loops)."""
    directory = build_directory(namespace, flags)
    library = library_of(directory)
    if not library.is_file():
        with build_lock(directory):
            if not library.is_file():  # nor built by another process while this one waited
                build(directory, flags + [f"-DLLMCLI_OPS_NAMESPACE={namespace}"])
                return True
    try:
        torch.ops.load_library(str(library))
    except OSError as exc:  # e.g. a cache copied from another machine, or torch updated in place
        raise KernelBuildError(f"cannot load {library}: {str(exc).strip()[:150]}") from exc
    return False


def build_directory(namespace: str, flags: list[str]) -> Path:
    """Where a build lives, keyed by source, torch version, flags and CPU (-march=native code runs only
    on CPUs like this one)."""
    sources = b"".join(source.read_bytes() for source in SOURCES + INCLUDED)
    key = hashlib.sha256(sources + " ".join([torch.__version__, *flags, cpu_model()]).encode())
    return kernel_builds() / f"{namespace}_{key.hexdigest()[:12]}"


@contextmanager
def build_lock(directory: Path):
    """One build of `directory` at a time, across processes; the lock dies with its holder."""
    from filelock import FileLock, Timeout

    directory.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{directory}.lock")
    try:
        lock.acquire(timeout=BUILD_WAIT_SECONDS)
    except Timeout as exc:
        raise KernelBuildError(f"another process has been building them for {BUILD_WAIT_SECONDS} s") from exc
    try:
        yield
    finally:
        lock.release()


def build(directory: Path, flags: list[str]) -> None:
    """Build and load the library in a scratch folder, then rename that into `directory` (under the lock):
    the library appears there whole or not at all. A failed build is moved there too, for `ninja -C`."""
    from torch.utils import cpp_extension

    for leftover in directory.parent.glob(f"{directory.name}.build-*"):  # from builds killed mid-way
        shutil.rmtree(leftover, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{directory.name}.build-", dir=directory.parent))
    # torch logs a page-wide warning when the compiler is not the one it was built with: say it in one line
    cpp_logger = logging.getLogger(cpp_extension.__name__)
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        cpp_extension.load(directory.name, [str(s) for s in SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                           build_directory=str(scratch), is_python_module=False, verbose=False)
    except Exception as exc:  # no compiler, no ninja, an unsupported platform: fall back, say why
        (scratch / f"{directory.name}.so").unlink(missing_ok=True)
        move_into_place(scratch, directory)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if reason.startswith("Error building extension"):
            reason = f"the C++ build failed; `ninja -C {directory}` shows why"
        raise KernelBuildError(reason[:200]) from exc
    except BaseException:  # Ctrl-C: nothing to keep
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    finally:
        cpp_logger.setLevel(level)
    move_into_place(scratch, directory)


def move_into_place(scratch: Path, directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)  # a failed build (no library), or one from an older llmcli
    try:
        scratch.rename(directory)
    except OSError as exc:
        raise KernelBuildError(f"cannot move the build into {directory}: {exc}") from exc


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

    @torch.library.register_fake("llmcli::int8_dot")
    def _(x, w, scales, experts=None, bias=None):
        return x.new_empty(*x.shape[:-1], w.shape[-4] * w.shape[-2])

    # every low-bit layout (int4, int5, int8 per 32, Q6_K): sm [(E,) N/8, groups, S, 8] gives the outputs, w [N/8, K/32,
    # ...] the inputs
    @torch.library.register_fake("llmcli::int4_dot")
    def _(x, w, sm, experts=None, bias=None):
        return x.new_empty(*x.shape[:-1], sm.shape[-4] * sm.shape[-1])

    @torch.library.register_fake("llmcli::int4_unblock")
    def _(w, sm, dtype):
        return w.new_empty(sm.shape[0] * sm.shape[-1], w.shape[1] * 32, dtype=dtype)

    @torch.library.register_fake("llmcli::int6_dot")
    def _(x, w, sm, bias=None):
        return x.new_empty(*x.shape[:-1], w.shape[0] * 8)

    @torch.library.register_fake("llmcli::int6_unblock")
    def _(w, sm, dtype):
        return w.new_empty(w.shape[0] * 8, w.shape[1] * 32, dtype=dtype)

    @torch.library.register_fake("llmcli::int8_gemm")
    def _(x, w, scales, bias):
        return x.new_empty(x.shape[0], w.shape[0] * w.shape[2])


if __name__ == "__main__":  # the background build (start_background_build)
    print(f"building in {build_directory('llmcli', FLAGS)}", flush=True)
    try:
        compile_library("llmcli", FLAGS)
    except KernelBuildError as exc:
        print(f"failed: {exc}", flush=True)
        sys.exit(1)
    print("built", flush=True)
