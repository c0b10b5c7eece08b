"""One new token's attention over a long cache, on CPU: llmcli's decode ops (`decode_attention` for the Qwen shapes'
grouped heads, `mla_decode` for DeepSeek's latent attention) against torch's scaled_dot_product_attention on the
same cache, timed in turns in one process. Microseconds a layer (median of the rounds), the op's speed-up, and the
rate at which the op went through the bytes it must read (the cache's rows; for MLA also kv_b's weight): far below
the memory's bandwidth, the op is bound by its arithmetic.

    python benchmarks/decode_attention.py [--keys 37,501,4001] [--rounds 7] [--threads N] [--cold]

Without --cold the loop calls an op on the same cache again and again, which then stays in the CPU's caches (L3);
in a decode step the layer's weights have pushed it out, and --cold reads 128 MB before each call to do the same.

The third group is `one_query_attention`, the op behind the models' own eager step (original Qwen's float32 RoPE,
Qwen3-Next / Qwen3.5 gated attention: the model rotates the query and writes the cache), against what those models
ran before it: `one_query_attention_eager`, two float32 batched products in torch.

torch's side for MLA is its absorbed form as plain torch ops (q_nope W_UK, SDPA over the latent rows as keys and
values, then W_UV); the op also writes the new token's row into the cache, which torch's side does not.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from llmcli.backends import cpu_kernels
from llmcli.models.layers import one_query_attention_eager

GQA = {"Qwen2.5-0.5B": (14, 2, 64), "Qwen2.5-7B": (28, 4, 128)}  # query heads, kv heads, head size
MLA = {"DeepSeek-V3 shape (benchmarks)": (16, 256, 32, 64, 64), "DeepSeek-V3": (128, 512, 64, 128, 128)}
# heads, latent rank, rope dims, nope dims, value dims
ONE_QUERY = {"Qwen-7B (original)": (32, 32, 128), "Qwen3.5-0.8B (gated)": (8, 2, 256),
             "Qwen3-Next-80B (gated)": (16, 2, 256)}  # query heads, kv heads, head size


FLUSH: list[torch.Tensor] = []  # with --cold: 128 MB read before each call, as a step's weights pass between layers


def timed(fn, calls: int) -> float:
    if not FLUSH:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls
    spent = 0.0
    for _ in range(min(calls, 12)):
        FLUSH[0].sum()
        start = time.perf_counter()
        fn()
        spent += time.perf_counter() - start
    return spent / min(calls, 12)


def compare(name: str, ours, theirs, rounds: int, calls: int, nbytes: int) -> None:
    ours(), theirs()  # warm
    mine, other = [], []
    for _ in range(rounds):
        mine.append(timed(ours, calls))
        other.append(timed(theirs, calls))
    a, b = statistics.median(mine), statistics.median(other)
    print(f"| {name} | {a * 1e6:.1f} | {b * 1e6:.1f} | {b / a:.2f}x | {nbytes / 1e6:.2f} | {nbytes / a / 1e9:.1f} |",
          flush=True)


def gqa_case(shape: str, keys: int, rounds: int) -> None:
    heads, kv, d = GQA[shape]
    length = keys + 1
    qkv = torch.randn(1, heads + 2 * kv, d).bfloat16()
    cos, sin = torch.randn(d).bfloat16(), torch.randn(d).bfloat16()
    k_cache, v_cache = torch.randn(length, 1, kv, d).bfloat16(), torch.randn(length, 1, kv, d).bfloat16()
    q = qkv[:, :heads].unsqueeze(2)  # [1, H, 1, D]
    k, v = k_cache[:keys].permute(1, 2, 0, 3), v_cache[:keys].permute(1, 2, 0, 3)  # [1, KV, n, D]
    position = keys - 1

    def ours():
        torch.ops.llmcli.decode_attention(qkv, cos, sin, k_cache, v_cache, position, heads, 0, d ** -0.5)

    def theirs():
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    compare(f"{shape} | {keys}", ours, theirs, rounds, max(3, 20000 // keys), 2 * keys * kv * d * 2)


def one_query_case(shape: str, keys: int, rounds: int) -> None:
    heads, kv, d = ONE_QUERY[shape]
    q = torch.randn(1, 1, heads, d).bfloat16().transpose(1, 2)  # [1, H, 1, D], as the models hand it over
    k = torch.randn(keys + 1, 1, kv, d).bfloat16().permute(1, 2, 0, 3)[:, :, :keys]  # [1, KV, n, D] cache views
    v = torch.randn(keys + 1, 1, kv, d).bfloat16().permute(1, 2, 0, 3)[:, :, :keys]

    def ours():
        torch.ops.llmcli.one_query_attention(q, k, v, d ** -0.5)

    def theirs():
        one_query_attention_eager(q, k, v, None, None)

    compare(f"{shape} | {keys}", ours, theirs, rounds, max(2, 4000 // keys), 2 * keys * kv * d * 2)


def mla_case(shape: str, keys: int, rounds: int) -> None:
    heads, rank, rope, nope, v_dim = MLA[shape]
    q = torch.randn(1, heads, nope + rope).bfloat16()
    kv = torch.randn(1, rank + rope).bfloat16()
    norm = torch.ones(rank).bfloat16()
    cos, sin = torch.randn(rope // 2).bfloat16(), torch.randn(rope // 2).bfloat16()
    cache = (torch.randn(keys, 1, rank + rope) * 0.1).bfloat16()
    wkv_b = (torch.randn(heads, nope + v_dim, rank) * 0.05).bfloat16()
    w_uk, w_uv = wkv_b[:, :nope], wkv_b[:, nope:]  # [H, nope, rank], [H, v, rank]
    rows = cache[:, 0].unsqueeze(0).unsqueeze(0)  # [1, 1, n, rank + rope]

    def ours():
        torch.ops.llmcli.mla_decode(q, kv, norm, 1e-6, cos, sin, cache, keys - 1, wkv_b, v_dim, 0.1, False)

    def theirs():
        latent = torch.einsum("hn,hnr->hr", q[0, :, :nope], w_uk)
        query = torch.cat((latent, q[0, :, nope:]), -1).unsqueeze(0).unsqueeze(2)  # [1, H, 1, rank + rope]
        mixed = F.scaled_dot_product_attention(query, rows, rows[..., :rank], scale=0.1,
                                               enable_gqa=True)
        torch.einsum("hr,hvr->hv", mixed[0, :, 0], w_uv)

    compare(f"{shape} | {keys}", ours, theirs, rounds, max(2, 4000 // keys),
            (keys * (rank + rope) + wkv_b.numel()) * 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", default="37,501,4001", help="cached keys, comma-separated")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cold", action="store_true",
                        help="read 128 MB before each call (the cache out of the CPU's caches, as in a decode step)")
    args = parser.parse_args()
    if args.cold:
        FLUSH.append(torch.ones(32 * 2**20))
    if args.threads:
        torch.set_num_threads(args.threads)
    built, note = cpu_kernels.load_once()
    if not built:
        raise SystemExit(f"llmcli's CPU kernels are not built here: {note}")
    where = "a cache just pushed out of the CPU's caches" if args.cold else "a cache the loop keeps in the CPU's caches"
    print(f"{torch.get_num_threads()} threads; us a layer, median of {args.rounds} rounds; {where}\n")
    print("| shape | keys | llmcli op | torch | speed-up | MB read | op GB/s |\n|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for keys in (int(k) for k in args.keys.split(",")):
            for shape in GQA:
                gqa_case(shape, keys, args.rounds)
            for shape in MLA:
                mla_case(shape, keys, args.rounds)
            for shape in ONE_QUERY:
                one_query_case(shape, keys, args.rounds)


if __name__ == "__main__":
    main()
