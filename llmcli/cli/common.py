"""Options and helpers shared by the commands that load a model."""

from __future__ import annotations

import sys
from enum import Enum

import typer
from rich.console import Console

from llmcli.errors import LlmcliError

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


MODEL_ARG = typer.Argument(
    None, metavar="[MODEL]",
    help="Model directory, Hugging Face repo id or alias; default: $LLMCLI_MODEL or the demo model.",
)
DEVICE_OPT = typer.Option(Device.auto, "--device", help="auto picks cuda, then mps, then cpu.")
DTYPE_OPT = typer.Option(DType.auto, "--dtype", help="auto uses the checkpoint's dtype.")


# Original-Qwen attention options (generate, chat); `apply_attention_overrides` applies them.
NO_LOGN_OPT = typer.Option(False, "--no-logn", help="Original Qwen: switch LogN attention scaling off.")
NO_NTK_OPT = typer.Option(False, "--no-ntk", help="Original Qwen: switch dynamic NTK RoPE off.")
WINDOW_OPT = typer.Option(
    None, "--window",
    help="Per-layer attention windows: 'A:B' spreads sizes from the first to the last layer, "
         "or a comma list with one size per layer (default: full attention).",
)


def apply_attention_overrides(loaded, no_logn: bool, no_ntk: bool, window: str | None) -> None:
    if no_logn or no_ntk or window:
        raise LlmcliError("--no-logn, --no-ntk and --window are not built yet", exit_code=2)


def not_built(command: str) -> None:
    raise LlmcliError(f"`llmcli {command}` is not built yet", exit_code=2)


def load_model(model: str | None, device: Device, dtype: DType, quiet: bool = False):
    """Resolve and load a model, with a spinner on stderr and the demo notice when it applies."""
    from llmcli import hub
    from llmcli.demo import DEMO_NOTICE
    from llmcli.loader import load_model as load

    resolved = hub.resolve(model)
    if resolved.is_demo:
        err_console.print(DEMO_NOTICE.format(name=resolved.name), style="yellow")
    show = not quiet and sys.stderr.isatty()
    if show:
        with err_console.status(f"loading {resolved.name}"):
            loaded = load(resolved.name, resolved.path, device.value, dtype.value)
    else:
        loaded = load(resolved.name, resolved.path, device.value, dtype.value)
    for note in loaded.notes:
        err_console.print(f"note: {note}", style="dim")
    return loaded


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
