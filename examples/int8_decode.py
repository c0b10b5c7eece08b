"""Weight-only int8 (`--quantize int8` on the command line) against the model's own dtype: size, decode
speed and how often the two pick the same next token.

    python examples/int8_decode.py [MODEL] [--tokens 32]

Both read the same teacher-forced sequence (the unquantised model's greedy continuation), so one early
disagreement does not derail the count. On CPU, int8 decoding runs on llmcli's int8 kernel (built once
with the C++ compiler). Without MODEL it uses the built-in demo-qwen (tiny: the speed-up shows on real
sizes, e.g. 2.1-2.4x on a Qwen2.5-0.5B-shaped model).
"""

import argparse
import time

import torch

from llmcli.bench import parameter_bytes
from llmcli.hub import resolve
from llmcli.loader import load_model

parser = argparse.ArgumentParser()
parser.add_argument("model", nargs="?", default="demo-qwen")
parser.add_argument("--tokens", type=int, default=32)
args = parser.parse_args()

resolved = resolve(args.model)
plain = load_model(resolved.name, resolved.path, device="cpu", dtype="bfloat16")
int8 = load_model(resolved.name, resolved.path, device="cpu", dtype="bfloat16", quantize="int8")
for note in int8.notes:
    print("note:", note)
prompt = torch.tensor([plain.tokenizer.encode("Weight-only int8 halves the bytes each decode step reads.")])


def decode(runner, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Feed `ids` after the prompt one token at a time; returns each step's argmax and tokens per second."""
    cache = runner.make_cache(1, prompt.shape[1] + ids.shape[1] + 1)
    with torch.inference_mode():
        picks = [runner(prompt, cache, last_only=True)[:, -1].argmax(-1)]
        start = time.perf_counter()
        for i in range(ids.shape[1]):
            picks.append(runner(ids[:, i: i + 1], cache)[:, -1].argmax(-1))
    return torch.cat(picks), ids.shape[1] / (time.perf_counter() - start)


# The bf16 model's own greedy continuation, then both models read it.
with torch.inference_mode():
    cache = plain.runner.make_cache(1, prompt.shape[1] + args.tokens + 1)
    token = plain.runner(prompt, cache, last_only=True)[:, -1:].argmax(-1)
    continuation = [token]
    for _ in range(args.tokens - 1):
        token = plain.runner(token, cache)[:, -1:].argmax(-1)
        continuation.append(token)
sequence = torch.cat(continuation, dim=1)
plain_picks, plain_speed = decode(plain.runner, sequence)
int8_picks, int8_speed = decode(int8.runner, sequence)
print(f"weights: bfloat16 {parameter_bytes(plain.model)[0] / 2**20:.1f} MiB, "
      f"int8 {parameter_bytes(int8.model)[0] / 2**20:.1f} MiB")
print(f"decode: bfloat16 {plain_speed:.1f} tok/s, int8 {int8_speed:.1f} tok/s ({int8_speed / plain_speed:.2f}x)")
print(f"same next token: {(plain_picks == int8_picks).float().mean().item():.0%} of {len(plain_picks)} positions")
