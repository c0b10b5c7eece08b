"""One-row products (GEMV) as the compiled decode step runs them, against oneDNN's prepacked product.

Each variant multiplies one input row by each of a dozen distinct weights (more bytes than the caches
hold, so every product streams its weight from memory) and reports GB/s of weight read:

- packed: eager oneDNN `_linear_pointwise` on a prepacked bf16 weight (llmcli's eager path);
- mul-sum: `(x * w).sum(-1)` in float32 compiled by inductor (`layers.one_row_linear`);
- mul-sum after RMSNorm, inductor defaults: the norm of the residual is inlined into the reduction
  and recomputed for every weight row;
- mul-sum after RMSNorm, llmcli's inductor options (`backends.compile.inductor_options`): the norm is computed
  once, then the loop only streams the weight;
- int8 mul-sum: the same loop over int8 weights (half the bytes, more work per byte).

    python benchmarks/compile_gemv.py [--rows 9728] [--cols 896] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from llmcli.backends.compile import inductor_options
from llmcli.backends.linear import one_row_linear
from llmcli.options import Options


def rms_then_product(x, residual, norm_weight, w):
    h = x.float() + residual.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return one_row_linear(norm_weight * h.to(x.dtype), w)


def gb_per_s(run, weights) -> float:
    for _ in range(2):
        for w in weights:
            run(w)
    start = time.perf_counter()
    repeats = 5
    for _ in range(repeats):
        for w in weights:
            run(w)
    seconds = (time.perf_counter() - start) / (repeats * len(weights))
    return weights[0].numel() * weights[0].element_size() / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=9728, help="output features (Qwen2.5-0.5B gate+up: 9728)")
    parser.add_argument("--cols", type=int, default=896, help="input features")
    parser.add_argument("--count", type=int, default=12, help="distinct weights cycled through")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = (args.rows, args.cols)
    bf16 = [torch.randn(shape, dtype=torch.bfloat16) for _ in range(args.count)]
    int8 = [torch.randint(-127, 128, shape, dtype=torch.int8) for _ in range(args.count)]
    x, residual = torch.randn(1, args.cols, dtype=torch.bfloat16), torch.randn(1, args.cols, dtype=torch.bfloat16)
    norm_weight = torch.randn(args.cols, dtype=torch.bfloat16)
    product = torch.compile(one_row_linear)
    default = torch.compile(rms_then_product)
    tuned = torch.compile(rms_then_product, options=inductor_options(Options.from_env(), torch.device("cpu")))
    print(f"weights {args.rows}x{args.cols}, {args.count} distinct, {args.threads} threads, torch {torch.__version__}")
    with torch.inference_mode():
        if torch.backends.mkldnn.is_available():
            packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in bf16]
            speed = gb_per_s(lambda w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), packed)
            print(f"  packed (oneDNN, eager)                   {speed:6.1f} GB/s")
        print(f"  mul-sum (compiled)                        {gb_per_s(lambda w: product(x, w), bf16):6.1f} GB/s")
        speed = gb_per_s(lambda w: default(x, residual, norm_weight, w), bf16)
        print(f"  mul-sum after RMSNorm, inductor defaults  {speed:6.1f} GB/s")
        speed = gb_per_s(lambda w: tuned(x, residual, norm_weight, w), bf16)
        print(f"  mul-sum after RMSNorm, llmcli's options   {speed:6.1f} GB/s")
        print(f"  int8 mul-sum (compiled)                   {gb_per_s(lambda w: product(x, w), int8):6.1f} GB/s")


if __name__ == "__main__":
    main()
