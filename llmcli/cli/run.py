"""The verbs people already type from Ollama: `run MODEL [PROMPT]` (chat, or one answer) and `pull MODEL`."""

from __future__ import annotations

import typer

from llmcli.cli.app import app
from llmcli.cli.common import (
    COMPILE_OPT,
    DEVICE_OPT,
    DTYPE_OPT,
    FORCE_OPT,
    MODEL_ARG,
    QUANTIZE_OPT,
    YES_OPT,
    Device,
    DType,
    Quantize,
)
from llmcli.cli.download import download_command


@app.command("run")
def run_command(
    model: str | None = MODEL_ARG,
    prompt: str | None = typer.Argument(None, metavar="[PROMPT]", show_default=False,
                                        help="One message to answer; without it, an interactive chat."),
    system: str | None = typer.Option(None, "--system", "-s", help="System message."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n", min=1, help="Most tokens per reply."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for sampling."),
    device: Device = DEVICE_OPT,
    dtype: DType = DTYPE_OPT,
    yes: bool = YES_OPT,
    quantize: Quantize | None = QUANTIZE_OPT,
    compile: bool = COMPILE_OPT,
    force: bool = FORCE_OPT,
) -> None:
    """Chat with MODEL, or answer PROMPT once and exit (as `ollama run` does). `chat` and `generate` have
    every option."""
    from llmcli.cli.chat import chat_command
    from llmcli.cli.generate import generate_command
    from llmcli.hub import model_and_prompt

    model, prompt = model_and_prompt(model, prompt)
    shared = dict(model=model, system=system, max_new_tokens=max_new_tokens, temperature=temperature, top_k=0,
                  top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=seed, no_logn=False, no_ntk=False, window=None,
                  device=device, dtype=dtype, yes=yes, quantize=quantize, compile=compile, force=force, tp=1, ep=1)
    if prompt is None:
        chat_command(**shared, max_context=None, hide_thinking=False, think=None)
    else:
        generate_command(**shared, positional_prompt=prompt, prompt=None, stop=[], chat=None, as_json=False)


app.command("pull", help="Download a model (the same as `download`).")(download_command)
