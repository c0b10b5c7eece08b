"""Tracing overhead: prefill time with and without `trace`'s recorder.

For each demo model (and a wider synthetic Qwen2 so the ratio is not dominated by tiny matmuls),
times one prefill of N random tokens three ways, best of R interleaved runs:
  off     runner(ids, cache)                      (what `generate` does)
  record  runner(ids, cache, recorder=TraceRecorder())  (statistics reduced on the fly)
  full    run_trace(...) + build_trace_json(...) (everything `llmcli trace --json` does after loading)
and, less sensitive to other load on the machine, the share of the recorded prefill spent inside
`record()` itself (CPU: the statistics run synchronously, so this is their whole cost).

    python benchmarks/trace_overhead.py [--lengths 128 512] [--repeats 25] [--device auto]
    python benchmarks/trace_overhead.py --options --lengths 32 128 --repeats 3   # --logit-lens, --attention-stats,
                                                                                # --html on the Qwen2.5-0.5B shape
"""

from __future__ import annotations

import argparse
import time

import torch

from llmcli.backends.runner import as_runner
from llmcli.config import config_from_dict
from llmcli.demo import BUILDERS, ensure_demo
from llmcli.generate import synchronize
from llmcli.loader import load_model, resolve_device
from llmcli.models.qwen import QwenForCausalLM
from llmcli.trace import TraceRecorder, build_trace_json, run_trace

QWEN25_05B = {  # Qwen2.5-0.5B's shape (random weights)
    "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "tie_word_embeddings": True,
}
WIDE_QWEN2 = {
    "model_type": "qwen2", "vocab_size": 8192, "hidden_size": 1024, "intermediate_size": 2816,
    "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 4,
    "max_position_embeddings": 4096, "tie_word_embeddings": True,
}


def best_seconds(fns: list, repeats: int, device) -> list[float]:
    """Fastest time of each function; the functions take turns so that load from other processes
    hits all of them alike, and the minimum is the run least disturbed by that load."""
    for fn in fns:
        fn()  # warm-up: allocator, kernels, lazy init
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            out.append(time.perf_counter() - t0)
    return [min(t) for t in times]


class TimedRecorder(TraceRecorder):
    """Adds up the wall time spent inside record()."""

    seconds = 0.0

    def record(self, layer, name, value) -> None:
        t0 = time.perf_counter()
        super().record(layer, name, value)
        self.seconds += time.perf_counter() - t0


def record_share(prefill, repeats: int) -> float:
    """Smallest fraction of a recorded prefill spent in record() (CPU only: no async kernels)."""
    shares = []
    for _ in range(repeats):
        rec = TimedRecorder()
        t0 = time.perf_counter()
        prefill(rec)
        shares.append(rec.seconds / (time.perf_counter() - t0))
    return min(shares)


def bench_prefill(name: str, model, tokenizer, ids: torch.Tensor, repeats: int, device) -> None:
    model = as_runner(model)
    n = ids.shape[1]

    def prefill(recorder=None):
        cache = model.make_cache(1, n)
        with torch.inference_mode():
            model(ids, cache, recorder=recorder)

    def full():
        run = run_trace(model, ids[0].tolist())
        build_trace_json(run, model, tokenizer, name)

    off, rec, whole = best_seconds([prefill, lambda: prefill(TraceRecorder()), full], repeats, device)
    share = f"{record_share(prefill, repeats) * 100:>6.1f}%" if device.type == "cpu" else "     –"
    print(f"{name:<16} {n:>6} {off * 1e3:>9.2f} {rec * 1e3:>9.2f} {rec / off:>7.2f}x "
          f"{whole * 1e3:>9.2f} {whole / off:>7.2f}x {share}")


def bench_options(name: str, model, lengths: list[int], repeats: int, device) -> None:
    """Each of trace's options on its own and all together (JSON and HTML included) against a plain prefill."""
    model = as_runner(model)
    gen = torch.Generator().manual_seed(0)
    for n in lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, n), generator=gen).to(device)
        time_options(name, model, ids, repeats, device)


def time_options(name: str, model, ids: torch.Tensor, repeats: int, device) -> None:
    from llmcli.trace_html import trace_html

    n, prompt = ids.shape[1], ids[0].tolist()

    def prefill():
        cache = model.make_cache(1, n)
        with torch.inference_mode():
            model(ids, cache)

    def traced(lens=0, stats=False, report=False):
        data = build_trace_json(run_trace(model, prompt, logit_lens=lens, attention_stats=stats), model, None, name)
        if report:
            trace_html(data)

    variants = [("plain", prefill), ("trace", traced), ("+stats", lambda: traced(stats=True)),
                ("+lens 5", lambda: traced(lens=5)), ("all+html", lambda: traced(5, True, True))]
    times = best_seconds([fn for _, fn in variants], repeats, device)
    cells = "  ".join(f"{label} {t * 1e3:8.1f} ms {t / times[0]:5.2f}x"
                      for (label, _), t in zip(variants, times, strict=True))
    print(f"{name:<16} {n:>6}  {cells}", flush=True)


def bench_model(name: str, model, tokenizer, lengths: list[int], repeats: int, device) -> None:
    gen = torch.Generator().manual_seed(0)
    for n in lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, n), generator=gen).to(device)
        bench_prefill(name, model, tokenizer, ids, repeats, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--options", action="store_true",
                        help="time each trace option (logit lens, attention stats, HTML) on the Qwen2.5-0.5B shape")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.options:
        print(f"device {device}, torch threads {torch.get_num_threads()}, best of {args.repeats} interleaved runs",
              flush=True)
        torch.manual_seed(0)
        with torch.device("meta"):  # 0.5B parameters' default init takes minutes; random normal is enough
            shape = QwenForCausalLM(config_from_dict(QWEN25_05B)).eval()
        shape.to_empty(device=device)
        with torch.no_grad():
            for param in shape.parameters():
                param.normal_(0, 0.02)
        shape.init_buffers(device)
        bench_options("qwen2.5-0.5b-rand", shape, args.lengths, args.repeats, device)
        return
    print(f"device {device}, torch threads {torch.get_num_threads()}, best of {args.repeats} interleaved runs")
    print(f"{'model':<16} {'tokens':>6} {'off ms':>9} {'record':>9} {'ratio':>8} {'full':>9} {'ratio':>8} "
          f"{'in record':>9}")
    for name in sorted(BUILDERS):
        loaded = load_model(name, ensure_demo(name), device=str(device), dtype="float32")
        bench_model(name, loaded.runner, loaded.tokenizer, args.lengths, args.repeats, device)
    torch.manual_seed(0)
    wide = QwenForCausalLM(config_from_dict(WIDE_QWEN2)).to(device).eval()
    wide.init_buffers(device)
    bench_model("qwen2-wide-rand", wide, None, args.lengths, args.repeats, device)


if __name__ == "__main__":
    main()
