"""One decode step's worth of one-row products (Qwen2.5-0.5B shapes, weights read from memory) for int8 and
int4 weights: the integer dot-product kernels (activations quantised to int8, kernels/int_dot.cpp) against
llmcli's float int8 kernel, torch's int4 product and the bf16 kernel. Paths are interleaved round by round
(the machine may be shared), best of the rounds.

    python benchmarks/int_dot.py [--rounds 5] [--rows 1]

Prints ms per step and GB/s of weight bytes read (int4: packed weights plus scales).
"""

from __future__ import annotations

import argparse
import time

import torch

from llmcli.backends import bf16_kernel, int8_kernel, int_dot
from llmcli.backends.int4 import Int4Linear
from llmcli.backends.int8 import quantize_weight

# qkv, o, gate_up, down for 24 layers (the head is left out: int4 runs keep it int8)
SHAPES = [(1152, 896), (896, 896), (9728, 896), (896, 4864)] * 24


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=1)
    args = parser.parse_args()
    if not int_dot.runs_fast():
        raise SystemExit(f"the integer kernels are not built with AVX2 here ({int_dot.isa()})")
    torch.manual_seed(0)
    inputs = {k: torch.randn(args.rows, k, dtype=torch.bfloat16) for k in (896, 4864)}
    paths, sizes = {}, {}
    with torch.inference_mode():
        int8 = [quantize_weight(torch.randn(shape) * 0.02, blocked=True) for shape in SHAPES]
        sizes["int8"] = sum(q.numel() for q, _ in int8)
        scales16 = [s.bfloat16() for _, s in int8]
        paths["int8 float kernel (int8_gemv)"] = ("int8", lambda: [
            int8_kernel.gemv(inputs[q.shape[1] * 16], q, s) for (q, _), s in zip(int8, scales16, strict=True)])
        paths["int8 x int8 dot (int8_dot)"] = ("int8", lambda: [
            int_dot.int8_dot(inputs[q.shape[1] * 16], q, s) for q, s in int8])
        linears = [torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16) for n, k in SHAPES]
        torch4 = [Int4Linear(linear) for linear in linears]
        sizes["int4"] = sum(m.packed.numel() + m.scales_and_zeros.numel() * 2 for m in torch4) // 2 * 2
        paths["int4 torch (_weight_int4pack_mm_for_cpu)"] = ("int4", lambda: [
            m(inputs[m.in_features]) for m in torch4])
        ours = [int_dot.int4_blocks(*int4_parts(linear)) for linear in linears]
        sizes["int4 ours"] = sum(p.numel() + sm.numel() * 2 for p, sm in ours)
        paths["int4 x int8 dot (int4_dot)"] = ("int4 ours", lambda: [
            int_dot.int4_dot(inputs[p.shape[1] * 32], p, sm) for p, sm in ours])
        if bf16_kernel.available()[0]:
            blocks = [bf16_kernel.to_blocks(linear.weight.detach()) for linear in linears]
            sizes["bf16"] = sum(b.numel() * 2 for b in blocks)
            paths[bf16_kernel.label()] = ("bf16", lambda: [
                bf16_kernel.linear(inputs[b.shape[1] * 2], b) for b in blocks])
        best = dict.fromkeys(paths, float("inf"))
        for _ in range(args.rounds + 1):  # the first round warms up
            for name, (_, step) in paths.items():
                best[name] = min(best[name], timed(step))
    print(f"{args.rows} row(s), {len(SHAPES)} products, {torch.get_num_threads()} threads")
    for name, (size, _) in paths.items():
        ms = best[name] * 1e3
        print(f"{name:44s} {ms:7.2f} ms/step  {sizes[size] / ms / 1e6:5.1f} GB/s  ({sizes[size] / 1e6:.0f} MB)")


def int4_parts(linear: torch.nn.Linear):
    from llmcli.backends.int4 import quantize_int4

    q, scale, zero = quantize_int4(linear.weight.detach())
    return q, scale, zero - 8 * scale


if __name__ == "__main__":
    main()
