"""The terminal view of `llmcli trace`, in reading order: a compact overview (one coloured row per layer,
so a 60-layer model fits a screen), the detail tables of llmcli.trace_render, then the logit lens and the
attention statistics when they were asked for. All drawn from the JSON dict."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from llmcli.trace_render import bar, fmt, new_table, render_trace, show_token, sparkline

OVERVIEW_BAR = 16
LENS_GRID_TOKENS = 8  # the lens grid shows the last few positions; JSON and HTML have all


def heat_style(share: float) -> str:
    """Green for the quieter layers, yellow, then red for those near the largest RMS."""
    return "green" if share < 0.5 else "yellow" if share < 0.85 else "red"


def attention_brief(att: dict) -> str:
    kind = att.get("type") or "?"
    if att.get("window"):
        return f"{kind} {att['window']}"
    if kind == "mla":
        return f"mla r{att.get('kv_lora_rank')}"
    return kind


def overview_table(data: dict) -> Table:
    layers = data["layers"]
    top = max((layer["rms"]["resid_post"] or 0 for layer in layers), default=0)
    moe = any(layer["router"] for layer in layers)
    lens = data.get("logit_lens") is not None
    stats = any(layer.get("attention_stats") for layer in layers)
    table = new_table(f"overview: {len(layers)} of {data['num_layers']} layers, RMS of resid_post")
    table.add_column("layer", justify="right")
    table.add_column("rms", justify="right")
    table.add_column("", no_wrap=True, min_width=OVERVIEW_BAR)
    if moe:
        table.add_column("experts", justify="right")
    table.add_column("attention")
    if lens:
        table.add_column("lens top-1 (last)")
    if stats:
        table.add_column("attn H", justify="right")
        table.add_column("sink", justify="right")
    for layer in layers:
        value = layer["rms"]["resid_post"]
        share = value / top if value and top else 0.0
        row = [str(layer["index"]), fmt(value), Text(bar(value, top, OVERVIEW_BAR), style=heat_style(share))]
        if moe:
            router = layer["router"]
            used = sum(1 for c in router["load"] if c) if router else 0
            row.append(f"{used}/{router['num_experts']}" if router else Text("dense", style="dim"))
        row.append(attention_brief(layer["attention"]))
        if lens:
            row.append(lens_cell(layer, -1))
        if stats:
            s = layer.get("attention_stats")
            row += [fmt(mean(s["entropy"])), fmt(mean(s["sink"]))] if s else ["", ""]
        table.add_row(*row)
    return table


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def lens_cell(layer: dict, pos: int) -> Text:
    lens = layer.get("logit_lens")
    if not lens or not lens["top_ids"]:
        return Text("")
    prob = lens["top_probs"][pos][0]
    return Text(f"{show_token(lens['top_tokens'][pos][0])} {fmt(prob)}", style="bold" if prob >= 0.5 else "")


def lens_table(data: dict) -> Table:
    """The top-K after every layer at the last position, and p(the model's final choice) there."""
    summary = data["logit_lens"]
    final = show_token(summary["targets"][-1]) if summary["targets"] else ""
    table = new_table(f"logit lens at the last position: top {summary['k']} after each layer")
    table.add_column("layer", justify="right")
    table.add_column("top tokens (probability)")
    table.add_column(f"p({final})", justify="right")
    for layer in data["layers"]:
        lens = layer.get("logit_lens")
        if not lens or not lens["top_ids"]:
            continue
        tops = "  ".join(f"{show_token(t)} {fmt(p)}" for t, p in zip(lens["top_tokens"][-1], lens["top_probs"][-1],
                                                                    strict=True))
        table.add_row(str(layer["index"]), tops, fmt(lens["target_prob"][-1]))
    return table


def lens_grid(data: dict) -> Table:
    """Top-1 after each layer for the last positions (all of them are in --json and --html)."""
    n = len(data["tokens"])
    positions = list(range(max(0, n - LENS_GRID_TOKENS), n))
    table = new_table(f"logit lens: top-1 after each layer for the last {len(positions)} positions")
    table.add_column("layer", justify="right")
    for pos in positions:
        table.add_column(f"{pos} {show_token(data['tokens'][pos])}"[:14])
    for layer in data["layers"]:
        if layer.get("logit_lens"):
            table.add_row(str(layer["index"]), *(lens_cell(layer, pos) for pos in positions))
    return table


def attention_stats_table(data: dict) -> Table:
    table = new_table("attention per head: entropy (nats), first-token mass, distance")
    for name in ("layer", "entropy", "min–max", "per head", "sink", "max head", "distance"):
        table.add_column(name, justify="left" if name == "per head" else "right", no_wrap=name == "per head")
    for layer in data["layers"]:
        s = layer.get("attention_stats")
        if not s:
            continue
        entropy = s["entropy"]
        low, high = min(entropy), max(entropy)  # heads relative to each other: low entropy = focused
        spark = sparkline([1 + round(99 * (v - low) / (high - low)) if high > low else 1 for v in entropy])
        table.add_row(str(layer["index"]), fmt(mean(entropy)), f"{fmt(min(entropy))}–{fmt(max(entropy))}",
                      Text(spark, style="cyan"), fmt(mean(s["sink"])), fmt(max(s["sink"])), fmt(mean(s["distance"])))
    return table


def render_report(data: dict, console: Console, per_token: bool = False, filtered: bool = False) -> None:
    """Overview first, then the details."""
    console.print(overview_table(data))
    render_trace(data, console, per_token=per_token, filtered=filtered)
    if data.get("logit_lens"):
        console.print(lens_table(data))
        if per_token:
            console.print(lens_grid(data))
    if any(layer.get("attention_stats") for layer in data["layers"]):
        console.print(attention_stats_table(data))
