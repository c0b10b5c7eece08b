"""llmcli vs transformers on a random DeepSeek-V3-shaped checkpoint (MLA + DeepSeekMoE), bf16.

Workload (issue 3): hidden 1024, 8 layers (the first dense), 64 routed experts (6 per token, groups 8,
4 kept, sigmoid + bias), 2 shared, moe_intermediate 512, q_lora 384, kv_lora 256, nope/rope/v 64/32/64,
16 heads, vocab 32000; 128 random prompt tokens, 64 greedy new tokens (EOS ignored), batch 1. Both
backends load the same safetensors files and run the identical ids in one process, alternating run by
run (llmcli.bench does the timing). The checkpoint is built once with transformers into llmcli's cache
($LLMCLI_HOME or ~/.cache/llmcli) and reused.

Wall-clock numbers on a shared machine mostly measure the other processes, so the script also reports
CPU time per phase (process time of a prompt-only run, and of a full run minus it). With --threads 1
that is the work each backend does, whatever the load; with more threads it includes OpenMP spinning.

    python benchmarks/deepseek_vs_transformers.py [--repeat 3] [--dtype bfloat16] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmcli import bench, machine
from llmcli.demo import build_demo_tokenizer, write_tokenizer
from llmcli.loader import load_model
from llmcli.paths import cache_home

V3_SHAPE = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=8,
    num_attention_heads=16, num_key_value_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
    qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
    n_group=8, topk_group=4, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
    max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "original_max_position_embeddings": 1024, "mscale": 1.0, "mscale_all_dim": 1.0},
)


def checkpoint_dir(vocab_size: int | None = None) -> Path:
    """Build the random checkpoint once (bf16 on disk, like the released model); `vocab_size`: a variant with
    that vocabulary (DeepSeek-V3's real one, 129280, for llama.cpp's converter and the real tokenizer)."""
    suffix = f"-vocab{vocab_size}" if vocab_size else ""
    target = cache_home() / "benchmarks" / f"deepseek-v3-shape-random{suffix}"
    if (target / "config.json").is_file():
        return target
    import transformers

    print(f"building a random DeepSeek-V3-shaped checkpoint in {target} (once)", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        torch.manual_seed(0)
        config = transformers.DeepseekV3Config(**{**V3_SHAPE, "vocab_size": vocab_size or V3_SHAPE["vocab_size"]},
                                               dtype="bfloat16")
        model = transformers.DeepseekV3ForCausalLM(config)
        with torch.no_grad():  # a real-looking choice bias, so routing is not just the raw scores
            for name, buffer in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buffer.normal_(0, 0.02)
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        write_tokenizer(tmp, build_demo_tokenizer())  # only loading needs it: bench uses random ids
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def cpu_times(backends, ids: torch.Tensor, gen: int, repeat: int) -> dict[str, tuple[float, float]]:
    """Best-of-`repeat` CPU seconds: (prompt, one decode step) per backend, alternating backends."""
    best: dict[str, list[float]] = {b.name: [float("inf"), float("inf")] for b in backends}
    for _ in range(repeat):
        for b in backends:
            start = time.process_time()
            b.run(ids, 1)
            prompt = time.process_time() - start
            start = time.process_time()
            b.run(ids, gen)
            step = (time.process_time() - start - prompt) / (gen - 1)
            best[b.name] = [min(best[b.name][0], prompt), min(best[b.name][1], step)]
    return {name: (p, d) for name, (p, d) in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--compile", action="store_true", help="llmcli with --compile (the warm-up compiles)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    path = checkpoint_dir()
    device = torch.device("cpu")
    bandwidth, source = machine.machine_bandwidth(device)
    env = bench.environment(device, torch.float32, bandwidth, source)
    import transformers

    mode = "compiled" if args.compile else "eager"
    print(f"DeepSeek-V3 shape (random weights, {args.dtype}), llmcli {mode}, prompt {args.prompt}, "
          f"{args.gen} new tokens, "
          f"greedy, batch 1, {args.warmup} warm-up + {args.repeat} runs each")
    print(f"torch {env['torch']} | transformers {transformers.__version__} | {env['device_name']} | "
          f"{env['threads']} threads | memory bandwidth {bandwidth / 1e9:.1f} GB/s ({source}) | "
          f"load average at start {os.getloadavg()[0]:.2f}")
    started = time.perf_counter()
    loaded = load_model("deepseek-v3-shape", path, device="cpu", dtype=args.dtype, compile=args.compile)
    mine = bench.LlmcliBackend(loaded.runner, loaded.device)
    theirs = bench.TransformersBackend(path, loaded.device, loaded.dtype, loaded.config.family)
    settings = bench.BenchSettings([bench.Workload(args.prompt, args.gen, 1)], repeat=args.repeat,
                                   warmup=args.warmup, seed=0)
    rows = bench.run_bench(mine, settings, bandwidth, theirs,
                           progress=lambda text: print(f"  {text}", file=sys.stderr, flush=True))
    print(f"{'backend':13} {'prefill tok/s':>17} {'decode tok/s':>15} {'TTFT ms':>15} {'BW use':>7} "
          f"{'BW bound tok/s':>15}")
    for row in rows:
        bound = bandwidth / row.decode_read_bytes_per_step
        p, d, t = row.prefill_tokens_per_s, row.decode_tokens_per_s, row.ttft_s
        print(f"{row.backend:13} {p.mean:9.1f} ± {p.std:5.1f} {d.mean:7.2f} ± {d.std:5.2f} "
              f"{t.mean * 1000:7.1f} ± {t.std * 1000:5.1f} {100 * row.bandwidth_fraction:6.0f}% {bound:15.1f}")
    same = rows[0].runs[0].token_ids == rows[1].runs[0].token_ids
    ratio = rows[0].ratio
    print(f"wall clock, llmcli / transformers (> 1: llmcli faster): prefill {ratio['prefill']:.2f}×   "
          f"decode {ratio['decode']:.2f}×   | same greedy tokens: {same}")
    cpu = cpu_times([mine, theirs], bench.prompt_ids(settings.workloads[0], loaded.config.vocab_size, 0),
                    args.gen, args.repeat)
    for name, (prefill, decode) in cpu.items():
        print(f"CPU time {name:13} prefill {args.prompt / prefill:7.1f} tok/s ({prefill * 1e3:6.0f} ms)   "
              f"decode {1 / decode:6.2f} tok/s ({decode * 1e3:6.1f} ms/token)")
    (mp, md), (tp, td) = cpu["llmcli"], cpu["transformers"]
    print(f"CPU time, llmcli / transformers: prefill {tp / mp:.2f}×   decode {td / md:.2f}×")
    print(f"load average at end {os.getloadavg()[0]:.2f}; total {time.perf_counter() - started:.0f} s")
    theirs.close()


if __name__ == "__main__":
    main()
