"""What the machine is and does, for `bench`: the device's name, its memory bandwidth (measured once and
cached), whether weights get huge pages, and the peak memory of one run."""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import re
import resource
import socket
import sys
import time
from pathlib import Path

import torch

from llmcli.generate import synchronize
from llmcli.openmp import load_average  # other work makes a bandwidth figure low
from llmcli.paths import cache_home

# -- pages ---------------------------------------------------------------------------------------

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode(mode_file: Path = THP_MODE) -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise" or "never"), None where there is none."""
    try:
        text = mode_file.read_text()
        return text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        return None


def mapping_fields(address: int) -> dict[str, str] | None:
    """The /proc/self/smaps fields (e.g. "AnonHugePages", "VmFlags") of the mapping that holds `address`; None where
    that cannot be read."""
    fields, inside = {}, False
    try:
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                head, _, rest = line.partition(" ")
                if head.endswith(":"):
                    if inside:
                        fields[head[:-1]] = rest.strip()
                elif "-" in head:
                    if inside:
                        break
                    start, end = (int(part, 16) for part in head.split("-"))
                    inside = start <= address < end
    except (OSError, ValueError):
        return None
    return fields or None


def torch_asks_for_huge_pages() -> bool | None:
    """Does torch's allocator madvise a new 4 MiB buffer for huge pages (its mapping's VmFlags hold "hg")? None
    where that cannot be read. The buffer is never touched, so it costs no memory."""
    probe = torch.empty(4 << 20, dtype=torch.uint8)
    fields = mapping_fields(probe.data_ptr())
    return None if fields is None or "VmFlags" not in fields else "hg" in fields["VmFlags"].split()


def huge_pages(mode_file: Path = THP_MODE, asks=torch_asks_for_huge_pages) -> tuple[bool, str]:
    """Do buffers of 2 MiB and more (weights, caches) get 2 MiB pages here, and why: the kernel's transparent huge
    page mode decides, and in its "madvise" mode whether torch asks (llmcli/__init__.py sets THP_MEM_ALLOC_ENABLE=1
    before torch allocates; `asks` checks a buffer, else the variable is believed)."""
    mode = thp_mode(mode_file)
    if mode is None:
        return False, "no transparent huge pages here: 4 KiB pages"
    if mode == "never":
        return False, "transparent huge pages are off (mode: never): 4 KiB pages"
    if mode != "always":
        asked = asks()
        variable = os.environ.get("THP_MEM_ALLOC_ENABLE")
        if not (variable == "1" if asked is None else asked):
            return False, (f"torch does not ask for them (mode: {mode}; THP_MEM_ALLOC_ENABLE is {variable or 'unset'}, "
                           "and torch reads it at its first allocation): 4 KiB pages")
    return True, (f"2 MiB pages for the weights (one aligned buffer) and buffers of 2 MiB and more (transparent huge "
                  f"pages, mode: {mode})")


# -- peak memory ---------------------------------------------------------------------------------


def _proc_status_kib(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else None


def resident_bytes() -> int | None:
    """This process's resident memory now (VmRSS), where /proc tells it."""
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _reset_rss_peak() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") is not None


class PeakMemory:
    """Peak memory of one run: CUDA allocator peak on CUDA, else the process's peak RSS.

    CPU choice: the kernel's own high-water mark (VmHWM), reset before each run through
    /proc/self/clear_refs, is exact and costs nothing while the run is timed. ru_maxrss cannot be
    reset (it would report the loading peak, or the other backend's), and a sampling thread would
    miss short peaks and steal a core on small machines. Without /proc we fall back to ru_maxrss
    and say so (`method`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "cuda_max_allocated" if device.type == "cuda" else "rss_hwm"
        self.base = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.method == "rss_hwm" and _reset_rss_peak():
            self.base = resident_bytes() or 0
        else:
            self.method, self.base = "ru_maxrss_lifetime", 0

    def stop(self) -> tuple[int, int | None]:
        """(peak bytes, bytes the run added above what was resident when it started, if known)."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method == "rss_hwm":
            peak = (_proc_status_kib("VmHWM") or 0) * 1024
        else:  # Linux reports KiB, macOS bytes; the lifetime peak, so no per-run increase
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
            return int(peak), None
        return int(peak), max(int(peak) - self.base, 0)


# -- memory bandwidth ----------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_bandwidth(device: torch.device, buffer_bytes: int | None = None, repeats: int = 6) -> float:
    """Memory bandwidth in bytes/s from a large copy (read + write = 2x the buffer per copy).

    Buffers are far larger than any cache; the first copy (page faults) is not counted and the
    best later copy is kept, as STREAM does. Decoding mostly reads, so this is a slight
    underestimate on machines where writes are slower."""
    if buffer_bytes is None:
        buffer_bytes = (1 << 30) if device.type in ("cuda", "mps") else (512 << 20)
    n = buffer_bytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = math.inf
    for i in range(repeats + 1):
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        if i:
            best = min(best, time.perf_counter() - t0)
    del src, dst
    return 2 * buffer_bytes / best


def read_cache(cache_file: Path) -> dict:
    """A JSON cache of measurements ({key: entry}), empty when missing or unreadable."""
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def write_cache(cache_file: Path, known: dict) -> None:
    """Replace a JSON cache of measurements atomically (other processes may read it meanwhile)."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        scratch = cache_file.with_suffix(f".{os.getpid()}.tmp")
        scratch.write_text(json.dumps(known, indent=2))
        scratch.replace(cache_file)
    except OSError:
        pass  # a read-only cache only costs a measurement next time


def _machine_key(device: torch.device) -> str:
    # CPU copy bandwidth depends on the thread count, so it is part of the key.
    threads = f"|threads={torch.get_num_threads()}" if device.type == "cpu" else ""
    return f"{socket.gethostname()}|{device.type}|{device_name(device)}{threads}"


def bandwidth_entry(device: torch.device, cache_file: Path | None = None) -> dict | None:
    """The cached measurement for this machine and device ({"bytes_per_s", "measured_at", ...}), if any."""
    entry = read_cache(cache_file or cache_home() / "bandwidth.json").get(_machine_key(device))
    return entry if isinstance(entry, dict) else None


def is_busy(load: float, own: float = 1.0) -> bool:
    """Other work on more than half the cores, beyond `own` (this process's busy threads, which the load
    average counts too): a copy or a timed run then shares the cores and the memory bus, and reads low."""
    return load - own > 0.5 * (os.cpu_count() or 1)


def machine_bandwidth(device: torch.device, cache_file: Path | None = None,
                      remeasure: bool = False) -> tuple[float, str]:
    """(bytes/s, "cached" | "measured" | "re-measured ..."): measured once per machine and device, then cached.
    A figure measured while the machine was busy is measured again once it is idle."""
    if cache_file is None:
        cache_file = cache_home() / "bandwidth.json"
    key = _machine_key(device)
    known = read_cache(cache_file)
    entry = known.get(key)
    load = load_average()
    valid = isinstance(entry, dict) and entry.get("bytes_per_s", 0) > 0
    stale = valid and is_busy(entry.get("load_average_1m", 0.0)) and not is_busy(load)
    if valid and not remeasure and not stale:
        return float(entry["bytes_per_s"]), "cached"
    value = measure_bandwidth(device)
    known[key] = {"bytes_per_s": value, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "method": "copy",
                  "load_average_1m": round(load, 2)}
    write_cache(cache_file, known)
    return value, "re-measured (the cached figure was taken on a busy machine)" if stale else "measured"
