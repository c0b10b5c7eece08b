"""llmcli's bfloat16 kernel against torch's paths, for one row (decoding) and many (prompts).

    python benchmarks/bf16_gemm.py [--threads 2] [--rows 1,128,512]

One row: each path multiplies one input row by a dozen distinct 9728x896 weights (Qwen2.5-0.5B's
gate+up; 209 MB in all, more than the caches hold), so every product streams its weight from memory:
GB/s of weight read. Many rows: 9728x896 and 896x4864 products, GFLOP/s. Paths: llmcli's kernel on its
panels, oneDNN's product on its prepacked (opaque) weight, F.linear on the plain weight, and (one row)
the multiply-and-sum loop inductor compiles (what --compile ran without the kernel).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from cpu_gemv import timed  # benchmarks/ is the script's directory

from llmcli.backends import bf16_kernel
from llmcli.backends.linear import one_row_linear, prepacking_available


def seconds_per_call(fn) -> float:
    return timed(fn, bytes_read=0)[0] / 1e6  # cpu_gemv's timer: microseconds per call


def paths(weights: list[torch.Tensor], compiled: bool):
    blocks = [bf16_kernel.to_blocks(w) for w in weights]
    yield "llmcli kernel (panels)", lambda x: [bf16_kernel.linear(x, b) for b in blocks]
    if prepacking_available():  # oneDNN's bf16 reorder needs AVX-512 (or AVX-NE-CONVERT)
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]
        yield "oneDNN prepacked", lambda x: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
                                            for p in packed]
    yield "F.linear (plain weight)", lambda x: [F.linear(x, w) for w in weights]
    if compiled:
        loop = torch.compile(one_row_linear)
        yield "inductor multiply-and-sum", lambda x: [loop(x, w) for w in weights]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,128,512", help="input rows to measure, comma-separated")
    parser.add_argument("--compiled", action="store_true", help="also time inductor's one-row loop (compiles)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    usable, note = bf16_kernel.available()
    if not usable:
        raise SystemExit(note or "no fast build of the bfloat16 kernel for this CPU (it needs AVX2 + FMA)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernel: {bf16_kernel.label()}")
    torch.manual_seed(0)
    with torch.inference_mode():
        for rows in [int(r) for r in args.rows.split(",")]:
            if rows == 1:
                weights = [torch.randn(9728, 896, dtype=torch.bfloat16) for _ in range(12)]
                x = torch.randn(1, 896, dtype=torch.bfloat16)
                print("1 row, 12 distinct 9728x896 weights (from memory)")
                for name, fn in paths(weights, compiled=args.compiled):
                    gb = sum(w.numel() * 2 for w in weights) / seconds_per_call(lambda fn=fn, x=x: fn(x)) / 1e9
                    print(f"  {name:28s} {gb:6.1f} GB/s")
                continue
            for shape in ((9728, 896), (896, 4864)):
                weights = [torch.randn(shape, dtype=torch.bfloat16)]
                x = torch.randn(rows, shape[1], dtype=torch.bfloat16)
                print(f"{rows} rows x {shape[0]}x{shape[1]}")
                for name, fn in paths(weights, compiled=False):
                    gflops = 2 * rows * shape[0] * shape[1] / seconds_per_call(lambda fn=fn, x=x: fn(x)) / 1e9
                    print(f"  {name:28s} {gflops:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
