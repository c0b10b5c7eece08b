"""How many rows a product runs in llmcli's CPU kernel before a GEMM on its weight converted to plain rows (torch's
F.linear: oneDNN, with AMX tiles where the CPU has them) is faster: measured once per CPU, cached, rather than carried
over from the machine the project was measured on.

The kernels read weights in their own layouts (bfloat16 panels, int8 and low-bit blocks), which suits decoding: one
row, bound by the bytes read. Many rows (a prompt) are bound by arithmetic instead, and there the best path depends
on the CPU: on a Zen 4 the bfloat16 kernel matched oneDNN at every size, where on a Xeon with AMX oneDNN's tiles ran
prompts three times faster; low-bit kernels crossed over at 384 rows on the Zen 4 and at 256 on a Zen 3. So each kind
of product is timed both ways on a sample matrix at a ladder of row counts, and takes the kernel up to the count
that best splits the ladder into "kernel faster, or the converted weight less than MARGIN faster" below and
"converted clearly faster" above.
"""

from __future__ import annotations

import copy
import hashlib
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from llmcli.backends import int_dot
from llmcli.backends.int4 import Int4Linear, Int6Per16Linear
from llmcli.backends.int6 import Int6Linear
from llmcli.backends.int8 import Int8Linear
from llmcli.backends.linear import NEVER, BlockedLinear
from llmcli.paths import cache_home

LADDER = (16, 32, 64, 128, 192, 256, 384, 512, 768, 1024)  # rows; the kernel always takes up to the first
SAMPLE = (4096, 1024)  # [out, in] of the sample matrix: wide enough that neither path is bound by its start-up
COPIES = 4  # sample matrices taken in turn: as in a prompt's layers, weights come from memory, not from the cache
REPEATS = 3  # rounds, both paths in turn at each row count; the median ratio counts
# How much faster the converted weight must be on the sample to be chosen. Whole prompts of a model favour the kernel
# more than the sample does: Qwen2.5-0.5B shape's Q4_0 file, int4, alternated in one process, the kernel took 256-row
# products in 555 ms against the GEMM's 627 and 512-row ones in 1140 against 1218, where the sample had the two even
# (0.94-1.04 at 256, 1.04-1.20 at 512); at 768 rows the GEMM was ahead (1875 against 1996), the sample 1.12-1.23.
MARGIN = 0.15
CACHE_NAME = "crossover.json"
PROCESS_START = time.time()  # "remeasure" leaves alone what this process measured already (doctor's precisions)


def kind_of(module: nn.Module) -> str | None:
    """Which measured crossover a product follows, or None for products without a kernel or an alternative.
    int4, int5 and Q8_0 blocks share one kernel and one conversion; the int6 head follows them."""
    if isinstance(module, BlockedLinear):
        return "bf16"
    if isinstance(module, Int6Per16Linear):
        return "q6_k"
    if isinstance(module, Int4Linear) and module.integer or isinstance(module, Int6Linear):
        return "int4"
    if isinstance(module, Int8Linear) and (module.gemm or module.integer):
        return "int8"
    return None


def samples_like(module: nn.Module, kind: str, copies: int = COPIES) -> list[nn.Module]:
    """`copies` products of `kind` on a random SAMPLE-sized matrix, made the way `module` was (its kernel's flags)."""
    first = sample_like(module, kind)
    return [first] + [copy.deepcopy(first) for _ in range(copies - 1)]


def sample_like(module: nn.Module, kind: str) -> nn.Module:
    """A product of `kind` on a random SAMPLE-sized matrix, made the way `module` was (its kernel's flags)."""
    generator = torch.Generator().manual_seed(0)
    out, inputs = SAMPLE
    linear = nn.Linear(inputs, out, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out, inputs, generator=generator) * inputs ** -0.5)
    if kind == "bf16":
        return BlockedLinear(linear)
    if kind == "int4":
        return Int4Linear(linear, integer=True)
    if kind == "q6_k":
        q = torch.randint(0, 64, (out, inputs), generator=generator, dtype=torch.uint8)
        sub = torch.randint(-127, 128, (out, inputs // 16), generator=generator, dtype=torch.int8)
        return Int6Per16Linear(linear, quantized=(q, sub, torch.full((out, inputs // 256), 1e-4)))
    return Int8Linear(linear, kernel=module.blocked, gemm=module.gemm, integer=module.integer)


def time_both(products: list[nn.Module], dtype: torch.dtype, ladder=LADDER, repeats=REPEATS) -> dict[int, float]:
    """{rows: the kernel's time over the converted weight's}, the two taking turns at each row count, each call on
    the next of `products` (copies of one sample)."""
    ratios: dict[int, list[float]] = {rows: [] for rows in ladder}
    inputs = torch.randn(max(ladder), products[0].in_features).to(dtype)
    calls = 0
    with torch.no_grad():
        for kernel_rows in (NEVER, 0):  # first calls: allocations, the converted weight's first pages
            for product in products:
                product.kernel_rows = kernel_rows
                product(inputs)
        for _ in range(repeats):
            for rows in ladder:
                times = []
                for kernel_rows in (NEVER, 0):
                    product = products[calls % len(products)]
                    calls += 1
                    product.kernel_rows = kernel_rows
                    start = time.perf_counter()
                    product(inputs[:rows])
                    times.append(time.perf_counter() - start)
                ratios[rows].append(times[0] / max(times[1], 1e-9))
    return {rows: statistics.median(values) for rows, values in ratios.items()}


def kernel_rows_from(ratios: dict[int, float], margin: float = MARGIN) -> int:
    """The most rows the kernel should take: the split of the ladder that most row counts agree with (the kernel
    no more than `margin` slower at and below it, the converted weight clearly faster above), ties to the kernel;
    NEVER when no split beats "the kernel everywhere". One noisy count cannot move it far."""
    ladder = sorted(ratios)
    converted = {r: ratios[r] > 1.0 + margin for r in ladder}
    best, best_agree = NEVER, sum(not converted[r] for r in ladder)
    for index in range(len(ladder) - 2, -1, -1):  # splits after ladder[index], from the top down
        agree = sum(not converted[r] for r in ladder[:index + 1]) + sum(converted[r] for r in ladder[index + 1:])
        if agree > best_agree:
            best, best_agree = ladder[index], agree
    return best


def cpu_key(kind: str, dtype: torch.dtype) -> str:
    """The cache's key: what changes a crossover (the CPU and its features, the thread count, torch, the kernel
    build, the activations' dtype) and the kind."""
    from llmcli.backends.cpu_kernels import bf16_isa, cpu_model
    from llmcli.machine import device_name

    cpu = hashlib.sha256(cpu_model().encode()).hexdigest()[:12]
    return (f"{device_name(torch.device('cpu'))}|{cpu}|threads={torch.get_num_threads()}|torch={torch.__version__}"
            f"|{bf16_isa()}/{int_dot.isa()}|{kind}|{str(dtype).removeprefix('torch.')}")


def crossovers(samples: dict[str, nn.Module], dtype: torch.dtype, remeasure: bool = False, measure: bool = True,
               cache_file: Path | None = None) -> tuple[dict[str, dict], list[str]]:
    """({kind: its cache entry, "kernel_rows" and "ratios"}, the kinds measured now) for the kinds in `samples`
    ({kind: a module of that kind, whose flags the sample copies}). Cached entries are used unless `remeasure`, or
    unless they were measured while the machine was busy and it is idle now; without `measure`, only cached ones
    (kinds without one are left out)."""
    from llmcli.machine import is_busy, read_cache, write_cache
    from llmcli.openmp import busy_cores

    cache_file = cache_file or cache_home() / CACHE_NAME
    known, measured, load = read_cache(cache_file), [], None
    found = {}
    for kind, module in sorted(samples.items()):
        key = cpu_key(kind, dtype)
        entry = known.get(key)
        if isinstance(entry, dict) and entry.get("busy") and not remeasure and measure:
            load = busy_cores() if load is None else load
            remeasure_this = not is_busy(load, own=0.0)
        else:
            remeasure_this = remeasure and not (isinstance(entry, dict) and entry.get("epoch", 0) >= PROCESS_START)
        if not measure and not (isinstance(entry, dict) and "kernel_rows" in entry):
            continue
        if measure and (not isinstance(entry, dict) or "kernel_rows" not in entry or remeasure_this):
            load = busy_cores() if load is None else load
            ratios = time_both(samples_like(module, kind), dtype)
            entry = {"kernel_rows": kernel_rows_from(ratios),
                     "ratios": {str(rows): round(ratio, 3) for rows, ratio in ratios.items()},
                     "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "epoch": time.time(),
                     "busy": is_busy(load, own=0.0)}
            known[key] = entry
            measured.append(kind)
        found[kind] = entry
    if measured:
        write_cache(cache_file, known)
    return found, measured


KINDS = ("bf16", "int8", "int4", "q6_k")


def cached(dtype: torch.dtype = torch.bfloat16, cache_file: Path | None = None) -> dict[str, dict]:
    """{kind: its cache entry} measured on this CPU (thread count, torch and kernel build) for `dtype`."""
    from llmcli.machine import read_cache

    known = read_cache(cache_file or cache_home() / CACHE_NAME)
    entries = {kind: known.get(cpu_key(kind, dtype)) for kind in KINDS}
    return {kind: entry for kind, entry in entries.items() if isinstance(entry, dict) and "kernel_rows" in entry}


def describe(kind: str, rows: int) -> str:
    """e.g. "int4: the kernel up to 384 rows, then a GEMM on the converted weight", "bf16: the kernel at every size"."""
    if rows >= NEVER:
        return f"{kind}: the kernel at every size"
    return f"{kind}: the kernel up to {rows} rows, then a GEMM on the converted weight"


def apply(model: nn.Module, dtype: torch.dtype, mode: str = "measured", cache_file: Path | None = None) -> list[str]:
    """Set each kernel product's `kernel_rows` from this CPU's measured crossovers (mode "measured"; "remeasure"
    measures again; "cached" takes only figures measured before; "fixed" keeps the classes' figures). Returns notes
    for a measurement made now."""
    if mode == "fixed":
        return []
    products: dict[str, list[nn.Module]] = {}
    for module in model.modules():
        kind = kind_of(module)
        if kind is not None:
            products.setdefault(kind, []).append(module)
    if not products:
        return []
    start = time.perf_counter()
    found, measured = crossovers({kind: modules[0] for kind, modules in products.items()}, dtype,
                                 remeasure=mode == "remeasure", measure=mode != "cached", cache_file=cache_file)
    for kind, modules in products.items():
        for module in modules if kind in found else ():
            module.kernel_rows = found[kind]["kernel_rows"]
    if not measured:
        return []
    summary = "; ".join(describe(kind, found[kind]["kernel_rows"]) for kind in measured)
    return [f"measured where this CPU's many-row products leave the kernels ({time.perf_counter() - start:.1f} s; "
            f"cached in {cache_file or cache_home() / CACHE_NAME}): {summary}"]


def current(model: nn.Module) -> dict[str, int | None]:
    """{kind: the most rows its products take in the kernel (None: every size)} for the kinds in `model`."""
    found: dict[str, int | None] = {}
    for module in model.modules():
        kind = kind_of(module)
        if kind is not None and kind not in found:
            found[kind] = None if module.kernel_rows >= NEVER else int(module.kernel_rows)
    return found
