"""`trace --corpus --html`: the workload JSON (llmcli.workload_json) as one self-contained page, drawn by
llmcli.report_html like `trace --html` (heatmaps with exact values on hover, tables with inline bars)."""

from __future__ import annotations

from llmcli.report_html import bar_cell, esc, heatmap, html_part, render_page, section, table, write_page
from llmcli.trace_render import fmt
from llmcli.units import human_bytes
from llmcli.workload_render import SHORT, pct


def load_section(routing: dict) -> dict:
    layers = routing["layers"]
    e = routing["num_experts"]
    rows = [str(layer["index"]) for layer in layers]
    values, tips = [], []
    for layer in layers:
        total = sum(layer["counts"]) or 1
        values.append([c * e / total for c in layer["counts"]])
        tips.append([f"{c} tokens, gate mass {fmt(m)}" for c, m in zip(layer["counts"], layer["gate_mass"],
                                                                       strict=True)])
    fig = heatmap("Expert load", rows, [str(i) for i in range(e)], values, tips=tips, scale="log",
                  col_name="expert", value_name="count / fair share",
                  note="each expert's share of the layer's activations over 1/experts (1 = even; log colour)")
    return section("Expert load", [fig])


def balance_section(routing: dict) -> dict:
    columns = ["layer", "cv", "jain", "entropy", "max/min", "idle", "top 5%", "10%", "25%", "50%",
               "router entropy", "shared RMS", "routed RMS", "frequent pairs"]
    rows = []
    for layer in routing["layers"]:
        cov = layer["coverage"]
        pairs = ", ".join(f"{p['experts'][0]}+{p['experts'][1]} ({pct(p['share'])})" for p in layer["pairs"][:4])
        rows.append([esc(layer["index"]), esc(fmt(layer["cv"])), bar_cell(layer["jain"], 1, fmt(layer["jain"])),
                     bar_cell(layer["entropy"], 1, fmt(layer["entropy"]), "bar2"),
                     esc(fmt(layer["max_min"]) if layer["max_min"] is not None else "∞"), esc(layer["unused"]),
                     *[bar_cell(cov[k], 1, pct(cov[k]), "bar3") for k in ("5%", "10%", "25%", "50%")],
                     bar_cell(layer["router_entropy"], layer["router_entropy_max"],
                              f"{fmt(layer['router_entropy'])}/{fmt(layer['router_entropy_max'])}"),
                     esc(fmt(layer["shared_rms"])), esc(fmt(layer["routed_rms"])), esc(pairs)])
    return section("Balance", [html_part(table(columns, rows))],
                   "cv 0, jain 1 and entropy 1 are an even load; coverage: activations taken by the busiest "
                   "5/10/25/50% of the layer's experts")


def labels_section(routing: dict) -> dict:
    names = list(routing["labels"])
    parts = []
    for name in names:
        label = routing["labels"][name]
        e = routing["num_experts"]
        values = [[c * e / (sum(layer["counts"]) or 1) for c in layer["counts"]] for layer in label["layers"]]
        parts.append(heatmap(f"{name}: {label['prompts']} prompts, {label['tokens']} tokens",
                             [str(layer["index"]) for layer in label["layers"]], [str(i) for i in range(e)],
                             values, scale="log", col_name="expert", value_name="count / fair share"))
    rows = [[esc(s["index"]), esc(fmt(s["divergence"])),
             esc(", ".join(f"{x['expert']}→{x['label']} ({pct(x['share_in_label'])} vs {pct(x['share_elsewhere'])})"
                           for x in s["experts"]))] for s in routing["separation"]]
    parts.insert(0, html_part(table(["layer", "JS divergence (bits)", "experts that separate the labels"], rows)))
    return section("Labels", parts, "which experts each label uses; the divergence of the labels' expert "
                                    "distributions per layer and the experts that make it")


def activations_section(activations: dict) -> dict:
    layers = activations["layers"]
    names = [n for n in SHORT if any(n in layer["points"] for layer in layers)]
    rows = [str(layer["index"]) for layer in layers]

    def grid(stat, key):
        return [[(layer["points"][n][stat][key] if n in layer["points"] else None) for n in names]
                for layer in layers]

    figs = [heatmap("RMS p99", rows, [SHORT[n] for n in names], grid("rms", "p99"), scale="log",
                    col_name="point", value_name="per-token RMS, 99th percentile"),
            heatmap("max |x|", rows, [SHORT[n] for n in names], grid("max_abs", "max"), scale="log",
                    col_name="point", value_name="largest |x|", palette="magma")]
    massive = [[esc(layer["index"]), esc(SHORT.get(n, n)), esc(p["massive"]["values"]), esc(p["massive"]["tokens"]),
                esc(" ".join(f"{c}({k})" for c, k in p["massive"]["channels"])),
                esc(" ".join(f"{q}({k})" for q, k in p["massive"]["positions"]))]
               for layer in layers for n, p in layer["points"].items() if p["massive"]["values"]]
    if massive:
        figs.append(html_part(table(["layer", "point", "values", "tokens", "channels (count)",
                                     "positions (count)"], massive)))
    return section("Activations", figs, f"quantiles from a {activations['estimator']}; massive: |x| above "
                                        f"{activations['massive_factor']:g}x the median |x| of the point")


def plan_section(plan: dict | None, curve: list[dict]) -> dict:
    rows = [[esc(f"{c['share'] * 100:g}%"), esc(human_bytes(c["budget_bytes"])), bar_cell(c["hit_rate"], 1,
                                                                                           pct(c["hit_rate"])),
             esc(human_bytes(c["bytes_per_token"] or 0))] for c in curve]
    parts = [html_part(table(["experts resident", "memory", "hit rate", "expert bytes read per token"], rows))]
    if plan:
        parts.insert(0, html_part(
            f"<p>{esc(human_bytes(plan['budget_bytes']))}: {plan['resident_experts']} of {plan['total_experts']} "
            f"experts resident, hit rate {esc(pct(plan['hit_rate']))} (uniform routing "
            f"{esc(pct(plan['uniform_hit_rate']))}), {esc(human_bytes(plan['bytes_per_token'] or 0))} of expert "
            f"weights read per token</p>"))
    return section("Expert plan", parts, "the busiest experts of the workload kept resident; the rest streamed")


def write_workload_html(data: dict, path: str) -> int:
    c = data["corpus"]
    facts = [("model", data["model"]), ("prompts", str(c["prompts"])),
             ("tokens", f"{c['tokens']} prompt + {c['generated']} generated"), ("skipped", str(c["skipped"])),
             ("speed", f"{fmt(c['tokens_per_second'])} tok/s")]
    sections = []
    routing = data["routing"]
    if routing:
        sections += [load_section(routing), balance_section(routing)]
        if routing.get("labels"):
            sections.append(labels_section(routing))
    sections.append(activations_section(data["activations"]))
    if routing and data.get("plan_curve"):
        sections.append(plan_section(data.get("plan"), data["plan_curve"]))
    return write_page(render_page(f"llmcli trace --corpus: {data['model']}", facts, sections), path)
