"""`llmcli trace`: per-layer activation RMS, router choices and attention facts for one prompt."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console

from llmcli.cli.app import app
from llmcli.cli.common import (
    DEVICE_OPT,
    DTYPE_OPT,
    EP_OPT,
    FORCE_OPT,
    MODEL_ARG,
    NO_LOGN_OPT,
    NO_NTK_OPT,
    QUANTIZE_OPT,
    TP_OPT,
    WINDOW_OPT,
    YES_OPT,
    Device,
    DType,
    Quantize,
    apply_attention_overrides,
    clean_text,
    err_console,
    load_model,
    other_rank,
    read_stdin,
)
from llmcli.cli.trace_corpus import CORPUS_HELP, check_corpus_options, run_corpus
from llmcli.errors import LlmcliError

# One paragraph per line: the help renderer wraps lines itself and keeps explicit newlines.
TRACE_HELP = "\n\n".join([
    "Look inside the model layer by layer for one prompt; tracing only observes (logits are unchanged).",
    "Per layer: RMS over the hidden dimension (mean over tokens) and max |x| at resid_pre, attn_out, "
    "resid_mid, mlp_out and resid_post, with a bar to see growth across layers; MoE router choices "
    "(experts and weights per token, groups, load histogram, entropy, shared vs routed RMS); the "
    "attention in use (full or sliding window and its span, LogN, NTK alpha, RoPE base, YaRN, MLA "
    "latent sizes, heads, cache bytes per token).",
    "Sparse attention (DeepSeek-V3.2's DSA): per query the positions the indexer kept (--tokens, JSON "
    "`layers[].indexer`), their overlap with the positions dense attention weighs most, and the entropy "
    "of the index scores. Example: llmcli trace deepseek-v3.2 -p 'a long prompt' --tokens --layer 5",
    "DeepSeek-V4 (JSON `layers[].v4`): the compressed entries each layer holds, each query's indexer picks "
    "in CSA layers, each head's sink mass, the hyper-connections' stream mixing matrices and each residual "
    "stream's RMS; `attention.routing` marks hash-routed layers. Example: llmcli trace deepseek-v4-flash "
    "-p 'a long prompt' --json -",
    "--logit-lens [K] adds, after every layer, the top-K tokens (default 5) through the final norm and head "
    "and the probability of the token the model finally predicts; --attention-stats adds per layer and head "
    "the attention entropy, the mass on the first token (sink) and the mean attended distance; --html FILE "
    "writes one self-contained page (heatmaps with hover values, no network needed to view it).",
    "Under torchrun with --tp/--ep every rank traces its share and rank 0 prints the whole model's figures, "
    "those of one process: torchrun --nproc-per-node 2 -m llmcli trace MODEL --tp 2 --attention-stats --json -",
    "Examples: llmcli trace demo-deepseek --logit-lens --attention-stats --html trace.html · "
    "llmcli trace Qwen/Qwen2.5-0.5B-Instruct -p 'The capital of France is' --logit-lens 3",
    CORPUS_HELP,
])
LENS_DEFAULT_K = 5
# Options of `trace` that take a value: their value is never read as an option name.
VALUE_OPTIONS = {"--prompt", "-p", "--layer", "-l", "--generate", "-g", "--json", "--html", "--window", "--device",
                 "--dtype", "--logit-lens", "--corpus", "--batch-size", "--max-tokens", "--csv", "--plan-memory",
                 "--tp", "--ep"}


def optional_lens_value(args: list[str]) -> list[str]:
    """`trace ... --logit-lens` without a number means K = 5 (Typer options cannot have optional values):
    the default is inserted where no integer follows. Only the `trace` command's arguments are touched."""
    if not args or args[0] != "trace" or "--logit-lens" not in args:
        return args
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        out.append(arg)
        if arg == "--logit-lens" and (i + 1 == len(args) or not args[i + 1].isdigit()):
            out.append(str(LENS_DEFAULT_K))
        elif arg in VALUE_OPTIONS and i + 1 < len(args):
            out.append(args[i + 1])
            i += 1
        i += 1
    return out


def write_json(data: dict, target: str) -> None:
    text = json.dumps(data, ensure_ascii=False)
    if target == "-":
        sys.stdout.write(text + "\n")
        return
    try:
        Path(target).write_text(text + "\n", encoding="utf-8")
    except OSError as exc:
        raise LlmcliError(f"cannot write {target}: {exc.strerror or exc}") from exc
    err_console.print(f"wrote {target}", style="dim")


@app.command("trace", help=TRACE_HELP)
def trace_command(
    model: str | None = MODEL_ARG,
    prompt: str | None = typer.Option(None, "--prompt", "-p",
                                      help="Prompt text ('-' reads stdin); default: a built-in sentence."),
    layer: list[str] = typer.Option([], "--layer", "-l", metavar="N|A-B|A,B",
                                    help="Only these layers (repeatable), e.g. 3, 2-5, 0,7."),
    tokens: bool = typer.Option(False, "--tokens",
                                help="Also show per-token values (RMS, router choices, sparse attention's kept "
                                     "positions) for each layer."),
    generate: int = typer.Option(0, "--generate", "-g", min=0, help="Also trace N greedy decode steps."),
    json_out: str | None = typer.Option(None, "--json", metavar="FILE|-",
                                        help="Write everything as JSON to FILE, or to stdout with '-' "
                                             "(then no tables)."),
    html_out: str | None = typer.Option(None, "--html", metavar="FILE",
                                        help="Write a self-contained HTML report (heatmaps, hover values)."),
    logit_lens: int = typer.Option(0, "--logit-lens", metavar="[K]", min=0, max=100,
                                   help=f"Top-K tokens after every layer (the logit lens; K defaults to "
                                        f"{LENS_DEFAULT_K})."),
    attention_stats: bool = typer.Option(False, "--attention-stats",
                                         help="Attention entropy, first-token mass and mean distance per head."),
    chat: bool = typer.Option(False, "--chat/--raw", help="Wrap the prompt in the chat template (default: raw)."),
    corpus: str | None = typer.Option(None, "--corpus", metavar="FILE|-",
                                      help="Trace a workload: text (a prompt per line) or JSONL (text/messages, "
                                           "label); '-' reads stdin."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="--corpus: prompts per prefill batch."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1,
                                          help="--corpus: stop after this many prompt tokens."),
    csv_out: str | None = typer.Option(None, "--csv", metavar="FILE|-",
                                       help="--corpus: expert counts as CSV (layer,expert,label,count,gate_mass)."),
    plan_memory: str | None = typer.Option(None, "--plan-memory", metavar="SIZE",
                                           help="--corpus: which experts to keep resident in SIZE (e.g. 24GB) of "
                                                "memory for routed experts: hit rate, bytes read per token."),
    no_logn: bool = NO_LOGN_OPT,
    no_ntk: bool = NO_NTK_OPT,
    window: str | None = WINDOW_OPT,
    device: Device = DEVICE_OPT,
    dtype: DType = DTYPE_OPT,
    yes: bool = YES_OPT,
    quantize: Quantize | None = QUANTIZE_OPT,
    force: bool = FORCE_OPT,
    tp: int = TP_OPT,
    ep: int = EP_OPT,
) -> None:
    from llmcli.cli.generate import prompt_token_ids, stop_token_ids
    from llmcli.trace import DEFAULT_PROMPT, build_trace_json, parse_layer_specs, run_trace, select_layers
    from llmcli.trace_html import write_trace_html
    from llmcli.trace_overview import render_report

    parse_layer_specs(layer)  # bad syntax fails before the model loads
    used = {"--prompt": prompt is not None, "--layer": bool(layer), "--tokens": tokens,
            "--logit-lens": logit_lens > 0, "--attention-stats": attention_stats}
    plan_budget = check_corpus_options(corpus, used, csv_out, plan_memory)
    if corpus is not None and (tp > 1 or ep > 1):
        raise LlmcliError("--corpus traces in one process: leave out --tp/--ep", exit_code=2)
    if corpus is not None:
        loaded = load_model(model, device, dtype, yes=yes, quantize=quantize, force=force)
        apply_attention_overrides(loaded, no_logn, no_ntk, window)
        run_corpus(loaded, corpus, chat=chat, batch_size=batch_size, max_tokens=max_tokens, generate=generate,
                   json_out=json_out, html_out=html_out, csv_out=csv_out, plan_budget=plan_budget,
                   write_json=write_json)
        return
    text = None if other_rank(tp, ep) else read_stdin() if prompt == "-" else clean_text(
        prompt if prompt is not None else DEFAULT_PROMPT)
    loaded = load_model(model, device, dtype, yes=yes, quantize=quantize, force=force, tp=tp, ep=ep)
    text = loaded.runner.shared_text(text)  # a parallel run's ranks trace rank 0's prompt
    writes = not other_rank(tp, ep)  # files come from rank 0 only (the others' stdout goes nowhere)
    apply_attention_overrides(loaded, no_logn, no_ntk, window)
    layers = select_layers(layer, loaded.config.num_layers, loaded.name)
    ids = prompt_token_ids(loaded, text, chat, None)
    run = run_trace(loaded.runner, ids, layers, generate, stop_token_ids(loaded), logit_lens, attention_stats)
    settings = {"prompt": text, "chat": chat, "generate": generate, "layers": layer or None,
                "dtype": str(loaded.model.model.embed_tokens.weight.dtype).removeprefix("torch."),
                "device": str(loaded.runner.device), "window": window, "no_logn": no_logn, "no_ntk": no_ntk,
                "logit_lens": logit_lens, "attention_stats": attention_stats,
                "quantize": loaded.options.quantize}
    if tp > 1 or ep > 1:
        settings["ranks"] = {"tp": tp, "ep": ep}
    data = build_trace_json(run, loaded.model, loaded.tokenizer, loaded.name, settings)
    if html_out and writes:
        size = write_trace_html(data, html_out)
        err_console.print(f"wrote {html_out} ({size / 1e6:.2f} MB)", style="dim")
    if json_out == "-":
        write_json(data, "-")
        return
    render_report(data, Console(highlight=False), per_token=tokens, filtered=layers is not None)
    if json_out and writes:
        write_json(data, json_out)
