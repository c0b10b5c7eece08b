"""`llmcli bench`: llama-bench-like speed table, optionally side by side with transformers."""

from __future__ import annotations

import csv
import itertools
import json
import os
import sys
from contextlib import nullcontext
from enum import Enum

import typer
from rich.console import Console
from rich.table import Table

from llmcli.cli.app import app
from llmcli.cli.common import (
    COMPILE_OPT,
    DEVICE_OPT,
    DTYPE_OPT,
    EP_OPT,
    FORCE_OPT,
    MODEL_ARG,
    QUANTIZE_OPT,
    TP_OPT,
    YES_OPT,
    Device,
    DType,
    Quantize,
    err_console,
    human_bytes,
    load_model,
    other_rank,
)
from llmcli.errors import LlmcliError


class Compare(str, Enum):
    transformers = "transformers"


# Past these, a run only fails later (a prompt beyond every context, a batch's caches beyond any memory) or
# overflows: bench's prompt ids are seeded with seed * 100,003 + length, which must fit torch's 64 bits.
MAX_TOKENS = 10_000_000
MAX_BATCH = 4096
MAX_SEED = 2**32 - 1


def parse_counts(text: str, flag: str, most: int = MAX_TOKENS) -> list[int]:
    """'128,512' -> [128, 512]; every value an integer from 1 to `most`."""
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part.isascii() or not part.isdigit() or not 1 <= int(part) <= most:
            raise LlmcliError(f"{flag} takes positive integers up to {most} separated by commas, got {text!r}",
                              exit_code=2)
        values.append(int(part))
    return values


def check_threads(threads: int | None) -> None:
    """torch takes any count and crashes later (a segfault at 100,000 threads here)."""
    cpus = os.cpu_count() or 1
    if threads is not None and not 1 <= threads <= cpus:
        raise LlmcliError(f"--threads must be between 1 and {cpus} (this machine's CPUs), got {threads}",
                          exit_code=2)


def _stat(stat, scale: float = 1.0, digits: int = 1) -> str:
    return f"{stat.mean * scale:.{digits}f} ± {stat.std * scale:.{digits}f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _times(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}×"


def render_table(report, compared: bool) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name, justify in (("backend", "left"), ("test", "left"), ("prefill tok/s", "right"),
                          ("decode tok/s", "right"), ("TTFT ms", "right"), ("peak mem", "right"),
                          ("BW use", "right")):
        table.add_column(name, justify=justify)
    if compared:
        table.add_column("pp llmcli/tf", justify="right")
        table.add_column("tg llmcli/tf", justify="right")
    ranked = any(row.ranks for row in report.rows)
    if ranked:  # --tp/--ep: rank 0's time inside collectives
        table.add_column("comm ms/step", justify="right")
        table.add_column("comm ms/prompt", justify="right")
    for row in report.rows:
        w = row.workload
        test = f"pp{w.prompt_tokens}+tg{w.gen_tokens}" + (f" ×{w.batch}" if w.batch > 1 else "")
        cells = [row.backend, test, _stat(row.prefill_tokens_per_s), _stat(row.decode_tokens_per_s),
                 _stat(row.ttft_s, 1000), human_bytes(row.peak_memory_bytes), _percent(row.bandwidth_fraction)]
        if compared:
            ratio = row.ratio or {}
            cells += [_times(ratio.get("prefill")), _times(ratio.get("decode"))]
        if ranked:
            step = row.comm_per_decode_step_s
            cells += [_stat(step, 1000, 2) if step else "-", _stat(row.comm_per_prefill_s, 1000, 2)]
        table.add_row(*cells)
    return table


def header_lines(report, active_note: str | None) -> list[str]:
    env = report.env
    bw = env["memory_bandwidth_bytes_per_s"]
    first = report.rows[0] if report.rows else None
    per_token = f" | decode reads {human_bytes(first.decode_bytes_per_step / first.workload.batch)} of weights" \
        f" + {cache_per_token(report.rows)} of cache/token" if first else ""
    lines = [
        f"model {report.model} | {report.parameters / 1e6:.1f}M parameters, "
        f"weights {human_bytes(report.weights_bytes)}{per_token}",
        f"llmcli {env['llmcli']} | torch {env['torch']}"
        + (f" | transformers {env['transformers']} ({env.get('transformers_attn_implementation')})"
           if "transformers" in env else "")
        + f" | {report.device}: {env['device_name']} | {env['threads']} threads | {report.dtype}"
        + (f" | {env['quantize']}" if env.get("quantize") else "")
        + (" | compiled decode" if env.get("compile") else "")
        + (" | products: " + ", ".join(f"{path} ({n})" for path, n in env["products"].items())
           if env.get("products") else "")
        + (" | in the kernel up to: " + ", ".join(f"{kind} {'any' if rows is None else rows} rows"
                                                  for kind, rows in env["kernel_rows"].items())
           if env.get("kernel_rows") else "")
        + f" | memory bandwidth {bw / 1e9:.1f} GB/s ({env['memory_bandwidth_source']})"
        + ({True: " | 2 MiB pages", False: " | 4 KiB pages"}.get(env.get("huge_pages"), ""))
        + (f" | load {env['load_average_1m']}" if "load_average_1m" in env else ""),
    ]
    if env.get("ranks"):
        lines.append(rank_line(report))
    if active_note:
        lines.append(active_note)
    return lines


def cache_per_token(rows) -> str:
    """The cache bytes a decode step reads per sequence: one figure, or the range over the tests' contexts."""
    low, high = (f(row.decode_cache_bytes_per_step / row.workload.batch for row in rows) for f in (min, max))
    return human_bytes(low) if human_bytes(low) == human_bytes(high) else f"{human_bytes(low)}-{human_bytes(high)}"


def rank_line(report) -> str:
    """--tp/--ep: each rank's peak memory (the highest over the tests) and what the comm columns mean."""
    ranks = report.env["ranks"]
    peaks = [max(column) for column in zip(*(row.ranks["peak_memory_bytes_per_rank"] for row in report.rows),
                                           strict=True)]
    return (f"{ranks['world']} ranks (--tp {ranks['tp']} --ep {ranks['ep']}), the table is rank 0's | peak mem per "
            f"rank: {', '.join(human_bytes(p) for p in peaks)} | comm: time inside all-reduce/all-gather, waiting "
            "for the other ranks included")


def write_output(target: str, text: str) -> None:
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        with open(target, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    except OSError as exc:
        raise LlmcliError(f"cannot write {target}: {exc.strerror or exc}") from exc


def csv_text(report) -> str:
    import io

    from llmcli.bench import CSV_COLUMNS, csv_rows

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(report))
    return buffer.getvalue()


@app.command("bench")
def bench_command(
    model: str | None = MODEL_ARG,
    prompt_tokens: str = typer.Option("128,512", "--prompt-tokens", "-p",
                                      help="Prompt lengths, comma-separated (random token ids)."),
    gen_tokens: str = typer.Option("128", "--gen-tokens", "-n",
                                   help="Tokens to generate per run, comma-separated (EOS ignored)."),
    batch: str = typer.Option("1", "--batch", "-b", help="Batch sizes, comma-separated."),
    repeat: int = typer.Option(5, "--repeat", "-r", min=1, help="Timed runs per test."),
    warmup: int = typer.Option(1, "--warmup", "-w", min=0, help="Untimed runs per test first."),
    compare: Compare | None = typer.Option(None, "--compare",
                                           help="Also run the same weights and workload in this backend."),
    json_out: str | None = typer.Option(None, "--json", metavar="FILE|-", help="Write results as JSON."),
    csv_out: str | None = typer.Option(None, "--csv", metavar="FILE|-", help="Write results as CSV."),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="Seed for the random prompt tokens."),
    threads: int | None = typer.Option(None, "--threads", "-t",
                                       help="CPU threads for torch, up to the machine's CPUs (default: torch's "
                                            "choice)."),
    remeasure_bandwidth: bool = typer.Option(
        False, "--remeasure", "--remeasure-bandwidth",
        help="Measure memory bandwidth again instead of using the cached value (it is re-measured anyway when a run "
             "reads faster than it, or when it was taken on a busy machine and this one is idle), and on CPU the row "
             "counts from which prompt products leave llmcli's kernels for a GEMM on the converted weight."),
    device: Device = DEVICE_OPT,
    dtype: DType = DTYPE_OPT,
    yes: bool = YES_OPT,
    quantize: Quantize | None = QUANTIZE_OPT,
    compile: bool = COMPILE_OPT,
    force: bool = FORCE_OPT,
    tp: int = TP_OPT,
    ep: int = EP_OPT,
) -> None:
    """Measure prefill and decode speed, time to first token, peak memory and bandwidth use."""
    from llmcli import bench

    if json_out == "-" and csv_out == "-":
        raise LlmcliError("--json - and --csv - cannot both write to stdout", exit_code=2)
    check_threads(threads)
    batches = parse_counts(batch, "--batch", MAX_BATCH)
    workloads = [
        bench.Workload(p, n, b) for b, p, n in itertools.product(
            batches, parse_counts(prompt_tokens, "-p"), parse_counts(gen_tokens, "-n"))
    ]
    settings = bench.BenchSettings(workloads, repeat=repeat, warmup=warmup, seed=seed)
    import torch  # here, not at import time: every llmcli command would pay for it

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        report, moe_note = measure(model, device, dtype, settings, compare, remeasure_bandwidth, yes, quantize, compile,
                                   force, tp, ep)
    finally:
        torch.set_num_threads(previous_threads)  # matters when called in-process (tests)
    # The table goes to stdout unless a machine-readable format took stdout; piped output gets a
    # wide console so the table never wraps into unreadable cells.
    console = err_console if "-" in (json_out, csv_out) else Console(
        highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
    for line in header_lines(report, moe_note):
        console.print(line, style="dim", markup=False)
    console.print(render_table(report, compare is not None))
    if compare is not None:  # one process holds both models: its peak is not either backend's alone
        console.print("peak mem is the process's, with both backends' weights loaded; run without --compare "
                      "for llmcli's own", style="dim", markup=False)
    if other_rank(tp, ep):  # rank 0 alone writes files (the others' stdout already goes nowhere)
        return
    if json_out:
        write_output(json_out, json.dumps(report.as_dict(), indent=2) + "\n")
    if csv_out:
        write_output(csv_out, csv_text(report))


def measure(model, device, dtype, settings, compare, remeasure_bandwidth, yes=False, quantize=None,
            compile=False, force=False, tp=1, ep=1):
    """Load, run every workload on every backend, return (BenchReport, MoE note or None). Under --tp/--ep every
    rank runs the same workloads (rank 0 prints; weights and memory are rank 0's)."""
    import torch

    from llmcli import bench, machine
    from llmcli.backends import crossover

    if compare is Compare.transformers:  # before the slow parts
        from llmcli import hub
        from llmcli.formats.gguf import gguf_path_of

        if gguf_path_of(hub.resolve(model, yes=yes).path) is not None:
            raise LlmcliError(f"--compare transformers needs a safetensors model directory; {model} is a GGUF "
                              "model (transformers does not run it as llmcli reads it)", exit_code=2)
    if compare is not None and (tp > 1 or ep > 1):
        raise LlmcliError("--compare runs one process: leave out --tp/--ep", exit_code=2)
    loaded = load_model(model, device, dtype, yes=yes, quantize=quantize, compile=compile, force=force, tp=tp, ep=ep)
    mine = bench.LlmcliBackend(loaded.runner, loaded.device)
    bench.validate(settings, loaded.model)  # fail before the slow parts
    reference = None
    if compare is Compare.transformers:
        reference = bench.TransformersBackend(loaded.path, loaded.device, loaded.dtype, loaded.config.family)
    show = sys.stderr.isatty()
    status = err_console.status("measuring memory bandwidth") if show else nullcontext()
    with status:
        bandwidth, source = machine.machine_bandwidth(loaded.device, remeasure=remeasure_bandwidth)
        if remeasure_bandwidth and loaded.device.type == "cpu" and not compile and tp == ep == 1:
            if show:
                status.update("measuring where many-row products leave the kernels")
            for note in crossover.apply(loaded.runner.model, loaded.dtype, "remeasure"):
                err_console.print(f"note: {note}", style="dim")

        def progress(text: str) -> None:
            if show:
                status.update(text)

        rows = bench.run_bench(mine, settings, bandwidth, reference, progress)
        if source == "cached" and any((row.bandwidth_fraction or 0) > 1 for row in rows):
            bandwidth, _ = machine.machine_bandwidth(loaded.device, remeasure=True)
            source = "re-measured (a run read faster than the cached figure)"
            for row in rows:
                row.bandwidth_bytes_per_s = bandwidth
    if reference is not None:
        reference.close()
    env = bench.environment(loaded.device, loaded.dtype, bandwidth, source, reference)
    if tp > 1 or ep > 1:
        bench.gather_ranks(loaded.runner, rows)
        env["ranks"] = {"world": loaded.runner.layout.world, "tp": tp, "ep": ep}
    if machine.is_busy(env.get("load_average_1m", 0.0), own=torch.get_num_threads()):
        err_console.print(f"note: the machine is busy (load {env['load_average_1m']}): figures will be low and "
                          "noisy", style="yellow")
    env["quantize"] = loaded.options.quantize  # --quantize auto resolved
    env["compile"] = compile
    env["products"] = bench.product_paths(loaded.runner)
    env["kernel_rows"] = crossover.current(loaded.runner.model)
    report = bench.BenchReport(
        model=loaded.name, path=str(loaded.path), device=loaded.device.type, dtype=env["dtype"], env=env,
        settings=settings, weights_bytes=mine.weights_bytes, parameters=mine.parameters, rows=rows,
    )
    moe_note = None
    if loaded.config.is_moe:
        counts = sorted({(r.workload.batch, r.active_experts) for r in rows})
        moe_note = "MoE: routed experts read per layer per decode step: " + ", ".join(
            f"batch {b}: {a:.1f} of {loaded.config.n_routed_experts}" for b, a in counts)
    return report, moe_note
