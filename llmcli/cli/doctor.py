"""`llmcli doctor`: what this machine has, which paths llmcli takes on it, and what would make it faster."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from llmcli.cli.app import app


@app.command("doctor")
def doctor_command(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
    remeasure: bool = typer.Option(False, "--remeasure", help="Measure the memory bandwidth again, and where "
                                   "many-row products leave llmcli's kernels (a few seconds)."),
) -> None:
    """Check this machine: what llmcli runs on it, and what would make it faster.

    CPU features, the product path each precision takes and why, the C++ compiler and kernel cache, torch and
    its threads, devices, memory, bandwidth, caches and the models found. Every line that explains a slowdown
    says what to do about it."""
    from llmcli.doctor import diagnose, to_json

    report = diagnose(remeasure=remeasure)
    if as_json:
        print(to_json(report))
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for finding in report.findings:
        text = finding.fact + (f"\n[yellow]-> {finding.advice}[/]" if finding.advice else "")
        table.add_row(finding.topic, text)
    console = Console(highlight=False)
    console.print(table)
    console.print(f"[dim]checked in {report.facts['seconds']:.1f} s[/]")
