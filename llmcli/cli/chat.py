"""`llmcli chat`: a multi-turn conversation in the terminal, or one reply per stdin line in a pipe.

The session logic (cache reuse, templates, commands) is in `llmcli/chat.py`; this module reads input,
shows replies (reasoning dimmed and labelled) and handles Ctrl-C / Ctrl-D.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

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
    stdin_lines,
)
from llmcli.errors import LlmcliError

PROMPT, MORE = ">>> ", "... "
DIM, ITALIC, RESET, ERASE_LINE = "\x1b[2m", "\x1b[3m", "\x1b[0m", "\r\x1b[2K"


class ReplyPrinter:
    """Writes a streamed reply. Plain mode writes the text as generated (minus reasoning when hidden);
    decorated mode labels the reasoning and dims it, or shows a placeholder while it is hidden."""

    def __init__(self, out, decorate: bool, hide_thinking: bool, reasoning_open: bool, color: bool):
        from llmcli.chat import ThinkSplitter

        self.out, self.decorate, self.hide, self.color = out, decorate, hide_thinking, color
        self.splitter = ThinkSplitter(reasoning_open) if decorate or hide_thinking else None
        self.section: str | None = None  # "think" or "answer" once something was shown

    def _style(self, text: str, *codes: str) -> str:
        return "".join(codes) + text + RESET if self.color else text

    def write(self, piece: str) -> None:
        if self.splitter is None:
            self.out.write(piece)
        else:
            for thinking, text in self.splitter.feed(piece):
                self._show(thinking, text)
        self.out.flush()

    def finish(self) -> None:
        if self.splitter is not None:
            for thinking, text in self.splitter.flush():
                self._show(thinking, text)
            if self.section == "think" and self.hide and self.decorate:
                self.out.write(self._erase())
        self.out.write("\n")
        self.out.flush()

    def _erase(self) -> str:
        return ERASE_LINE if self.color else "\n"

    def _show(self, thinking: bool, text: str) -> None:
        if thinking:
            if self.section != "think" and self.decorate:
                if self.section == "answer":
                    self.out.write("\n")
                self.out.write(self._style("thinking…" if self.hide else "thinking", DIM, ITALIC))
                if not self.hide:
                    self.out.write("\n")
            self.section = "think"
            if not self.hide:
                self.out.write(self._style(text, DIM))
            return
        if self.section == "think" and self.decorate:
            self.out.write(self._erase() if self.hide else "\n\n")
        self.section = "answer"
        self.out.write(text)


def notify(message: str, style: str = "dim") -> None:
    err_console.print(message, style=style, markup=False)


def stream_reply(turn, printer: ReplyPrinter, interactive: bool) -> None:
    """Show one reply and its stats. Interactively, the first Ctrl-C stops the reply at the next token
    (the cache stays consistent); a second one interrupts at once (e.g. during a long prefill)."""
    for notice in turn.notices:
        notify(notice, "yellow")

    def on_sigint(signum, frame):
        if turn.generation.stop_requested:
            raise KeyboardInterrupt
        turn.stop()

    handle = interactive and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if handle else None
    try:
        for piece in turn:
            printer.write(piece)
    except KeyboardInterrupt:
        if not interactive:
            raise
    finally:
        if handle:
            signal.signal(signal.SIGINT, previous)
    printer.finish()
    from llmcli.chat import turn_summary

    notify(turn_summary(turn.stats))


def setup_readline():
    """Line editing and a persistent history, from the standard library."""
    try:
        import readline
    except ImportError:  # e.g. Windows without pyreadline
        return None
    from llmcli.paths import cache_home

    path = cache_home() / "chat_history"
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)
    return path


def save_readline(path) -> None:
    if path is None:
        return
    import readline

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(path)
    except OSError:
        pass


CONTINUE, FAILED, QUIT = "continue", "failed", "quit"  # what became of one input line


def handle_line(session, line: str, make_printer, interactive: bool) -> str:
    """Process one input (command or message): CONTINUE, FAILED (its error shown) or QUIT."""
    from llmcli.chat import is_command, run_command, user_text

    try:
        if is_command(line):
            result = run_command(session, line, human_bytes)
            if result.message:
                notify(result.message, "default")
            if result.exit:
                return QUIT
            turn = result.turn
        else:
            turn = session.send(user_text(line))
    except LlmcliError as e:
        notify(f"error: {e}", "red")
        return FAILED
    if turn is not None:
        stream_reply(turn, make_printer(turn), interactive)
    return CONTINUE


def run_interactive(session, make_printer) -> None:
    from llmcli.chat import read_message

    history = setup_readline()
    # \001 \002 tell readline that the colour codes take no room on the line.
    color = history is not None and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    prompt = f"\001\x1b[1;32m\002{PROMPT}\001\x1b[0m\002" if color else PROMPT
    notify(f"chatting with {session.loaded.name} (context {session.max_context} tokens); "
           "/help for commands, Ctrl-D to quit")
    try:
        while True:
            try:
                text = read_message(input, prompt, MORE)
            except EOFError:
                sys.stdout.write("\n")
                return
            except KeyboardInterrupt:  # at the prompt: drop the line, like a shell
                sys.stdout.write("\n")
                continue
            try:
                if text.strip() and handle_line(session, text, make_printer, interactive=True) == QUIT:
                    return
            except KeyboardInterrupt:  # between the prompt and the reply: the session settles itself
                sys.stdout.write("\n")
    finally:
        save_readline(history)


def run_script(session, make_printer) -> bool:
    """Each stdin line is one user message (or command); replies go to stdout undecorated. A line that fails
    shows its error and the script goes on, as a session would; True when any line failed."""
    return run_lines(session, make_printer, stdin_lines())


def run_lines(session, make_printer, lines) -> bool:
    """Run each line as a message (or command), without line editing; True when any line failed."""
    failed = False
    for raw in lines:
        line = raw.rstrip("\r\n")
        outcome = handle_line(session, line, make_printer, interactive=False) if line.strip() else CONTINUE
        if outcome == QUIT:
            break
        failed = failed or outcome == FAILED
    return failed


def run_shared(session, make_printer, runner) -> bool:
    """A --tp/--ep chat: rank 0 reads each line (from a terminal or a pipe, without line editing) and every rank
    runs it, so all decode the same reply; only rank 0's output shows. True when any line failed."""
    lines = stdin_lines() if runner.rank == 0 else iter(())
    if runner.rank == 0 and sys.stdin.isatty():
        notify(f"chatting with {session.loaded.name} over {runner.layout.world} ranks: one message per line, "
               "Ctrl-D to quit")
    shared = iter(lambda: runner.shared_text(next(lines, None)), None)  # every rank gets rank 0's lines
    return run_lines(session, make_printer, shared)


@app.command("chat")
def chat_command(
    model: str | None = MODEL_ARG,
    system: str | None = typer.Option(None, "--system", "-s", help="System message."),
    max_new_tokens: int = typer.Option(2048, "--max-new-tokens", "-n", min=1, help="Most tokens per reply."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p x the top probability."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="1 = off; >1 discourages repeats."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for sampling (turn k uses seed + k)."),
    max_context: int | None = typer.Option(
        None, "--max-context", min=2, help="Tokens of context to keep (KV cache size); oldest turns are dropped "
                                    "beyond it. Default: the model's context, at most 8192."),
    hide_thinking: bool = typer.Option(False, "--hide-thinking", help="Do not show <think> reasoning."),
    think: bool | None = typer.Option(None, "--think/--no-think",
                                      help="Qwen3, DeepSeek-V3.2: switch reasoning on or off (enable_thinking)."),
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
    """Chat with a model, keeping its cache between turns.

    In a terminal: line editing, /help for commands, Ctrl-C stops a reply,
    Ctrl-D quits. With piped stdin: each line is one message and replies go to stdout; the exit
    status is 1 when any line failed."""
    from llmcli.chat import ChatSession
    from llmcli.cli.generate import stop_token_ids
    from llmcli.generate import SamplingParams

    sampling = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)
    sampling.validate()
    loaded = load_model(model, device, dtype, yes=yes, quantize=quantize, compile=compile, force=force, answers=True,
                        tp=tp, ep=ep)
    apply_attention_overrides(loaded, no_logn, no_ntk, window)
    session = ChatSession(loaded, sampling, max_new_tokens, max_context, system and clean_text(system), think,
                          stop_ids=stop_token_ids(loaded))
    interactive = sys.stdin.isatty()
    color = interactive and sys.stdout.isatty() and not os.environ.get("NO_COLOR")

    def make_printer(turn) -> ReplyPrinter:
        return ReplyPrinter(sys.stdout, interactive, hide_thinking, turn.reasoning_open, color)

    if tp > 1 or ep > 1:
        if run_shared(session, make_printer, loaded.runner):
            raise typer.Exit(1)
    elif interactive:
        run_interactive(session, make_printer)
    elif run_script(session, make_printer):
        raise typer.Exit(1)
