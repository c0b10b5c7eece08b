"""--quantize int8 against bfloat16 on the same checkpoint: decode speed and top-1 agreement.

    python benchmarks/int8_vs_bf16.py [MODEL_DIR] [--tokens 256] [--compile]

Default: the random Qwen2.5-0.5B-shaped checkpoint of benchmarks/decode_vs_transformers.py (build it
by running that script once). Agreement is teacher-forced: both models read the same token sequence
(bf16's own greedy continuation) and we count the positions where their argmax agrees.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from llmcli.loader import load_model
from llmcli.paths import cache_home


def decode_ms(model, prompt: torch.Tensor, steps: int = 32) -> float:
    cache = model.make_cache(1, prompt.shape[1] + steps + 1)
    with torch.inference_mode():
        model(prompt, cache, last_only=True)
        token = torch.tensor([[5]])
        model(token, cache)
        start = time.perf_counter()
        for _ in range(steps):
            model(token, cache)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=str(cache_home() / "benchmarks" / "qwen2.5-0.5b-shape-random"))
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--compile", action="store_true", help="both with --compile (decode timed after compiling)")
    args = parser.parse_args()
    path = Path(args.model)
    bf16 = load_model("bf16", path, device="cpu", dtype="bfloat16", compile=args.compile).runner
    int8 = load_model("int8", path, device="cpu", dtype="bfloat16", quantize="int8", compile=args.compile).runner
    prompt = torch.randint(0, bf16.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    ms = {name: decode_ms(m, prompt) for name, m in (("bf16", bf16), ("int8", int8))}
    # bf16's greedy continuation, then both models score the whole sequence in one pass.
    ids = prompt
    cache = bf16.make_cache(1, 128 + args.tokens)
    with torch.inference_mode():
        logits = bf16(ids, cache, last_only=True)
        for _ in range(args.tokens - 1):
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], 1)
            logits = bf16(ids[:, -1:], cache)
        a = bf16(ids, bf16.make_cache(1, ids.shape[1]))[0, 127:].argmax(-1)
        b = int8(ids, int8.make_cache(1, ids.shape[1]))[0, 127:].argmax(-1)
    mode = " (compiled)" if args.compile else ""
    print(f"decode{mode}: bf16 {ms['bf16']:.1f} ms/token ({1e3 / ms['bf16']:.1f} tok/s), "
          f"int8 {ms['int8']:.1f} ms/token "
          f"({1e3 / ms['int8']:.1f} tok/s): int8 is {ms['bf16'] / ms['int8']:.2f}x")
    print(f"top-1 agreement over {len(a)} positions: {(a == b).float().mean().item():.1%}")


if __name__ == "__main__":
    main()
