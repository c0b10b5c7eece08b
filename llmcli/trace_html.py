"""`trace --html`: the trace JSON (`build_trace_json`) as one self-contained page.

Every section is a function of the plain JSON dict, so other commands (workload traces) can reuse the
ones whose data they have; llmcli.report_html draws the page."""

from __future__ import annotations

import json

from llmcli.errors import LlmcliError
from llmcli.report_html import bar_cell, esc, heatmap, html_part, render_page, section, table, write_page
from llmcli.trace import HOOK_POINTS
from llmcli.trace_render import ATTENTION_COLUMNS, fmt, show_token

STATS = (("entropy", "entropy (nats)", "viridis"), ("sink", "mass on the first token", "magma"),
         ("distance", "mean attended distance (tokens)", "viridis"))


def token_labels(data: dict) -> list[str]:
    """Column labels: position and the token's text, escaped like the terminal shows it."""
    return [f"{i} {show_token(t)}" for i, t in enumerate(data["tokens"])]


def layer_labels(layers: list[dict]) -> list[str]:
    return [str(layer["index"]) for layer in layers]


def _pad(values: list, n: int) -> list:
    return list(values[:n]) + [None] * (n - len(values))


def header_facts(data: dict) -> list[tuple[str, str]]:
    settings = data.get("settings") or {}
    traced = len(data["layers"])
    shown = f" ({traced} traced)" if traced != data["num_layers"] else ""
    facts = [("model", data["model"]),
             ("layers", f"{data['num_layers']} layers{shown}"),
             ("tokens", f"{data['prompt_tokens']} prompt + {len(data['generated_token_ids'])} generated")]
    if "prompt" in settings:
        facts.append(("prompt", settings["prompt"]))
    facts.append(("next token", f"{show_token(data['next_token'])} (id {data['next_token_id']})"))
    rest = {k: v for k, v in settings.items() if k != "prompt"}
    if rest:
        facts.append(("settings", " · ".join(f"{k}={fmt(v)}" for k, v in rest.items())))
    return facts


def overview_section(data: dict) -> dict:
    """One row per layer: the terminal overview with exact values in the bars' titles."""
    layers = data["layers"]
    top = max((layer["rms"]["resid_post"] or 0 for layer in layers), default=0)
    lens = data.get("logit_lens")
    columns = ["layer", "kind", "attention", "RMS post", "max|x| post", "experts used", "router entropy"]
    columns += ["lens top-1 (last token)"] if lens else []
    columns += ["attn entropy"] if any(layer.get("attention_stats") for layer in layers) else []
    rows = []
    for layer in layers:
        att, router = layer["attention"], layer["router"]
        row = [esc(layer["index"]), esc(layer["kind"]), esc(attention_brief(att)),
               bar_cell(layer["rms"]["resid_post"], top, fmt(layer["rms"]["resid_post"])),
               esc(fmt(layer["max_abs"]["resid_post"]))]
        if router:
            used = sum(1 for c in router["load"] if c)
            row += [bar_cell(used, router["num_experts"], f"{used}/{router['num_experts']}", "bar2"),
                    bar_cell(router["entropy"], router["max_entropy"],
                             f"{fmt(router['entropy'])}/{fmt(router['max_entropy'])}", "bar3")]
        else:
            row += ["", ""]
        if lens:
            row.append(lens_brief(layer))
        if "attn entropy" in columns:
            stats = layer.get("attention_stats")
            row.append(esc(fmt(sum(stats["entropy"]) / len(stats["entropy"]))) if stats else "")
        rows.append(row)
    return section("Overview", [html_part(table(columns, rows))],
                   "one row per layer; bars compare layers (hover a bar for the exact value)")


def attention_brief(att: dict) -> str:
    kind = att.get("type") or "?"
    if att.get("window"):
        return f"{kind} {att['window']} (span {att.get('span')})"
    if kind == "mla":
        return f"mla latent {att.get('kv_lora_rank')}"
    return f"{kind} (span {att.get('span')})"


def lens_brief(layer: dict) -> str:
    lens = layer.get("logit_lens")
    if not lens or not lens["top_ids"]:
        return ""
    token, prob = lens["top_tokens"][-1][0], lens["top_probs"][-1][0]
    return f'<span class="tok">{esc(show_token(token))}</span> {esc(fmt(prob))}'


def residual_section(data: dict) -> dict:
    layers, cols = data["layers"], token_labels(data)
    rows, n = layer_labels(layers), len(cols)
    parts = []
    for key, what in (("rms_per_token", "RMS over hidden"), ("max_abs_per_token", "max |x| over hidden")):
        for point in HOOK_POINTS:
            values = [_pad(layer.get(key, {}).get(point, []), n) for layer in layers]
            parts.append(heatmap(f"{what} at {point}", rows, cols, values, scale="log",
                                 palette="viridis" if key == "rms_per_token" else "magma", value_name=what))
    return section("Residual stream", parts, "per layer and token, at each hook point; colour on a log scale")


def lens_section(data: dict) -> dict | None:
    lens = data.get("logit_lens")
    layers = [layer for layer in data["layers"] if layer.get("logit_lens")]
    if not lens or not layers:
        return None
    cols, rows = token_labels(data), layer_labels(layers)
    targets = [show_token(t) for t in lens["targets"]]
    top_cells, top_values, tips, target_values = [], [], [], []
    for layer in layers:
        ll = layer["logit_lens"]
        top_cells.append([show_token(t[0]) for t in ll["top_tokens"]])
        top_values.append([p[0] for p in ll["top_probs"]])
        tips.append([
            "top: " + "  ".join(f"{show_token(t)} {fmt(p)}" for t, p in zip(toks, probs, strict=True))
            + f"\np(final {targets[i]!s}) = {fmt(ll['target_prob'][i])}"
            for i, (toks, probs) in enumerate(zip(ll["top_tokens"], ll["top_probs"], strict=True))])
        target_values.append(ll["target_prob"])
    parts = [
        heatmap("top-1 token after each layer (colour: its probability)", rows, cols, top_values,
                cells=top_cells, tips=tips, palette="blues", value_name="probability", vmin=0.0, vmax=1.0),
        heatmap("probability of the token the model finally predicts at that position", rows, cols, target_values,
                cells=[targets for _ in layers], palette="blues", value_name="probability", vmin=0.0, vmax=1.0),
    ]
    note = (f"each layer's output through the final norm and the head (top {lens['k']}); the column is the "
            "position whose next token is predicted")
    return section("Logit lens", parts, note)


def attention_table(data: dict) -> str:
    infos = [layer["attention"] for layer in data["layers"]]
    keys = [k for k in ATTENTION_COLUMNS if any(info.get(k) is not None for info in infos)]
    keys += sorted({k for info in infos for k, v in info.items() if k not in ATTENTION_COLUMNS and v is not None})
    rows = [[esc(layer["index"])] + [esc(fmt(info.get(k))) for k in keys]
            for layer, info in zip(data["layers"], infos, strict=True)]
    return table(["layer"] + [ATTENTION_COLUMNS.get(k, k) for k in keys], rows)


def attention_section(data: dict) -> dict:
    layers, cols = data["layers"], token_labels(data)
    rows, n = layer_labels(layers), len(cols)
    visible = []  # which tokens the last query can attend to
    for layer in layers:
        window = layer["attention"].get("window")
        visible.append([1.0 if not window or j > n - 1 - window else 0.0 for j in range(n)])
    parts = [html_part(attention_table(data)),
             heatmap("window span: tokens the last query sees", rows, cols, visible, palette="blues",
                     value_name="visible", vmin=0.0, vmax=1.0)]
    with_stats = [layer for layer in layers if layer.get("attention_stats")]
    if with_stats:
        stat_rows = layer_labels(with_stats)
        heads = [f"h{h}" for h in range(len(with_stats[0]["attention_stats"]["entropy"]))]
        for key, name, palette in STATS:
            parts.append(heatmap(f"{name} per head (mean over queries)", stat_rows, heads,
                                 [layer["attention_stats"][key] for layer in with_stats], palette=palette,
                                 col_name="head", value_name=name))
        for key, name, palette in STATS:
            parts.append(heatmap(f"{name} per query token (mean over heads)", stat_rows, cols,
                                 [_pad(layer["attention_stats"][f"{key}_per_token"], n) for layer in with_stats],
                                 palette=palette, value_name=name))
    return section("Attention", parts, "per layer: what the model's attention_info reports, the span after the "
                   "last token, and statistics from the attention probabilities (--attention-stats)")


def router_rows(moe: list[dict]) -> list[list[str]]:
    top_shared = max((layer["router"]["shared_rms"] or 0 for layer in moe), default=0)
    top_routed = max((layer["router"]["routed_rms"] or 0 for layer in moe), default=0)
    top = max(top_shared, top_routed)
    rows = []
    for layer in moe:
        router = layer["router"]
        rows.append([esc(layer["index"]),
                     bar_cell(router["entropy"], router["max_entropy"],
                              f"{fmt(router['entropy'])} / {fmt(router['max_entropy'])}", "bar3"),
                     bar_cell(router["shared_rms"], top, fmt(router["shared_rms"]), "bar"),
                     bar_cell(router["routed_rms"], top, fmt(router["routed_rms"]), "bar2")])
    return rows


def moe_section(data: dict) -> dict | None:
    moe = [layer for layer in data["layers"] if layer.get("router")]
    if not moe:
        return None
    rows, cols = layer_labels(moe), token_labels(data)
    n = len(cols)
    experts = max(layer["router"]["num_experts"] for layer in moe)
    parts = [heatmap("expert load: tokens routed to each expert", rows, [str(e) for e in range(experts)],
                     [_pad(layer["router"]["load"], experts) for layer in moe], palette="magma",
                     col_name="expert", value_name="tokens")]
    cells, values, tips = [], [], []
    for layer in moe:
        router = layer["router"]
        groups = router["groups"]
        cells.append(_pad([str(e[0]) for e in router["experts"]], n))
        values.append(_pad(router["entropy_per_token"], n))
        tips.append(_pad([" ".join(f"{e}:{fmt(w)}" for e, w in zip(es, ws, strict=True))
                          + (f"\ngroups kept: {','.join(map(str, groups[i]))}" if groups else "")
                          for i, (es, ws) in enumerate(zip(router["experts"], router["weights"], strict=True))], n))
    parts.append(heatmap("expert choices per token (cell: top expert; hover: every expert:weight and the groups kept; "
                         "colour: router entropy)", rows, cols, values, cells=cells, tips=tips,
                         value_name="router entropy (nats)"))
    grouped = [layer for layer in moe if layer["router"]["groups"]]
    if grouped:
        count = 1 + max(g for layer in grouped for row in layer["router"]["groups"] for g in row)
        kept = [[sum(g in row for row in layer["router"]["groups"]) for g in range(count)] for layer in grouped]
        parts.append(heatmap("groups kept by group-limited routing (tokens per group)", layer_labels(grouped),
                             [str(g) for g in range(count)], kept, palette="blues", col_name="group",
                             value_name="tokens"))
    parts.append(html_part(table(["layer", "router entropy / max", "shared RMS", "routed RMS"], router_rows(moe))))
    return section("Mixture of experts", parts, "routing per MoE layer over every traced token")


def decode_section(data: dict) -> dict | None:
    steps = data["decode_steps"]
    if not steps:
        return None
    rows = [[esc(s["step"]), esc(s["position"]), f'<span class="tok gen">{esc(show_token(s["token"]))}</span>',
             f'<span class="tok gen">{esc(show_token(s["next_token"]))}</span>', esc(s["length"])] for s in steps]
    return section("Decode steps", [html_part(table(["step", "pos", "token in", "next", "length"], rows))])


def trace_sections(data: dict) -> list[dict]:
    built = [overview_section(data), lens_section(data), residual_section(data), attention_section(data),
             moe_section(data), decode_section(data)]
    return [s for s in built if s is not None]


def trace_html(data: dict) -> str:
    """The report page for one trace (a `build_trace_json` dict, or the same loaded from `--json`)."""
    json.dumps(data, allow_nan=False)  # the data must be plain JSON: fail here, not in the browser
    return render_page(f"llmcli trace · {data['model']}", header_facts(data), trace_sections(data))


def write_trace_html(data: dict, path: str) -> int:
    """Write the report; an unwritable path is a one-line error. Returns the size in bytes."""
    try:
        size = write_page(trace_html(data), path)
    except OSError as exc:
        raise LlmcliError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return size
