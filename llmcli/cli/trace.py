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
    FORCE_OPT,
    MODEL_ARG,
    NO_LOGN_OPT,
    NO_NTK_OPT,
    WINDOW_OPT,
    YES_OPT,
    Device,
    DType,
    apply_attention_overrides,
    clean_text,
    err_console,
    load_model,
    read_stdin,
)
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
])


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
    chat: bool = typer.Option(False, "--chat/--raw", help="Wrap the prompt in the chat template (default: raw)."),
    no_logn: bool = NO_LOGN_OPT,
    no_ntk: bool = NO_NTK_OPT,
    window: str | None = WINDOW_OPT,
    device: Device = DEVICE_OPT,
    dtype: DType = DTYPE_OPT,
    yes: bool = YES_OPT,
    force: bool = FORCE_OPT,
) -> None:
    from llmcli.cli.generate import prompt_token_ids, stop_token_ids
    from llmcli.trace import DEFAULT_PROMPT, build_trace_json, parse_layer_specs, run_trace, select_layers
    from llmcli.trace_render import render_trace

    parse_layer_specs(layer)  # bad syntax fails before the model loads
    text = read_stdin() if prompt == "-" else clean_text(prompt if prompt is not None else DEFAULT_PROMPT)
    loaded = load_model(model, device, dtype, yes=yes, force=force)
    apply_attention_overrides(loaded, no_logn, no_ntk, window)
    layers = select_layers(layer, loaded.config.num_layers, loaded.name)
    ids = prompt_token_ids(loaded, text, chat, None)
    run = run_trace(loaded.runner, ids, layers, generate, stop_token_ids(loaded))
    data = build_trace_json(run, loaded.model, loaded.tokenizer, loaded.name)
    if json_out == "-":
        write_json(data, "-")
        return
    render_trace(data, Console(highlight=False), per_token=tokens, filtered=layers is not None)
    if json_out:
        write_json(data, json_out)
