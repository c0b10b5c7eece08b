"""Which matrix-vector product is fastest for decoding on this CPU?

    python benchmarks/cpu_gemv.py [--threads N]

Decoding one token multiplies a [1, in] activation by every weight matrix once, so it is bound by
how fast each kernel streams the weights. This measures, on the Qwen2.5-0.5B MLP shape (and the
lm_head), the effective weight bandwidth of each candidate path: plain F.linear in float32 and
bfloat16, oneDNN with the weight prepacked for batch 1, and torch's int8 weight-only kernel.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from llmcli.backends.int8 import quantize_weight

SHAPES = {"mlp up (4864x896)": (4864, 896), "mlp down (896x4864)": (896, 4864), "lm_head (151936x896)": (151936, 896)}


def timed(fn, bytes_read: int, min_seconds: float = 0.5) -> tuple[float, float]:
    for _ in range(3):
        fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        fn()
        n += 1
    seconds = (time.perf_counter() - start) / n
    return seconds * 1e6, bytes_read / seconds / 1e9


def candidates(out_f: int, in_f: int):
    w = torch.randn(out_f, in_f) * 0.02
    for dtype in (torch.float32, torch.bfloat16):
        x, wd = torch.randn(1, in_f, dtype=dtype), w.to(dtype)
        yield f"F.linear {str(dtype)[6:]}", lambda x=x, wd=wd: F.linear(x, wd), wd.numel() * wd.element_size()
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(wd, 1)
            fn = lambda x=x, p=packed: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")  # noqa: E731
            fn()
            yield f"oneDNN prepacked {str(dtype)[6:]}", fn, wd.numel() * wd.element_size()
        except (RuntimeError, AttributeError) as exc:
            print(f"  (oneDNN prepacked {dtype} unavailable: {str(exc).splitlines()[0][:80]})")
    q, scale = quantize_weight(w)
    for dtype in (torch.float32, torch.bfloat16):
        x, s = torch.randn(1, in_f, dtype=dtype), scale.to(dtype)
        yield (f"int8 weight-only ({str(dtype)[6:]} act)", lambda x=x, s=s: torch._weight_int8pack_mm(x, q, s),
               q.numel())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for label, (out_f, in_f) in SHAPES.items():
        print(label)
        for name, fn, nbytes in candidates(out_f, in_f):
            us, gbs = timed(fn, nbytes)
            print(f"  {name:34s} {us:9.0f} us  {gbs:6.1f} GB/s of weights")


if __name__ == "__main__":
    main()
