"""Decode with and without the compiled step (`--compile` on the command line) and compare.

    python examples/compiled_decode.py [MODEL] [--dtype bfloat16]

Loads the model once with compile=True and switches the compiled step off for the eager run, so both
use the same weights. The first compiled step compiles (or loads the cached code); it is left out of
the timing. Without MODEL it uses the built-in demo-deepseek (tiny: the speed-up shows on real sizes).
"""

import argparse
import time

import torch

from llmcli.hub import resolve
from llmcli.loader import load_model

parser = argparse.ArgumentParser()
parser.add_argument("model", nargs="?", default="demo-deepseek")
parser.add_argument("--dtype", default="auto")
parser.add_argument("--tokens", type=int, default=32)
args = parser.parse_args()

resolved = resolve(args.model)
loaded = load_model(resolved.name, resolved.path, device="cpu", dtype=args.dtype, compile=True)
runner, compiled_step = loaded.runner, loaded.runner.compiled  # the model, and its compiled decode step
prompt = torch.tensor([loaded.tokenizer.encode("Static caches make every decode step the same shape.")])


def greedy(compiled: bool) -> tuple[list[int], float]:
    runner.compiled = compiled_step if compiled else None
    cache = runner.make_cache(1, prompt.shape[1] + args.tokens + 1)
    tokens = []
    with torch.inference_mode():
        logits = runner(prompt, cache, last_only=True)
        token = logits[:, -1].argmax(-1, keepdim=True)
        logits = runner(token, cache)  # compiles on the first compiled run
        start = time.perf_counter()
        for _ in range(args.tokens):
            token = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token.item())
            logits = runner(token, cache)
    return tokens, args.tokens / (time.perf_counter() - start)


eager_tokens, eager_speed = greedy(compiled=False)
compiled_tokens, compiled_speed = greedy(compiled=True)
print(f"eager:    {eager_speed:8.1f} tok/s")
print(f"compiled: {compiled_speed:8.1f} tok/s (compiled in {compiled_step.compile_seconds:.1f} s)")
print(f"same greedy tokens: {eager_tokens == compiled_tokens}")
