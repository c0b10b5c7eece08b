"""How many rows a product runs in llmcli's CPU kernel before a GEMM on its weight converted to plain rows (torch's
F.linear: oneDNN, with AMX tiles where the CPU has them) is faster: measured once per CPU and model shape, cached,
rather than carried over from the machine the project was measured on.

The kernels read weights in their own layouts (bfloat16 panels, int8 and low-bit blocks), which suits decoding: one
row, bound by the bytes read. Many rows (a prompt) are bound by arithmetic instead, and there the best path depends
on the CPU: on a Zen 4 the bfloat16 kernel matched oneDNN at every size, where on a Xeon with AMX oneDNN's tiles ran
prompts three times faster; low-bit kernels crossed over at 384 rows on the Zen 4 and at 256 on a Zen 3. So each kind
of product is timed both ways on a sample layer (the model's own layer shapes: layer_shapes) at a ladder of row
counts, and takes the kernel up to the count that best splits the ladder into "kernel faster, or the converted
weight less than MARGIN faster" below and "converted faster" above.
"""

from __future__ import annotations

import copy
import hashlib
import re
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from llmcli.backends import int_dot
from llmcli.backends.heap import release_freed_memory
from llmcli.backends.int4 import Int4Linear, Int6Per16Linear
from llmcli.backends.int6 import Int6Linear
from llmcli.backends.int8 import Int8Linear
from llmcli.backends.linear import NEVER, BlockedLinear
from llmcli.paths import cache_home

LADDER = (16, 32, 64, 128, 192, 256, 384, 512, 768, 1024)  # rows; the kernel always takes up to the first
BUDGET = 16 << 20  # weights in a sample layer: its matrices' outputs scaled down together to fit (a 7B layer's 233M)
COPIES = 2  # sample layers taken in turn: as in a prompt, weights come from memory, not from the cache
MOST_MATRICES = 8  # of a layer's products of one kind (an MoE layer's experts: the first few)
REPEATS = 3  # rounds, both paths in turn at each row count; the median ratio counts
# How much faster the converted weight must be on the sample to be chosen: within the timing noise of a shared
# machine the kernel keeps its rows (converting costs memory traffic besides).
MARGIN = 0.05
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


def layer_shapes(model: nn.Module, kind: str) -> list[tuple[int, int]]:
    """[out, in] of the products of `kind` that one decoder layer runs in a prompt, in order: the first layer that has
    any, its experts only where nothing else is of the kind (routed experts see a few rows each); else every product
    of the kind (a head alone). Scaled down together to BUDGET weights, keeping the inputs: what decides a crossover is
    the mix of a layer's matrices (one 4096 x 1024 sample put int4's at 192-384 rows, where the Qwen2.5-0.5B shape's
    prompts ran the kernel faster up to 512)."""
    named = [(name, m) for name, m in model.named_modules() if kind_of(m) == kind]
    layers: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in named:
        match = re.match(r"(?:.*?\.)?layers\.\d+\.", name)
        layers.setdefault(match.group(0) if match else "", []).append((name, module))
    chosen = next((found for prefix, found in layers.items() if prefix), named)
    dense = [(name, m) for name, m in chosen if ".experts." not in name]
    shapes = [(m.out_features, m.in_features) for _, m in (dense or chosen)[:MOST_MATRICES]]
    scale = min(1.0, BUDGET / sum(out * inputs for out, inputs in shapes))
    return [(max(64, round(out * scale / 64) * 64), inputs) for out, inputs in shapes]


def sample_layers(module: nn.Module, kind: str, shapes: list[tuple[int, int]],
                  copies: int = COPIES) -> list[list[nn.Module]]:
    """`copies` sample layers: products of `kind` with random weights of `shapes`, made the way `module` was."""
    first = []
    for shape in shapes:
        first.append(sample_like(module, kind, shape))
        release_freed_memory()  # quantising leaves ~10x the product's size as free heap that would stay resident
    return [first] + [copy.deepcopy(first) for _ in range(copies - 1)]


def sample_like(module: nn.Module, kind: str, shape: tuple[int, int]) -> nn.Module:
    """A product of `kind` on a random [out, in] matrix, made the way `module` was (its kernel's flags)."""
    generator = torch.Generator().manual_seed(0)
    out, inputs = shape
    linear = nn.Linear(inputs, out, bias=False, device="meta")  # no float32 weight to initialise and throw away
    weight = torch.randn(out, inputs, generator=generator, dtype=torch.bfloat16).mul_(inputs ** -0.5)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if kind == "bf16":
        return BlockedLinear(linear)
    if kind == "int4":
        return Int4Linear(linear, integer=True)
    if kind == "q6_k":
        q = torch.randint(0, 64, (out, inputs), generator=generator, dtype=torch.uint8)
        sub = torch.randint(-127, 128, (out, inputs // 16), generator=generator, dtype=torch.int8)
        return Int6Per16Linear(linear, quantized=(q, sub, torch.full((out, inputs // 256), 1e-4)))
    return Int8Linear(linear, kernel=module.blocked, gemm=module.gemm, integer=module.integer)


def time_both(layers: list[list[nn.Module]], dtype: torch.dtype, ladder=LADDER, repeats=REPEATS) -> dict[int, float]:
    """{rows: the kernel's time over the converted weights'} for a sample layer's products run in turn, the two paths
    taking turns at each row count, each call on the next of `layers` (copies of one sample)."""
    ratios: dict[int, list[float]] = {rows: [] for rows in ladder}
    inputs = {m.in_features: torch.randn(max(ladder), m.in_features).to(dtype) for m in layers[0]}
    calls = 0

    def run(layer: list[nn.Module], kernel_rows: int, rows: int) -> float:
        for product in layer:
            product.kernel_rows = kernel_rows
        start = time.perf_counter()
        for product in layer:
            product(inputs[product.in_features][:rows])
        return time.perf_counter() - start

    with torch.no_grad():
        for layer in layers:  # first calls: allocations, the converted weights' first pages
            run(layer, NEVER, max(ladder))
            run(layer, 0, max(ladder))
        for _ in range(repeats):
            for rows in ladder:
                times = []
                for kernel_rows in (NEVER, 0):
                    times.append(run(layers[calls % len(layers)], kernel_rows, rows))
                    calls += 1
                ratios[rows].append(times[0] / max(times[1], 1e-9))
                release_freed_memory()  # freed outputs and conversions pile up otherwise: +190 MiB (0.5B shape)
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


def cpu_key(dtype: torch.dtype) -> str:
    """What changes a crossover besides the sample: the CPU and its features, the thread count, torch, the kernel
    build and the activations' dtype."""
    from llmcli.backends.cpu_kernels import bf16_isa, cpu_model
    from llmcli.machine import device_name

    cpu = hashlib.sha256(cpu_model().encode()).hexdigest()[:12]
    return (f"{device_name(torch.device('cpu'))}|{cpu}|threads={torch.get_num_threads()}|torch={torch.__version__}"
            f"|{bf16_isa()}/{int_dot.isa()}|{str(dtype).removeprefix('torch.')}")


def cache_key(kind: str, dtype: torch.dtype, shapes: list[tuple[int, int]]) -> str:
    """The cache's key: this CPU (cpu_key), the kind, and the sample layer's shapes (one figure per model shape)."""
    return f"{cpu_key(dtype)}|{kind}|" + ",".join(f"{out}x{inputs}" for out, inputs in shapes)


def crossovers(samples: dict[str, tuple[nn.Module, list[tuple[int, int]]]], dtype: torch.dtype,
               remeasure: bool = False, measure: bool = True,
               cache_file: Path | None = None) -> tuple[dict[str, dict], list[str]]:
    """({kind: its cache entry, "kernel_rows" and "ratios"}, the kinds measured now) for the kinds in `samples`
    ({kind: (a module of that kind, whose flags the sample copies; the sample layer's shapes)}). Cached entries are
    used unless `remeasure`, or unless they were measured while the machine was busy and it is idle now; without
    `measure`, only cached ones (kinds without one are left out)."""
    from llmcli.machine import is_busy, read_cache, write_cache
    from llmcli.openmp import busy_cores

    cache_file = cache_file or cache_home() / CACHE_NAME
    known, measured, load = read_cache(cache_file), [], None
    found = {}
    for kind, (module, shapes) in sorted(samples.items()):
        key = cache_key(kind, dtype, shapes)
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
            ratios = time_both(sample_layers(module, kind, shapes), dtype)
            release_freed_memory()  # the sample's freed tensors would otherwise stay resident
            entry = {"kind": kind, "kernel_rows": kernel_rows_from(ratios),
                     "ratios": {str(rows): round(ratio, 3) for rows, ratio in ratios.items()},
                     "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "epoch": time.time(),
                     "busy": is_busy(load, own=0.0)}
            known[key] = entry
            measured.append(kind)
        found[kind] = entry
    if measured:
        write_cache(cache_file, known)
    return found, measured


def cached(dtype: torch.dtype = torch.bfloat16, cache_file: Path | None = None) -> dict[str, dict]:
    """{kind: the latest cache entry measured on this CPU (thread count, torch and kernel build) for `dtype`, any
    model shape}."""
    from llmcli.machine import read_cache

    prefix = cpu_key(dtype) + "|"
    latest: dict[str, dict] = {}
    for key, entry in read_cache(cache_file or cache_home() / CACHE_NAME).items():
        if key.startswith(prefix) and isinstance(entry, dict) and "kernel_rows" in entry:
            kind = entry.get("kind", key[len(prefix):].split("|")[0])
            if entry.get("epoch", 0) >= latest.get(kind, {}).get("epoch", -1):
                latest[kind] = entry
    return latest


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
    samples = {kind: (modules[0], layer_shapes(model, kind)) for kind, modules in products.items()}
    found, measured = crossovers(samples, dtype, remeasure=mode == "remeasure", measure=mode != "cached",
                                 cache_file=cache_file)
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
