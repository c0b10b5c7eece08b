"""`llmcli generate`: one prompt in, streamed text out."""

from __future__ import annotations

import json
import sys

import typer

from llmcli.cli.app import app
from llmcli.cli.common import (
    COMPILE_OPT,
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
    human_bytes,
    load_model,
    other_rank,
    read_stdin,
)
from llmcli.errors import LlmcliError


def read_prompt(prompt: str | None, positional: str | None = None) -> str:
    """PROMPT or -p TEXT (either may be '-'), else piped stdin."""
    if prompt is not None and positional is not None:
        raise LlmcliError("two prompts: give it as the PROMPT argument or with -p, not both", exit_code=2)
    prompt = positional if prompt is None else prompt
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        return read_stdin()
    if prompt is None:
        raise LlmcliError("no prompt: pass it after the model (or with -p TEXT), or pipe text on stdin", exit_code=2)
    return clean_text(prompt)


def prompt_token_ids(loaded, text: str, chat: bool | None, system: str | None) -> list[int]:
    """Render the prompt as one user turn when chatting, else tokenize it as is."""
    tok = loaded.tokenizer
    use_chat = tok.chat_template is not None if chat is None else chat
    if not use_chat:
        if system:
            raise LlmcliError("--system needs --chat", exit_code=2)
        return tok.encode_prompt(text)  # BOS/EOS as the tokenizer files say
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))


def stop_token_ids(loaded) -> list[int]:
    """config.json and generation_config.json's eos ids, then the tokenizer's."""
    return loaded.tokenizer.stop_token_ids(loaded.config.eos_token_ids)


@app.command("generate")
def generate_command(
    model: str | None = MODEL_ARG,
    positional_prompt: str | None = typer.Argument(
        None, metavar="[PROMPT]", show_default=False,
        help="Prompt text, as with -p (after MODEL, as `ollama run` takes it); '-' reads stdin."),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="Prompt text; '-' (or a pipe) reads stdin."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", min=0, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p x the top probability."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="1 = off; >1 discourages repeats."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for sampling."),
    stop: list[str] = typer.Option([], "--stop", help="Stop when this text appears (repeatable)."),
    chat: bool | None = typer.Option(None, "--chat/--raw",
                                     help="Wrap the prompt in the chat template (default when there is one)."),
    system: str | None = typer.Option(None, "--system", help="System message (chat mode)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming."),
    no_logn: bool = NO_LOGN_OPT,
    no_ntk: bool = NO_NTK_OPT,
    window: str | None = WINDOW_OPT,
    device: Device = DEVICE_OPT,
    dtype: DType = DTYPE_OPT,
    yes: bool = YES_OPT,
    quantize: Quantize | None = QUANTIZE_OPT,
    compile: bool = COMPILE_OPT,
    force: bool = FORCE_OPT,
    tp: int = TP_OPT,
    ep: int = EP_OPT,
) -> None:
    """Generate text from a prompt, streaming it to stdout (stats on stderr).

    The prompt: `llmcli generate MODEL "text"`, `-p "text"`, or piped stdin; `llmcli generate "text"` uses the
    default model."""
    from llmcli.generate import Generation, SamplingParams
    from llmcli.hub import model_and_prompt

    sampling = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)
    sampling.validate()
    if prompt is None:  # with -p, the positional argument can only be the model
        model, positional_prompt = model_and_prompt(model, positional_prompt)
    text = None if other_rank(tp, ep) else read_prompt(prompt, positional_prompt)
    loaded = load_model(model, device, dtype, yes=yes, quantize=quantize, compile=compile, force=force, answers=True,
                        tp=tp, ep=ep)
    text = loaded.runner.shared_text(text)  # a parallel run's ranks take rank 0's prompt (it alone reads stdin)
    apply_attention_overrides(loaded, no_logn, no_ntk, window)
    ids = prompt_token_ids(loaded, text, chat, system and clean_text(system))
    gen = Generation(loaded.runner, loaded.tokenizer, ids, max_new_tokens, sampling,
                     stop_ids=stop_token_ids(loaded), stop_strings=stop)
    if as_json:
        for _ in gen:
            pass
    else:
        for piece in gen:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    res = gen.result
    if as_json:
        print(json.dumps({
            "model": loaded.name,
            "prompt_tokens": res.prompt_tokens,
            "generated_tokens": len(res.token_ids),
            "token_ids": res.token_ids,
            "text": res.text,
            "finish_reason": res.finish_reason,
            "prefill_tokens_per_s": round(res.prefill_tokens_per_s, 3),
            "decode_tokens_per_s": round(res.decode_tokens_per_s, 3),
            "peak_memory_bytes": res.peak_memory_bytes,
        }, ensure_ascii=False))
        return
    err_console.print(
        f"prompt {res.prompt_tokens} tok, {res.prefill_tokens_per_s:.1f} tok/s | "
        f"generated {len(res.token_ids)} tok, {res.decode_tokens_per_s:.1f} tok/s | "
        f"peak memory {human_bytes(res.peak_memory_bytes)} | {res.finish_reason}",
        style="dim",
    )
