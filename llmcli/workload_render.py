"""The terminal view and CSV of `trace --corpus`, drawn from the JSON dict (llmcli.workload_json), so the
tables, `--json` and `--csv` never disagree.

The heat strip is one row per MoE layer and one cell per expert (pooled when there are more experts than
the screen has columns): each cell is the expert's share of the layer's activations over the fair share
(1/E), in steps of 2x, so a balanced layer is an even row and a hot set stands out at any expert count.
"""

from __future__ import annotations

import csv
import io

from rich.console import Console
from rich.table import Table
from rich.text import Text

from llmcli.trace_render import fmt, new_table
from llmcli.units import human_bytes

# (upper bound of count / fair share, character, style): idle, then 2x steps around the fair share.
HEAT = ((0.0, "·", "grey42"), (0.25, "░", "blue"), (0.5, "▒", "cyan"), (1.0, "▓", "green"),
        (2.0, "█", "yellow"), (4.0, "█", "dark_orange"), (float("inf"), "█", "red"))
HEAT_LEGEND = ("· idle  ░ <¼  ▒ <½  ▓ <1x  [yellow]█[/] <2x  [dark_orange]█[/] <4x  [red]█[/] ≥4x "
               "the fair share (1/experts)")
SHORT = {"resid_pre": "pre", "attn_out": "attn", "resid_mid": "mid", "mlp_out": "mlp", "resid_post": "post",
         "routed_out": "routed", "shared_out": "shared"}


def pct(value) -> str:
    return "–" if value is None else f"{value * 100:.1f}%"


def heat_cell(share: float) -> tuple[str, str]:
    if share <= 0:
        return HEAT[0][1], HEAT[0][2]
    for bound, char, style in HEAT[1:]:
        if share < bound:
            return char, style
    return HEAT[-1][1], HEAT[-1][2]


def pooled(counts: list[int], columns: int) -> list[float]:
    """Counts pooled into at most `columns` cells, each as its experts' mean over the fair share."""
    total = sum(counts)
    size = -(-len(counts) // max(1, columns))
    fair = total / len(counts) if total else 1.0
    return [sum(counts[i:i + size]) / len(counts[i:i + size]) / fair for i in range(0, len(counts), size)]


def heat_strip(routing: dict, width: int) -> Text:
    layers = routing["layers"]
    experts = routing["num_experts"]
    columns = max(8, width - 8)
    size = -(-experts // columns)
    text = Text()
    head = f"layer  experts 0-{experts - 1}" + (f" ({size} per cell)" if size > 1 else "")
    text.append(head + "\n", style="bold")
    for layer in layers:
        text.append(f"{layer['index']:>5}  ")
        for share in pooled(layer["counts"], columns):
            char, style = heat_cell(share)
            text.append(char, style=style)
        text.append("\n")
    text.append_text(Text.from_markup(HEAT_LEGEND, style="dim"))
    return text


def num(value) -> str:
    """Three significant digits: the tables must fit 80 columns."""
    if value is None:
        return "–"
    if value == 0:
        return "0"
    return f"{value:.3g}" if 1e-3 <= abs(value) < 1e5 else f"{value:.1e}"


def frac(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def pct0(value) -> str:
    return "–" if value is None else f"{value * 100:.0f}%"


def balance_table(routing: dict) -> Table:
    t = new_table("Balance per MoE layer: cv 0, jain 1, H (entropy / ln E) 1 are even; 5%..50%: activations "
                  "taken by the busiest 5..50% of experts; rH: mean router entropy (nats); pair: the most "
                  "frequent pair of experts and its share of tokens")
    for col in ("layer", "cv", "jain", "H", "max/min", "idle", "5%", "10%", "25%", "50%", "rH", "pair"):
        t.add_column(col, justify="right" if col != "pair" else "left", no_wrap=True)
    for layer in routing["layers"]:
        cov = layer["coverage"]
        pair = layer["pairs"][0] if layer["pairs"] else None
        t.add_row(str(layer["index"]), num(layer["cv"]), frac(layer["jain"]), frac(layer["entropy"]),
                  num(layer["max_min"]) if layer["max_min"] is not None else "∞" if layer["unused"] else "–",
                  str(layer["unused"]), pct0(cov["5%"]), pct0(cov["10%"]), pct0(cov["25%"]), pct0(cov["50%"]),
                  num(layer["router_entropy"]),
                  f"{pair['experts'][0]}+{pair['experts'][1]} {pct0(pair['share'])}" if pair else "–")
    return t


def activation_table(activations: dict) -> Table:
    t = new_table("Activations: per-token RMS and max |x| (p50 / p99 / max) at each layer's output and "
                  f"blocks; massive: values with |x| > {activations['massive_factor']:g}x the median |x|")
    for col in ("layer", "point", "RMS p50", "p99", "max", "|x| p50", "p99", "max", "massive"):
        t.add_column(col, justify="right" if col != "point" else "left", no_wrap=True)
    notes = []
    for layer in activations["layers"]:
        for name, p in layer["points"].items():
            m = p["massive"]
            if m["values"]:
                notes.append(f"layer {layer['index']} {SHORT.get(name, name)}: {m['values']} massive values; "
                             f"channels {' '.join(str(c) for c, _ in m['channels'][:4])}; positions "
                             f"{' '.join(str(q) for q, _ in m['positions'][:4])}")
            if name not in ("resid_post", "attn_out", "mlp_out") and not m["values"]:
                continue  # the table shows the layer's output and its blocks; JSON has every point
            t.add_row(str(layer["index"]), SHORT.get(name, name), num(p["rms"]["p50"]), num(p["rms"]["p99"]),
                      num(p["rms"]["max"]), num(p["max_abs"]["p50"]), num(p["max_abs"]["p99"]),
                      num(p["max_abs"]["max"]), str(m["values"]) if m["values"] else "–")
    return t, notes


def separation_table(routing: dict) -> Table:
    t = new_table("Experts that separate the labels: Jensen-Shannon divergence of the labels' expert "
                  "distributions (bits); per expert the label it favours, its share there vs elsewhere")
    t.add_column("layer", justify="right")
    t.add_column("JS bits", justify="right")
    t.add_column("experts")
    for layer in routing["separation"]:
        cells = [f"{e['expert']}→{e['label']} {pct0(e['share_in_label'])} vs {pct0(e['share_elsewhere'])}"
                 for e in layer["experts"][:3]]
        t.add_row(str(layer["index"]), num(layer["divergence"]), ", ".join(cells) or "–")
    return t


def plan_lines(plan: dict | None, curve: list[dict] | None) -> list[str]:
    lines = []
    if plan:
        lines.append(
            f"plan for {human_bytes(plan['budget_bytes'])} of routed experts: keep {plan['resident_experts']} of "
            f"{plan['total_experts']} experts resident ({human_bytes(plan['resident_bytes'])}; one expert "
            f"{human_bytes(plan['expert_bytes'])}); hit rate {pct(plan['hit_rate'])} on this workload "
            f"(uniform routing: {pct(plan['uniform_hit_rate'])}); expert bytes read per token "
            f"{human_bytes(plan['bytes_per_token'] or 0)} (without a plan "
            f"{human_bytes(plan['bytes_per_token_without_plan'] or 0)})")
        per_layer = ", ".join(f"{layer['index']}:{len(layer['resident'])}" for layer in plan["layers"])
        lines.append(f"resident experts per layer (layer:count): {per_layer}")
    if curve:
        lines.append("hit rate when keeping the busiest experts: " + " · ".join(
            f"{c['share'] * 100:g}% ({human_bytes(c['budget_bytes'])}) → {pct(c['hit_rate'])}" for c in curve))
    return lines


def render_workload(data: dict, console: Console) -> None:
    c = data["corpus"]
    reasons = ", ".join(f"{n} {r}" for r, n in c["skip_reasons"].items())
    console.print(f"[bold]{data['model']}[/]: {c['prompts']} prompts, {c['tokens']} tokens"
                  + (f" + {c['generated']} generated" if c["generated"] else "")
                  + f" in {fmt(c['seconds'])} s ({fmt(c['tokens_per_second'])} tok/s)"
                  + (f"; skipped {c['skipped']} ({reasons})" if c["skipped"] else "; skipped 0")
                  + ("; stopped at --max-tokens" if c["budget_reached"] else ""))
    routing = data["routing"]
    if routing:
        console.print(f"routing: {routing['num_experts']} experts, {routing['experts_per_token']} per token, "
                      f"{len(routing['layers'])} MoE layers")
        console.print(heat_strip(routing, min(console.width, 140)))
        console.print(balance_table(routing))
        if routing.get("separation"):
            labels = ", ".join(f"{k} ({v['prompts']} prompts)" for k, v in routing["labels"].items())
            console.print(f"labels: {labels}")
            console.print(separation_table(routing))
    else:
        console.print("no routing: a dense model (activation statistics only)")
    table, notes = activation_table(data["activations"])
    console.print(table)
    for line in notes[:12]:
        console.print(line, style="dim")
    for line in plan_lines(data.get("plan"), data.get("plan_curve")):
        console.print(line)


def counts_csv(data: dict) -> str:
    """layer,expert,label,count,gate_mass; label '*' is every token, then one row set per label."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["layer", "expert", "label", "count", "gate_mass"])
    routing = data["routing"] or {"layers": [], "labels": None}
    for layer in routing["layers"]:
        for e, (n, mass) in enumerate(zip(layer["counts"], layer["gate_mass"], strict=True)):
            w.writerow([layer["index"], e, "*", n, mass])
    for name, label in (routing.get("labels") or {}).items():
        for layer in label["layers"]:
            for e, n in enumerate(layer["counts"]):
                w.writerow([layer["index"], e, name, n, ""])
    return out.getvalue()
