"""`llmcli doctor`: the facts that decide how fast llmcli runs here, each with what to do about it.

Every fact is gathered by the code that acts on it: the product paths come from preparing a tiny model
with the same backends code that loading uses (so they agree with `bench`'s "products:" line), the
kernel cache from the kernel builder's own key, the bandwidth from `bench`'s cache."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmcli import memory
from llmcli.units import human_bytes

# The CPU features the kernels and torch's paths depend on, as /proc/cpuinfo names them.
FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "avx_vnni",
            "amx_tile", "amx_bf16", "amx_int8", "asimd")
PRECISIONS = ("float32", "bfloat16", "int8", "int5", "int4")  # int5, int4: CPU only


@dataclass
class Finding:
    """One line of the report: what is so, and (when it costs speed) what to do."""

    topic: str
    fact: str
    advice: str = ""

    def as_dict(self) -> dict:
        return {"topic": self.topic, "fact": self.fact, "advice": self.advice}


@dataclass
class Report:
    facts: dict = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    def add(self, topic: str, fact: str, advice: str = "") -> None:
        self.findings.append(Finding(topic, fact, advice))

    def as_dict(self) -> dict:
        return {**self.facts, "findings": [f.as_dict() for f in self.findings]}


# -- the CPU -----------------------------------------------------------------------------------------


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_section(report: Report) -> set[str]:
    flags = cpu_flags()
    present = [name for name in FEATURES if name in flags]
    report.facts["cpu"] = {"model": cpu_model(), "machine": platform.machine(), "cores": os.cpu_count(),
                           "features": {name: name in flags for name in FEATURES}}
    advice = ""
    if platform.machine() in ("x86_64", "AMD64") and "avx512_bf16" not in flags:
        advice = ("no AVX512-BF16: bfloat16 products run torch's own paths here; --quantize int8 decodes "
                  "faster (llmcli's int8 kernel needs only AVX2)")
    report.add("cpu", f"{cpu_model()}, {os.cpu_count()} cores; features: {' '.join(present) or 'none of note'}",
               advice)
    return flags


# -- the compiler and the kernel cache ------------------------------------------------------------------


def compiler() -> tuple[str | None, str]:
    """(path of the C++ compiler torch's builder would use, its version line)."""
    name = os.environ.get("CXX") or "c++"
    path = shutil.which(name) or shutil.which("g++") or shutil.which("clang++")
    if path is None:
        return None, ""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    return path, (out.splitlines() or [""])[0].strip()


def kernel_section(report: Report) -> None:
    from llmcli.backends import cpu_kernels

    path, version = compiler()
    directory = cpu_kernels.build_directory("llmcli", cpu_kernels.FLAGS)
    built = (directory / f"{directory.name}.so").is_file()
    report.facts["compiler"] = {"path": path, "version": version}
    report.facts["kernel_cache"] = {"directory": str(directory), "key": directory.name.split("_")[-1],
                                    "built": built}
    if path is None:
        report.add("compiler", "no C++ compiler found",
                   "install one (e.g. `apt-get install g++`): llmcli's CPU kernels and --compile need it")
    else:
        report.add("compiler", f"{path} ({version})")
    state = "built" if built else "not built yet (built on the first CPU run that needs it, about 10 s)"
    report.add("kernels", f"CPU kernels {state}: {directory}")


# -- the product paths ----------------------------------------------------------------------------------


def _tiny_model():
    """A two-layer Qwen2-shaped model with random weights: enough linears of usual shapes to prepare."""
    from llmcli.config_fields import ModelConfig
    from llmcli.models.qwen import QwenForCausalLM

    cfg = ModelConfig(family="qwen2", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=64, attention_bias=True, layer_windows=[None, None])
    return QwenForCausalLM(cfg)


def product_paths(device: torch.device, remeasure: bool = False) -> dict[str, dict]:
    """Per precision: how its linear products run on `device` (the labels `bench` reports) and the notes
    preparing gave. Eager runs; --compile changes the one-row products (see README). Preparing measures where
    many-row products leave the kernels, where that is not cached yet (or with `remeasure`)."""
    from llmcli.backends.linear import label_of
    from llmcli.backends.prepare import Preparation
    from llmcli.options import Options

    paths = {}
    for precision in PRECISIONS:
        if precision in ("int5", "int4") and device.type != "cpu":
            continue
        dtype = torch.float32 if precision == "float32" else torch.bfloat16
        model = _tiny_model().to(device=device, dtype=dtype)
        options = Options.from_env(device=device.type, quantize=precision if precision.startswith("int") else None,
                                   crossover="remeasure" if remeasure else None)
        preparation = Preparation(model, options)
        preparation.finish()
        counts: dict[str, int] = {}
        for module in preparation.runner().model.modules():
            label = label_of(module)
            if label is not None:
                counts[label] = counts.get(label, 0) + 1
        paths[precision] = {"products": counts, "notes": preparation.notes}
    return paths


WHY = {
    "bf16 kernel": "llmcli's bfloat16 kernel, built for this CPU's best instructions",
    "oneDNN prepacked": "oneDNN's blocked layout (no AVX512-BF16 kernel here)",
    "int8 kernel": "llmcli's int8 kernel",  # and "int8 kernel (x int8 activations, ...)": its integer path
    "int4 kernel": "llmcli's int4 kernel (int8 activations, integer dot products)",
    "int6 kernel": "the head of an int4 run in 6 bits, on llmcli's integer kernel",
    "F.linear": "torch's own product",
}


def products_section(report: Report, device: torch.device, remeasure: bool = False) -> None:
    paths = product_paths(device, remeasure)
    report.facts["products"] = paths
    for precision, found in paths.items():
        names = ", ".join(found["products"])
        why = "; ".join(WHY.get(name.split(",")[0].split(" (")[0], name) for name in found["products"])
        advice = "; ".join(found["notes"])
        in_kernel = any(name.startswith("int8 kernel") for name in found["products"])  # float or integer path
        if precision == "int8" and not in_kernel and device.type == "cpu":
            advice = advice or "the int8 kernel did not build: see the compiler line"
        report.add(f"{precision} products", f"{names} ({why})", advice)
    if device.type == "cpu":
        crossover_section(report)


def crossover_section(report: Report) -> None:
    """Where prompt products leave llmcli's kernels for a GEMM on the converted weight, as measured on this CPU."""
    from llmcli.backends.crossover import cached, describe

    entries = cached()
    report.facts["kernel_rows"] = {kind: {"kernel_rows": entry["kernel_rows"], "ratios": entry.get("ratios"),
                                          "measured_at": entry.get("measured_at")} for kind, entry in entries.items()}
    if entries:
        when = max(str(entry.get("measured_at", "")) for entry in entries.values())
        report.add("many-row products", "; ".join(describe(kind, entry["kernel_rows"]) for kind, entry in
                                                  entries.items()) + f" (measured on this CPU, last {when})")


# -- torch, devices, memory, bandwidth ---------------------------------------------------------------------


def torch_section(report: Report) -> None:
    cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    report.facts["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads(),
                             "cuda_devices": cuda, "mps": mps}
    threads = torch.get_num_threads()
    advice = ""
    if os.cpu_count() and threads < os.cpu_count():
        advice = f"torch uses {threads} of {os.cpu_count()} cores: unset OMP_NUM_THREADS to use them all"
    report.add("torch", f"{torch.__version__}, {threads} threads", advice)
    if cuda:
        report.add("devices", "CUDA: " + ", ".join(cuda))
    elif mps:
        report.add("devices", "Apple MPS")
    else:
        report.add("devices", "CPU only (no CUDA or MPS device)")


def memory_section(report: Report) -> None:
    total = _meminfo_total()
    available = memory.available_bytes()
    report.facts["memory"] = {"total_bytes": total, "available_bytes": available}
    fact = f"{human_bytes(available)} available" if available is not None else "unknown"
    if total:
        fact += f" of {human_bytes(total)}"
    report.add("memory", fact)


def pages_section(report: Report) -> None:
    from llmcli import machine

    huge, fact = machine.huge_pages()
    report.facts["huge_pages"] = huge
    advice = "" if huge else ("2 MiB pages read weights faster (README: huge pages); as root: echo madvise > "
                              "/sys/kernel/mm/transparent_hugepage/enabled, and leave THP_MEM_ALLOC_ENABLE unset")
    report.add("pages", fact, advice)


def _meminfo_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def bandwidth_section(report: Report, remeasure: bool) -> None:
    from llmcli import machine

    device = torch.device("cpu")
    value, how = machine.machine_bandwidth(device, remeasure=remeasure)
    entry = machine.bandwidth_entry(device) or {}
    load = machine.load_average()
    report.facts["bandwidth"] = {"bytes_per_s": value, "source": how, "measured_at": entry.get("measured_at"),
                                 "load_average_1m": round(load, 2)}
    when = "now" if how == "measured" else f"cached from {entry.get('measured_at', 'an earlier run')}"
    advice = ""
    if how == "measured" and load > 0.5 * (os.cpu_count() or 1):
        advice = (f"the machine was busy (load {load:.1f}) while measuring: the figure may be low; "
                  "`llmcli doctor --remeasure` when it is idle")
    report.add("bandwidth", f"{value / 1e9:.1f} GB/s memory copy bandwidth ({when}); decode reads every weight "
               "once per token, so this bounds its speed", advice)


# -- files ------------------------------------------------------------------------------------------------


def folder_size(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size  # lstat: HF cache links count once
            except OSError:
                pass
    return total


def files_section(report: Report) -> None:
    from llmcli.download import hub_cache_dir
    from llmcli.paths import cache_home

    home, hub = cache_home(), hub_cache_dir()
    sizes = {"llmcli_home": (str(home), folder_size(home) if home.is_dir() else 0),
             "hf_cache": (str(hub), folder_size(hub) if hub.is_dir() else 0)}
    report.facts["storage"] = {key: {"path": path, "bytes": size} for key, (path, size) in sizes.items()}
    report.add("llmcli home", f"{home} ({human_bytes(sizes['llmcli_home'][1])})")
    report.add("HF cache", f"{hub} ({human_bytes(sizes['hf_cache'][1])})")
    models = found_models(hub)
    report.facts["models"] = models
    report.add("models", f"{len(models)} found" + (": " + ", ".join(m["name"] for m in models[:8]) if models else ""),
               "" if models else "`llmcli pull MODEL` downloads one (see `llmcli list`)")


def found_models(hub: Path) -> list[dict]:
    """Model snapshots in the Hugging Face cache (newest per repo), GGUF files there and Ollama's models."""
    from llmcli import ollama
    from llmcli.gguf_list import hf_cache_ggufs

    found = [{"name": name, "format": "gguf", "path": str(path)} for name, path in hf_cache_ggufs()]
    found += [{"name": f"{ollama.PREFIX}{m.name}", "format": "gguf (Ollama)", "path": str(m.blob)}
              for m in ollama.installed()]
    if not hub.is_dir():
        return found
    for folder in sorted(hub.glob("models--*")):
        snapshots = [s for s in (folder / "snapshots").glob("*") if (s / "config.json").is_file()]
        if snapshots:
            newest = max(snapshots, key=lambda s: s.stat().st_mtime)
            name = folder.name.removeprefix("models--").replace("--", "/")
            found.append({"name": name, "format": "safetensors", "path": str(newest)})
    return found


# -- the whole report ---------------------------------------------------------------------------------------


def diagnose(remeasure: bool = False) -> Report:
    start = time.perf_counter()
    report = Report()
    cpu_section(report)
    kernel_section(report)
    torch_section(report)
    products_section(report, torch.device("cpu"), remeasure)
    memory_section(report)
    pages_section(report)
    bandwidth_section(report, remeasure)
    files_section(report)
    report.facts["seconds"] = round(time.perf_counter() - start, 3)
    return report


def to_json(report: Report) -> str:
    return json.dumps(report.as_dict(), indent=2, default=str)
