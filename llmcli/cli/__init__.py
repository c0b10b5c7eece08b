"""The `llmcli` command: a thin Typer app (`app.py`). Each subcommand lives in its own module here.

`main()` runs the app without click's standalone mode so that every error, including bad flags,
becomes one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import atexit
import os
import sys

import typer

# Importing a command module registers its commands on `app`.
from llmcli.cli import bench, chat, doctor, download, generate, run, serve, trace  # noqa: F401
from llmcli.cli.app import app
from llmcli.cli.examples import add_examples
from llmcli.errors import LlmcliError
from llmcli.openmp import choose_wait_policy
from llmcli.options import debug

# Typer >= 0.26 vendors click; older releases raise click's own exceptions. Catch both.
EXIT_ERRORS: tuple = (typer.Exit,)
USAGE_ERRORS: tuple = (typer.TyperException,) if hasattr(typer, "TyperException") else ()
ABORT_ERRORS: tuple = (typer.Abort,)
try:
    import click

    EXIT_ERRORS += (click.exceptions.Exit,)
    USAGE_ERRORS += (click.ClickException,)
    ABORT_ERRORS += (click.Abort,)
except ImportError:
    pass


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


add_examples(app)


def main(argv: list[str] | None = None) -> int:
    choose_wait_policy()  # before any command imports torch
    command = typer.main.get_command(app)
    argv = trace.optional_lens_value(sys.argv[1:] if argv is None else list(argv))
    try:
        result = command.main(args=argv, prog_name="llmcli", standalone_mode=False)
    except EXIT_ERRORS as exc:
        return exc.exit_code
    except USAGE_ERRORS as exc:  # bad flags and values: one line, exit 2
        _error(" ".join(exc.format_message().split()))
        return getattr(exc, "exit_code", 2)
    except (*ABORT_ERRORS, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    except LlmcliError as exc:
        _error(str(exc))
        return exc.exit_code
    except BrokenPipeError:
        return 0
    except Exception as exc:  # last resort: still one line, unless debugging
        if debug():
            raise
        _error(f"internal error: {type(exc).__name__}: {exc} (set LLMCLI_DEBUG=1 for a traceback)")
        return 1
    return result if isinstance(result, int) else 0


def launch() -> None:
    """The `llmcli` program (console script and `python -m llmcli`): main(), then the exit handlers and a flush,
    then the process ends without tearing the interpreter down, which took 0.5-0.6 s after a model had run
    (freeing torch's objects one by one): a tenth of a first answer."""
    code = main()
    atexit._run_exitfuncs()  # what a normal exit runs: logging's flush, the background kernel build, ...
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # a reader that went away, a stream already closed
            pass
    os._exit(code)
