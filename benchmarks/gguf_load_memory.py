"""Peak memory of loading a Q4_K_M-style GGUF, against the size the model runs at.

Writes a synthetic GGUF of a Qwen2.5 shape (random K-quant blocks with valid scales; K-quant rows are
multiples of 256, so no 0.5B shape): Q6_K for the head and every other attn_v / ffn_down, as llama.cpp's
Q4_K_M mix does, Q4_K elsewhere, F32 norms and biases. Then it loads the file in a fresh process with
llmcli (`--dtype bfloat16` by default) and reports the process's peak resident memory (ru_maxrss) next
to the model's weight bytes in the run dtype.

    python benchmarks/gguf_load_memory.py --shape 1.5b [--dtype bfloat16] [--keep /tmp/q4km.gguf]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "1.5b": (1536, 8960, 28, 12, 2, 151936),
    "7b": (3584, 18944, 28, 28, 4, 152064),
}


def k_blocks(rng, rows: int, cols: int, qtype: Q) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    count = rows * cols // block
    data = rng.integers(0, 256, size=(count, size), dtype=np.uint8)
    offsets = (0, 2) if qtype == Q.Q4_K else (208,)
    for offset in offsets:
        data[:, offset:offset + 2] = rng.uniform(0.0005, 0.002, count).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, cols // block * size)


def write(path: Path, shape: str) -> None:
    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    head_dim = hidden // heads
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "qwen2")
    for key, value in (("block_count", layers), ("context_length", 32768), ("embedding_length", hidden),
                       ("feed_forward_length", inter), ("attention.head_count", heads),
                       ("attention.head_count_kv", kv)):
        w.add_uint32(f"qwen2.{key}", value)
    w.add_float32("qwen2.rope.freq_base", 1e6)
    w.add_float32("qwen2.attention.layer_norm_rms_epsilon", 1e-6)
    byte_vocab = [chr(c) for c in (*range(33, 127), *range(161, 173), *range(174, 256))]
    byte_vocab += [chr(256 + i) for i in range(256 - len(byte_vocab))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(byte_vocab)
    w.add_token_types([1] * len(byte_vocab))

    def matrix(name: str, rows: int, cols: int, qtype: Q = Q.Q4_K) -> None:
        w.add_tensor(name, k_blocks(rng, rows, cols, qtype), raw_dtype=qtype)

    def vector(name: str, size: int) -> None:
        w.add_tensor(name, rng.standard_normal(size).astype(np.float32) * 0.01 + (1 if "norm" in name else 0))

    matrix("token_embd.weight", vocab, hidden)
    matrix("output.weight", vocab, hidden, Q.Q6_K)
    vector("output_norm.weight", hidden)
    for i in range(layers):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", hidden)
        vector(p + "ffn_norm.weight", hidden)
        matrix(p + "attn_q.weight", hidden, hidden)
        matrix(p + "attn_k.weight", kv * head_dim, hidden)
        matrix(p + "attn_v.weight", kv * head_dim, hidden, Q.Q6_K if i % 2 == 0 else Q.Q4_K)
        for name, size in (("attn_q.bias", hidden), ("attn_k.bias", kv * head_dim), ("attn_v.bias", kv * head_dim)):
            vector(p + name, size)
        matrix(p + "attn_output.weight", hidden, hidden)
        matrix(p + "ffn_gate.weight", inter, hidden)
        matrix(p + "ffn_up.weight", inter, hidden)
        matrix(p + "ffn_down.weight", hidden, inter, Q.Q6_K if i % 2 == 0 else Q.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


CHILD = """
import json, resource, sys, time
from llmcli.loader import load_model
start = time.perf_counter()
loaded = load_model("q4km", sys.argv[1], device="cpu", dtype=sys.argv[2], check_memory=False)
seconds = time.perf_counter() - start
weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "weights": weights,
                  "load_s": seconds}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.5b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--keep", type=Path, help="write the GGUF here and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "q4km.gguf"
        if not path.exists():
            start = time.perf_counter()
            write(path, args.shape)
            print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - start:.0f} s")
        baseline = subprocess.run([sys.executable, "-c", "import resource, torch, numpy, gguf, tokenizers; "
                                   "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"],
                                  capture_output=True, text=True, check=True)
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), args.dtype], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        base = int(baseline.stdout)
        gib = 2**30
        print(f"shape {args.shape}, {args.dtype}: weights {result['weights'] / gib:.2f} GiB, peak RSS "
              f"{result['peak_rss'] / gib:.2f} GiB ({(result['peak_rss'] - base) / gib:.2f} GiB above the "
              f"{base / gib:.2f} GiB of an idle python with torch), "
              f"ratio {result['peak_rss'] / result['weights']:.2f}x "
              f"(above idle {(result['peak_rss'] - base) / result['weights']:.2f}x), load {result['load_s']:.0f} s")


if __name__ == "__main__":
    main()
