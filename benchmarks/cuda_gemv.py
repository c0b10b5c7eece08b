"""One-row products (decoding) on CUDA: which path streams the weights fastest in a compiled step?

For the Qwen2.5-0.5B shapes, bfloat16: cuBLAS through F.linear against inductor's
multiply-and-sum loop (`layers.one_row_linear`, what the compiled decode step uses on CPU); int8 weights with
per-row scales: the multiply-and-sum loop and torch's `_weight_int8pack_mm` where it exists. Each variant
runs over enough copies of the weight to overflow the L2 cache (as in a model, where each weight is read
once per step), captured in one CUDA graph so launch overhead stays out; GB/s counts the weight bytes.

    python benchmarks/cuda_gemv.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmcli.backends.linear import one_row_linear

SHAPES = {"qkv": (1152, 896), "o": (896, 896), "gate_up": (9728, 896), "down": (896, 4864), "head": (151936, 896)}
SWEEP_BYTES = 512 << 20  # several times the H200's 60 MB L2


def time_sweep(fn, x, weights, extra) -> float:
    """Seconds per product: all copies in one CUDA graph, median of 20 replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for w, e in zip(weights, extra, strict=True):
            fn(x, w, e)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w, e in zip(weights, extra, strict=True):
            fn(x, w, e)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2] / len(weights)


def main() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    summed = torch.compile(lambda x, w, s: one_row_linear(x, w, scales=s), dynamic=False)
    int8pack = None
    try:
        probe = torch._weight_int8pack_mm(torch.ones(1, 64, dtype=torch.bfloat16, device=device),
                                          torch.ones(64, 64, dtype=torch.int8, device=device),
                                          torch.ones(64, dtype=torch.bfloat16, device=device))
        int8pack = probe is not None and (lambda x, w, s: torch._weight_int8pack_mm(x, w, s))
    except (RuntimeError, NotImplementedError):
        pass
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'shape':<9}{'out x in':>14}  {'F.linear':>9}  {'sum bf16':>9}"
          f"  {'sum int8':>9}  {'int8pack':>9}   (GB/s of weights)")
    for name, (rows, cols) in SHAPES.items():
        x = torch.randn(1, cols, dtype=torch.bfloat16, device=device)
        copies = max(2, SWEEP_BYTES // (rows * cols * 2))
        bf16 = [torch.randn(rows, cols, dtype=torch.bfloat16, device=device) for _ in range(copies)]
        int8 = [torch.randint(-127, 128, (rows, cols), dtype=torch.int8, device=device) for _ in range(copies)]
        scales = [torch.rand(rows, dtype=torch.bfloat16, device=device) / 64 for _ in range(copies)]
        ref = one_row_linear(x.double(), bf16[0].double()).float()
        got = summed(x, bf16[0], None).float()
        assert (got - ref).norm() / ref.norm() < 1e-2, "wrong result"
        none = [None] * copies
        figures = [
            rows * cols * 2 / time_sweep(lambda x, w, s: F.linear(x, w), x, bf16, none),
            rows * cols * 2 / time_sweep(summed, x, bf16, none),
            rows * cols / time_sweep(summed, x, int8, scales),
            rows * cols / time_sweep(int8pack, x, int8, scales) if int8pack else float("nan"),
        ]
        print(f"{name:<9}{f'{rows} x {cols}':>14}  " + "  ".join(
            f"{f / 1e9:>{w}.0f}" for f, w in zip(figures, (9, 9, 9, 9), strict=True)))
        del bf16, int8, scales
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
