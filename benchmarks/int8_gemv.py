"""One decode step's worth of int8 one-row products (Qwen2.5-0.5B shapes), through each path torch and
llmcli offer, with the weights read from memory (the set is 15x the last-level cache).

    python benchmarks/int8_gemv.py [--repeats 5] [--rows 1,2,4,8,16,24,32]

Prints ms per step and GB/s of int8 weights read, best of the repeats, and bf16 for comparison. With
--rows: the int8 kernel against a GEMM on the converted weight for products over that many rows (where
`Int8Linear` switches from one to the other).
"""

from __future__ import annotations

import argparse
import time

import torch

from llmcli.backends import int8_kernel
from llmcli.backends.int8 import quantize_weight
from llmcli.backends.linear import one_row_linear

# qkv, o, gate_up, down for 24 layers, then the tied head's int8 copy
SHAPES = [(1152, 896), (896, 896), (9728, 896), (896, 4864)] * 24 + [(151936, 896)]


def best_ms(step, repeats: int) -> float:
    with torch.inference_mode():
        step()  # warm-up (and compile)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", help="comma-separated row counts: kernel vs converted-weight GEMM")
    args = parser.parse_args()
    if args.rows:
        compare_rows([int(r) for r in args.rows.split(",")], args.repeats)
        return
    torch.manual_seed(0)
    weights = [quantize_weight(torch.randn(shape) * 0.02) for shape in SHAPES]
    q = [w for w, _ in weights]
    scales = [s.to(torch.bfloat16) for _, s in weights]
    inputs = {k: torch.randn(1, k, dtype=torch.bfloat16) for k in (896, 4864)}
    int8_bytes = sum(w.numel() for w in q)

    def each(product, matrices):
        return lambda: [product(inputs[w.shape[-1] if w.dim() == 2 else w.shape[1] * w.shape[3]], w, s)
                        for w, s in zip(matrices, scales, strict=True)]

    paths = {}
    usable, note = int8_kernel.build()
    if usable:
        blocks = [int8_kernel.to_blocks(w) for w in q]
        paths["llmcli int8 kernel (blocked weights)"] = each(int8_kernel.gemv, blocks)
    else:
        print(note)
    paths["torch._weight_int8pack_mm"] = each(torch._weight_int8pack_mm, q)
    compiled = torch.compile(lambda x, w, s: one_row_linear(x, w, scales=s), dynamic=False)
    paths["inductor loop (multiply-and-sum, compiled)"] = each(compiled, q)
    paths["eager dequantise + F.linear"] = each(lambda x, w, s: torch.nn.functional.linear(x, w.to(x.dtype)) * s, q)
    for name, step in paths.items():
        ms = best_ms(step, args.repeats)
        print(f"{name:46s} {ms:7.1f} ms/step  {int8_bytes / ms / 1e6:5.1f} GB/s of int8 weights")
    del paths, q
    bf16 = [torch.randn(shape, dtype=torch.bfloat16) for shape in SHAPES]
    bf16_bytes = sum(w.numel() * 2 for w in bf16)
    ms = best_ms(lambda: [torch.nn.functional.linear(inputs[w.shape[1]], w) for w in bf16], args.repeats)
    print(f"{'bf16 F.linear (reference)':46s} {ms:7.1f} ms/step  {bf16_bytes / ms / 1e6:5.1f} GB/s of bf16 weights")


def compare_rows(counts: list[int], repeats: int) -> None:
    if not int8_kernel.available()[0]:
        raise SystemExit(int8_kernel.build()[1])
    torch.manual_seed(0)
    blocks = [int8_kernel.to_blocks(quantize_weight(torch.randn(9728, 896))[0]) for _ in range(6)]  # 52 MB
    scale = torch.rand(9728, dtype=torch.bfloat16)
    for rows in counts:
        x = torch.randn(rows, 896, dtype=torch.bfloat16)
        kernel = best_ms(lambda x=x: [int8_kernel.gemv(x, b, scale) for b in blocks], repeats) / len(blocks)
        gemm = best_ms(lambda x=x: [torch.nn.functional.linear(x, int8_kernel.from_blocks(b, x.dtype)) * scale
                                    for b in blocks], repeats) / len(blocks)
        print(f"{rows:3d} rows x 9728x896: int8 kernel {kernel:6.2f} ms   converted weight + GEMM {gemm:6.2f} ms")


if __name__ == "__main__":
    main()
