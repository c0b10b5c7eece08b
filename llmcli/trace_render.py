"""rich tables for `llmcli trace`, drawn from the JSON dict that `build_trace_json` returns, so the
tables and `--json` can never disagree."""

from __future__ import annotations

import json

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from llmcli.trace import HOOK_POINTS
from llmcli.trace_dsa import positions_text
from llmcli.trace_hybrid import hybrid_table

BLOCKS = " ▏▎▍▌▋▊▉█"
SPARKS = " ▁▂▃▄▅▆▇█"
BAR_WIDTH = 12
# Short column names for the hook points keep the tables inside 80 columns.
SHORT = {"resid_pre": "pre", "attn_out": "attn", "resid_mid": "mid", "mlp_out": "mlp", "resid_post": "post"}
LEGEND = "pre/mid/post: residual stream in, after attention, out · attn/mlp: block outputs"
MAX_SPARK = 32  # widest load histogram; more experts are pooled into buckets
MAX_DECODE_ROUTER_COLUMNS = 3

# attention_info key -> column header, in display order; unknown keys follow with their own names.
ATTENTION_COLUMNS = {
    "type": "type", "window": "window", "span": "span", "heads": "heads", "kv_heads": "kv heads",
    "head_dim": "head dim", "rope_base": "RoPE base", "ntk_alpha": "NTK α", "logn_scale": "LogN",
    "yarn_factor": "YaRN ×", "rope_scale": "cos/sin ×", "mscale": "mscale", "softmax_scale": "softmax ×",
    "kv_lora_rank": "latent", "q_lora_rank": "q latent", "qk_rope_head_dim": "rope dim",
    "cache_bytes_per_token": "cache B/tok", "v_head_dim": "v dim", "rope_interleaved": "interleaved RoPE",
    "rotary_dim": "rot dim", "output_gate": "gate", "value_head_dim": "v dim", "conv_kernel": "conv",
    "state_bytes_per_sequence": "state B/seq", "window_bytes_per_token": "window B/tok",
    "index_bytes_per_entry": "index B/entry",
}


def bar(value: float | None, top: float | None, width: int = BAR_WIDTH) -> str:
    """A horizontal bar of `value / top` in eighth-block steps."""
    if not value or not top or top <= 0:
        return ""
    eighths = round(max(0.0, min(1.0, value / top)) * width * 8)
    full, rest = divmod(eighths, 8)
    return "█" * full + (BLOCKS[rest] if rest else "")


def sparkline(counts: list[int]) -> str:
    """Expert load as one character per expert (pooled into at most MAX_SPARK buckets)."""
    if not counts:
        return ""
    size = -(-len(counts) // MAX_SPARK)
    buckets = [sum(counts[i:i + size]) for i in range(0, len(counts), size)]
    top = max(buckets)
    if top == 0:
        return SPARKS[0] * len(buckets)
    return "".join(SPARKS[min(8, -(-c * 8 // top))] if c else SPARKS[0] for c in buckets)


def fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e9:
            return str(int(value))  # RoPE bases, YaRN factors
        return f"{value:.1f}" if abs(value) >= 1000 else f"{value:.3g}"
    if isinstance(value, list):
        if len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
            return f"{fmt(value[0])}–{fmt(value[1])}"
        return ",".join(fmt(v) for v in value)
    if isinstance(value, dict):
        return " ".join(f"{k}={fmt(v)}" for k, v in value.items())
    return str(value)


def show_token(token: str) -> str:
    return json.dumps(token, ensure_ascii=False)[1:-1]


def expert_choice(experts: list[int], weights: list[float]) -> str:
    return " ".join(f"{e}:{w:.2f}" for e, w in zip(experts, weights, strict=True))


def new_table(title: str | None) -> Table:
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)


def residual_table(data: dict, show_final: bool) -> Table:
    layers = data["layers"]
    with_kind = any(layer["kind"] != "dense" for layer in layers)
    # Bars compare layers; the final norm's output has its own scale (the norm weight), so no bar.
    top = max((layer["rms"]["resid_post"] or 0 for layer in layers), default=0)
    table = new_table(f"RMS over hidden (mean of {len(data['token_ids'])} tokens); max|x| and bar: post")
    table.add_column("layer", justify="right")
    if with_kind:
        table.add_column("kind")
    for name in HOOK_POINTS:
        table.add_column(SHORT[name], justify="right")
    table.add_column("max|x|", justify="right")
    table.add_column("", no_wrap=True)
    for layer in layers:
        rms = layer["rms"]
        kind = [layer["kind"]] if with_kind else []
        table.add_row(str(layer["index"]), *kind, *(fmt(rms[n]) for n in HOOK_POINTS),
                      fmt(layer["max_abs"]["resid_post"]), Text(bar(rms["resid_post"], top), style="green"))
    if show_final:
        final = data["final_norm"]
        label = ["norm", ""] if with_kind else ["norm"]
        table.add_row(*label, *([""] * (len(HOOK_POINTS) - 1)), fmt(final["rms"]), fmt(final["max_abs"]), "")
    return table


def per_token_table(data: dict, layer: dict) -> Table:
    per_token = layer["rms_per_token"]
    top = max(per_token["resid_post"], default=0)
    table = new_table(f"layer {layer['index']} ({layer['kind']}) RMS per token; bar: post")
    table.add_column("pos", justify="right")
    table.add_column("token")
    for name in HOOK_POINTS:
        table.add_column(SHORT[name], justify="right")
    table.add_column("", no_wrap=True)
    for pos, token in enumerate(data["tokens"]):
        row = [str(pos), token_text(data, pos, token)]
        row += [fmt(per_token[n][pos]) if pos < len(per_token[n]) else "" for n in HOOK_POINTS]
        row.append(Text(bar(per_token["resid_post"][pos], top), style="green"))
        table.add_row(*row)
    return table


def router_tokens_table(data: dict, layer: dict) -> Table:
    router = layer["router"]
    table = new_table(f"layer {layer['index']} router choices per token")
    table.add_column("pos", justify="right")
    table.add_column("token")
    table.add_column("expert:weight, top first")
    if router["groups"] is not None:
        table.add_column("groups")
    table.add_column("entropy", justify="right")
    for pos, token in enumerate(data["tokens"]):
        row = [str(pos), token_text(data, pos, token),
               expert_choice(router["experts"][pos], router["weights"][pos])]
        if router["groups"] is not None:
            row.append(",".join(str(g) for g in router["groups"][pos]))
        row.append(fmt(router["entropy_per_token"][pos]))
        table.add_row(*row)
    return table


def indexer_tokens_table(data: dict, layer: dict) -> Table:
    """Sparse attention: the positions the indexer kept for each query (llmcli.trace_dsa)."""
    indexer = layer["indexer"]
    table = new_table(f"layer {layer['index']} sparse attention: positions kept per query (top {indexer['topk']})")
    for name in ("pos", "token", "kept/seen", "positions kept", "overlap", "entropy"):
        table.add_column(name, justify="left" if name in ("token", "positions kept") else "right")
    for pos, token in enumerate(data["tokens"][: len(indexer["selected"])]):
        kept, seen = indexer["selected"][pos], indexer["visible"][pos]
        table.add_row(str(pos), token_text(data, pos, token), f"{len(kept)}/{seen}", positions_text(kept),
                      fmt(indexer["overlap"][pos]), fmt(indexer["entropy"][pos]))
    return table


def indexer_table(data: dict) -> Table:
    table = new_table("sparse attention (DSA indexer): queries that saw more than top-k positions")
    for name in ("layer", "top-k", "sparse queries", "overlap with dense top", "score entropy"):
        table.add_column(name, justify="right")
    for layer in data["layers"]:
        if layer.get("indexer"):
            ix = layer["indexer"]
            table.add_row(str(layer["index"]), str(ix["topk"]), str(ix["sparse_queries"]), fmt(ix["mean_overlap"]),
                          fmt(ix["mean_entropy"]))
    return table


def token_text(data: dict, pos: int, token: str) -> Text:
    """Generated tokens in cyan, prompt tokens plain."""
    return Text(show_token(token), style="cyan" if pos >= data["prompt_tokens"] else "")


def router_table(data: dict) -> Table:
    table = new_table("router (expert load over all traced tokens)")
    for name, justify in (("layer", "right"), ("load per expert", "left"), ("busiest", "left"),
                          ("entropy/max", "right"), ("shared rms", "right"), ("routed rms", "right")):
        table.add_column(name, justify=justify, no_wrap=name == "load per expert")
    for layer in data["layers"]:
        router = layer["router"]
        if router is None:
            table.add_row(str(layer["index"]), Text("dense", style="dim"), "", "", "", "")
            continue
        load = router["load"]
        busiest = sorted(range(len(load)), key=lambda e: -load[e])[:3]
        entropy = f"{fmt(router['entropy'])}/{fmt(router['max_entropy'])}"
        table.add_row(str(layer["index"]), Text(sparkline(load), style="magenta"),
                      " ".join(f"{e}×{load[e]}" for e in busiest if load[e]), entropy,
                      fmt(router["shared_rms"]), fmt(router["routed_rms"]))
    return table


def attention_section(data: dict) -> tuple[str, Table, str]:
    """A per-layer table of what differs between the layers shown, and one line for what they share
    (most models repeat the same heads, RoPE and cache facts in every layer)."""
    infos = [layer["attention"] for layer in data["layers"]]
    keys = [k for k in ATTENTION_COLUMNS if any(info.get(k) is not None for info in infos)]
    keys += sorted({k for info in infos for k, v in info.items() if k not in ATTENTION_COLUMNS and v is not None})
    differs = {k for k in keys if len({json.dumps(info.get(k)) for info in infos}) > 1}
    columns = [k for k in keys if k in ("type", "window", "span") or k in differs]
    shared = [k for k in keys if k not in columns]
    # The heading goes above, not in, the table: a narrow table would wrap its title.
    heading = f"attention after the prompt ({data['prompt_tokens']} tokens)"
    table = new_table(None)
    table.add_column("layer", justify="right")
    for key in columns:
        table.add_column(ATTENTION_COLUMNS.get(key, key), justify="left" if key == "type" else "right")
    for layer, info in zip(data["layers"], infos, strict=True):
        table.add_row(str(layer["index"]), *(fmt(info.get(k)) for k in columns))
    line = " · ".join(f"{ATTENTION_COLUMNS.get(k, k)} {fmt(infos[0].get(k))}" for k in shared)
    return heading, table, (f"every layer shown: {line}" if line else "")


def decode_table(data: dict) -> Table:
    moe = [layer for layer in data["layers"] if layer["router"]][:MAX_DECODE_ROUTER_COLUMNS]
    steps = data["decode_steps"]
    logn = any(a.get("logn_scale") is not None for s in steps for a in s["attention"])
    windows = any(a.get("window") for s in steps for a in s["attention"])
    table = new_table(f"{len(steps)} decode steps (greedy)")
    for name in ("step", "pos", "token in", "→ next", "length") + (("capped by window",) if windows else ()):
        table.add_column(name, justify="right" if name in ("step", "pos", "length") else "left")
    if logn:
        table.add_column("LogN", justify="right")
    for layer in moe:
        table.add_column(f"L{layer['index']} experts")
    for step in steps:
        row = [str(step["step"]), str(step["position"]), Text(show_token(step["token"]), style="cyan"),
               Text(show_token(step["next_token"]), style="cyan"), str(step["length"])]
        if windows:
            capped = [f"L{a['layer']}:{a['window']}" for a in step["attention"]
                      if a.get("window") and a["window"] < step["length"]]
            row.append(" ".join(capped) or "none")
        if logn:
            row.append(fmt(step["attention"][0].get("logn_scale")))
        for layer in moe:
            row.append(" ".join(str(e) for e in layer["router"]["experts"][step["position"]]))
        table.add_row(*row)
    return table


def render_trace(data: dict, console: Console, per_token: bool = False, filtered: bool = False) -> None:
    generated = len(data["generated_token_ids"])
    shown = "all" if not filtered else ", ".join(str(layer["index"]) for layer in data["layers"])
    console.print(
        f"[bold]{data['model']}[/]: {data['prompt_tokens']} prompt tokens"
        + (f" + {generated} generated" if generated else "")
        + f" | layers {shown} of {data['num_layers']}",
        highlight=False,
    )
    console.print(LEGEND, style="dim", highlight=False)
    console.print(residual_table(data, show_final=not filtered))
    mixers = hybrid_table(data)  # Gated DeltaNet / gated attention layers, where the model has them
    if mixers is not None:
        console.print(mixers)
    if per_token:
        for layer in data["layers"]:
            console.print(per_token_table(data, layer))
            if layer["router"]:
                console.print(router_tokens_table(data, layer))
            if layer.get("indexer"):
                console.print(indexer_tokens_table(data, layer))
    if any(layer["kind"] == "moe" for layer in data["layers"]):
        console.print(router_table(data))
    if any(layer.get("indexer") for layer in data["layers"]):
        console.print(indexer_table(data))
    heading, table, shared = attention_section(data)
    console.print(heading, style="italic", highlight=False)
    console.print(table)
    if shared:
        console.print(shared, style="dim", highlight=False, markup=False)
    if data["decode_steps"]:
        console.print(decode_table(data))
    console.print(f"next token: {show_token(data['next_token'])!s} (id {data['next_token_id']})",
                  highlight=False, markup=False)
