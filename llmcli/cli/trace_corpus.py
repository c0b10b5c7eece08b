"""`llmcli trace MODEL --corpus FILE`: routing and activation statistics over a workload (llmcli.workload),
with a progress bar on stderr, and the terminal summary, JSON, CSV and HTML outputs."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from llmcli.cli.common import err_console
from llmcli.errors import LlmcliError

CORPUS_HELP = (
    "--corpus FILE traces a workload instead of one prompt: FILE ('-': stdin) is plain text, one prompt per "
    "line, or JSONL with `text` or `messages` (through the chat template) and an optional `label`. Prompts "
    "are prefilled in batches (--batch-size) with a progress bar; --max-tokens stops after that many prompt "
    "tokens; bad records are skipped and counted. Memory stays constant: per MoE layer the expert counts, "
    "gate mass, balance (cv, Jain, normalised entropy, max/min), the hot-set curve (activations taken by the "
    "busiest 5/10/25/50% of experts), frequent expert pairs, router entropy, shared vs routed RMS; per label "
    "the same and the experts that separate the labels; for every model each hook point's per-token RMS and "
    "max |x| (p50/p99/max from a log histogram, 100 bins per decade: quantiles within 1.2%) and massive "
    "activations (|x| > 100x the median |x|: their channels and positions). --csv FILE writes the counts; "
    "--plan-memory SIZE (e.g. 24GB) plans which experts to keep resident. Example: llmcli trace "
    "demo-deepseek --corpus prompts.jsonl --json stats.json --html stats.html --plan-memory 40MB"
)
PER_PROMPT_OPTIONS = ("--prompt", "--layer", "--tokens", "--logit-lens", "--attention-stats")


def check_corpus_options(corpus: str | None, used: dict[str, bool], csv_out, plan_memory) -> int | None:
    """Options that make no sense together fail before the model loads; returns the plan budget in bytes."""
    from llmcli.expert_plan import parse_size

    if corpus is None:
        for flag, value in (("--csv", csv_out), ("--plan-memory", plan_memory)):
            if value is not None:
                raise LlmcliError(f"{flag} needs --corpus", exit_code=2)
        return None
    for flag in PER_PROMPT_OPTIONS:
        if used.get(flag):
            raise LlmcliError(f"--corpus cannot be combined with {flag} (it traces one prompt)", exit_code=2)
    if corpus != "-" and not Path(corpus).is_file():
        raise LlmcliError(f"--corpus: no such file: {corpus}", exit_code=2)
    return parse_size(plan_memory) if plan_memory is not None else None


def loaded_expert_bytes(loaded) -> int | None:
    """One routed expert's weights at the precision this run holds them in."""
    from llmcli.expert_plan import expert_bytes

    cfg = loaded.config
    if not cfg.n_routed_experts:
        return None
    element = {"int8": 1, "int5": 0.625, "int4": 0.5}.get(loaded.options.quantize or "",
                                            loaded.model.model.embed_tokens.weight.element_size())
    return expert_bytes(cfg.hidden_size, cfg.moe_intermediate_size, element)


def progress_bar(max_tokens: int | None):
    return Progress(SpinnerColumn(), TextColumn("{task.fields[prompts]} prompts"), BarColumn(),
                    TextColumn("{task.completed:.0f} tokens · {task.fields[speed]} tok/s"), TimeElapsedColumn(),
                    console=err_console, transient=True, disable=not err_console.is_terminal)


def run_corpus(loaded, corpus: str, *, chat: bool, batch_size: int, max_tokens: int | None, generate: int,
               json_out: str | None, html_out: str | None, csv_out: str | None, plan_budget: int | None,
               write_json) -> None:
    from llmcli.cli.generate import stop_token_ids
    from llmcli.corpus import CorpusReader, open_lines
    from llmcli.workload import run_workload
    from llmcli.workload_html import write_workload_html
    from llmcli.workload_json import build_workload_json
    from llmcli.workload_render import counts_csv, render_workload

    reader = CorpusReader(loaded.tokenizer, chat=chat)
    with progress_bar(max_tokens) as bar:
        task = bar.add_task("trace", total=max_tokens, prompts=0, speed="–")

        def report(run):
            speed = f"{run.tokens / run.seconds:.0f}" if run.seconds else "–"
            bar.update(task, completed=run.tokens, prompts=run.prompts, speed=speed)

        run = run_workload(loaded.runner, reader.prompts(open_lines(corpus)), reader, batch_size=batch_size,
                           max_tokens=max_tokens, generate=generate, stop_ids=stop_token_ids(loaded),
                           progress=report)
    if run.prompts == 0:
        raise LlmcliError(f"--corpus: no usable prompt in {'stdin' if corpus == '-' else corpus}"
                          + (f" ({reader.skipped_total} records skipped)" if reader.skipped_total else ""))
    settings = {"corpus": corpus, "chat": chat, "batch_size": batch_size, "max_tokens": max_tokens,
                "generate": generate, "dtype": str(loaded.model.model.embed_tokens.weight.dtype).removeprefix("torch."),
                "device": str(loaded.runner.device), "quantize": loaded.options.quantize,
                "plan_memory": plan_budget}
    data = build_workload_json(run, reader, loaded.name, expert_size=loaded_expert_bytes(loaded),
                               plan_budget=plan_budget, settings=settings)
    if csv_out:
        text = counts_csv(data)
        if csv_out == "-":
            sys.stdout.write(text)
        else:
            _write(csv_out, text)
    if html_out:
        size = write_workload_html(data, html_out)
        err_console.print(f"wrote {html_out} ({size / 1e6:.2f} MB)", style="dim")
    if json_out == "-":
        write_json(data, "-")
        return
    if csv_out != "-":
        render_workload(data, Console(highlight=False))
    if json_out:
        write_json(data, json_out)


def _write(target: str, text: str) -> None:
    try:
        Path(target).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise LlmcliError(f"cannot write {target}: {exc.strerror or exc}") from exc
    err_console.print(f"wrote {target}", style="dim")
