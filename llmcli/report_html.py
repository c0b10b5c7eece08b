"""Self-contained HTML reports: one file, no network when viewed (styles and script inlined).

Takes plain data only (lists, dicts, strings), so any command can build a report: `trace` for one prompt
(llmcli.trace_html) and workload statistics alike. A page is a title, a list of (label, value) facts and
sections; a section holds parts, each either
- a heatmap (`heatmap(...)`): drawn on a canvas by the inlined script, with a colour legend and a
  tooltip giving the row, the column and the exact value (plus an optional line per cell); or
- ready HTML (`html_part(...)`), e.g. a table from `table(...)` with inline bars from `bar_cell(...)`.

Why no plotting library: the ones that inline (Plotly ~3.5 MB, Vega + Vega-Lite ~1 MB minified) would
take most of the 5 MB budget of a 60-layer, 256-expert report before any data, and need no feature
beyond heatmaps and bars; a canvas per heatmap draws 60 x 256 cells in milliseconds. The script is
~200 lines of plain JavaScript in llmcli/assets/report.js.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"


def heatmap(title: str, rows: list[str], cols: list[str], values: list[list[float | None]], *,
            note: str = "", cells: list[list[str]] | None = None, tips: list[list[str]] | None = None,
            scale: str = "linear", palette: str = "viridis", row_name: str = "layer", col_name: str = "token",
            value_name: str = "value", vmin: float | None = None, vmax: float | None = None) -> dict:
    """A rows x cols heatmap. `cells`: text drawn in each cell; `tips`: an extra tooltip line per cell;
    `scale`: "linear" or "log" (colour by log10, for values spanning decades); None values stay blank;
    `vmin`/`vmax` fix the colour range (default: the data's)."""
    if len(values) != len(rows) or any(len(r) != len(cols) for r in values):
        raise ValueError(f"heatmap {title!r}: values must be {len(rows)} x {len(cols)}")
    return {"kind": "heatmap", "title": title, "note": note, "rows": rows, "cols": cols,
            "values": [[_finite(v) for v in r] for r in values], "cells": cells, "tips": tips, "scale": scale,
            "palette": palette, "row_name": row_name, "col_name": col_name, "value_name": value_name,
            "vmin": vmin, "vmax": vmax}


def html_part(markup: str) -> dict:
    return {"kind": "html", "html": markup}


def section(title: str, parts: list[dict], note: str = "", anchor: str | None = None) -> dict:
    return {"title": title, "note": note, "parts": parts, "anchor": anchor or _anchor(title)}


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def table(columns: list[str], rows: list[list[str]], classes: str = "") -> str:
    """An HTML table; cells are HTML already (escape text with `esc`)."""
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="data {classes}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def bar_cell(value: float | None, top: float | None, text: str, hue: str = "bar") -> str:
    """A cell with `text` over a bar of value/top (the exact value in the title)."""
    share = 0.0 if not value or not top or top <= 0 else max(0.0, min(1.0, value / top))
    return (f'<div class="cellbar" title="{esc(value)}"><span class="{hue}" style="width:{share * 100:.1f}%">'
            f'</span><b>{esc(text)}</b></div>')


def render_page(title: str, facts: list[tuple[str, str]], sections: list[dict]) -> str:
    """The whole page as one string."""
    figures, body = [], []
    for sec in sections:
        body.append(f'<section id="{esc(sec["anchor"])}"><h2>{esc(sec["title"])}</h2>')
        if sec["note"]:
            body.append(f'<p class="note">{esc(sec["note"])}</p>')
        for part in sec["parts"]:
            if part["kind"] == "html":
                body.append(part["html"])
            else:
                body.append(f'<div class="fig" data-fig="{len(figures)}"></div>')
                figures.append(part)
        body.append("</section>")
    nav = " · ".join(f'<a href="#{esc(s["anchor"])}">{esc(s["title"])}</a>' for s in sections)
    facts_html = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts)
    payload = json.dumps(figures, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    payload = payload.replace("</", "<\\/")  # nothing in the data can close the script element
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',  # no favicon request
        f"<title>{esc(title)}</title>",
        f"<style>{(ASSETS / 'report.css').read_text(encoding='utf-8')}</style>",
        "</head><body>",
        f"<header><h1>{esc(title)}</h1><dl class=\"facts\">{facts_html}</dl><nav>{nav}</nav></header>",
        "<main>", *body, "</main>",
        '<div id="tip" hidden></div>',
        f'<script type="application/json" id="figures">{payload}</script>',
        f"<script>{(ASSETS / 'report.js').read_text(encoding='utf-8')}</script>",
        "</body></html>",
    ])


def write_page(text: str, path: str | Path) -> int:
    """Write the page; returns its size in bytes."""
    data = text.encode("utf-8")
    Path(path).write_bytes(data)
    return len(data)


def _finite(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _anchor(title: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")
