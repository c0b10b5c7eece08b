"""llmcli vs transformers on a random Qwen3.5-shaped hybrid (Gated DeltaNet + gated attention), and whether
decoding cost grows with the context.

Shape: Qwen3.5-0.8B's decoder (hidden 1024, 8 heads / 2 kv heads x 256, DeltaNet 16 key / 16 value heads
x 128, conv 4, MLP 3584) with fewer layers (--layers, default 8: 6 DeltaNet + 2 full attention) and a
32K vocabulary; saved as the vision-language wrapper the hub ships. Both backends load the same files
and run the same ids in one process, alternating (llmcli.bench does the timing). Prompts of 128 and
4,096 random tokens, then greedy decoding: only the full-attention quarter should cost more per token at
4,096 (the DeltaNet layers read a fixed-size state); `--linear-only` builds every layer as DeltaNet to
show a decode step that does not grow at all.

    python benchmarks/hybrid_decode.py [--repeat 2] [--dtype bfloat16] [--threads 1] [--no-transformers]
    python benchmarks/hybrid_decode.py --decode-only --contexts 128,4096 [--linear-only]
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

TEXT = dict(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_attention_heads=8, num_key_value_heads=2,
            head_dim=256, linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
            linear_num_key_heads=16, linear_num_value_heads=16, max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                             "mrope_section": [11, 11, 10], "mrope_interleaved": True})
VISION = dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=1024, patch_size=16,
              temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=64)


def checkpoint_dir(layers: int, linear_only: bool, vocab_size: int | None = None) -> Path:
    """Build the random checkpoint once (bfloat16 on disk, like the released models); `vocab_size`: a variant
    with that vocabulary (Qwen3.5's real one, 248320, for llama.cpp's converter and the real tokenizer)."""
    vocab = f"-vocab{vocab_size}" if vocab_size else ""
    name = f"qwen3.5-shape-random-{layers}{'-linear' if linear_only else ''}{vocab}"
    target = cache_home() / "benchmarks" / name
    if (target / "config.json").is_file():
        return target
    import transformers

    print(f"building a random Qwen3.5-shaped checkpoint in {target} (once)", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        torch.manual_seed(0)
        kinds = ["linear_attention" if linear_only or (i + 1) % 4 else "full_attention" for i in range(layers)]
        shape = {**TEXT, **({"vocab_size": vocab_size} if vocab_size else {})}
        text = transformers.Qwen3_5TextConfig(**shape, num_hidden_layers=layers, layer_types=kinds).to_dict()
        model = transformers.Qwen3_5ForConditionalGeneration(
            transformers.Qwen3_5Config(text_config=text, vision_config=VISION))
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        write_tokenizer(tmp, build_demo_tokenizer())  # only loading needs it: bench uses random ids
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def mixer_times(model) -> dict[str, list[float]]:
    """Seconds spent in each kind of token mixer, per call, collected by forward hooks."""
    spent: dict[str, list[float]] = {"linear": [], "full": []}
    for layer in model.model.layers:
        mixer = layer.linear_attn if layer.linear else layer.self_attn
        kind = "linear" if layer.linear else "full"
        mixer.register_forward_pre_hook(lambda *_: setattr(mixer_times, "began", time.perf_counter()))
        mixer.register_forward_hook(lambda *_, k=kind: spent[k].append(time.perf_counter() - mixer_times.began))
    return spent


def decode_at(runner, spent: dict, context: int, steps: int) -> tuple[float, float, float]:
    """ms per decode step with `context` tokens already cached, and the ms of it in DeltaNet and in attention
    layers. The cache is filled with random values instead of a prefill (timing does not depend on them)."""
    cache = runner.make_cache(1, context + steps + 2)
    token = torch.tensor([[1]])
    with torch.inference_mode():
        for tensor in cache.tensors():
            tensor.normal_(0, 0.1)
        cache.length = context
        runner(token, cache)  # warm-up step
        for kind in spent:
            spent[kind].clear()
        began = time.perf_counter()
        for _ in range(steps):
            runner(token, cache)
        total = time.perf_counter() - began
    return (1e3 * total / steps, 1e3 * sum(spent["linear"]) / steps, 1e3 * sum(spent["full"]) / steps)


def decode_only(args, path: Path) -> None:
    loaded = load_model("qwen3.5-shape", path, device="cpu", dtype=args.dtype)
    spent = mixer_times(loaded.model)
    print(f"{'context':>8} {'ms/token':>9} {'DeltaNet ms':>12} {'attention ms':>13}")
    for context in (int(n) for n in args.contexts.split(",")):
        total, linear, full = decode_at(loaded.runner, spent, context, args.gen)
        print(f"{context:8} {total:9.1f} {linear:12.2f} {full:13.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--contexts", default="128,4096")
    parser.add_argument("--gen", type=int, default=32)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--linear-only", action="store_true", help="every layer a Gated DeltaNet")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--decode-only", action="store_true",
                        help="only llmcli's decode step at each context, split by token mixer (no prefill)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = checkpoint_dir(args.layers, args.linear_only)
    if args.decode_only:
        print(f"load average at start {os.getloadavg()[0]:.2f}; {torch.get_num_threads()} threads; {args.dtype}")
        decode_only(args, path)
        print(f"load average at end {os.getloadavg()[0]:.2f}")
        return
    device = torch.device("cpu")
    bandwidth, source = machine.machine_bandwidth(device)
    env = bench.environment(device, torch.float32, bandwidth, source)
    loaded = load_model("qwen3.5-shape", path, device="cpu", dtype=args.dtype)
    layers = loaded.config.layer_types
    print(f"Qwen3.5 shape, random weights, {args.dtype}: {layers.count('linear_attention')} DeltaNet + "
          f"{layers.count('full_attention')} full-attention layers, {args.gen} greedy tokens after each prompt")
    print(f"torch {env['torch']} | {env['device_name']} | {env['threads']} threads | load average at start "
          f"{os.getloadavg()[0]:.2f}")
    mine = bench.LlmcliBackend(loaded.runner, loaded.device)
    theirs = None if args.no_transformers else bench.TransformersBackend(path, loaded.device, loaded.dtype,
                                                                         loaded.config.family)
    workloads = [bench.Workload(int(n), args.gen, 1) for n in args.contexts.split(",")]
    settings = bench.BenchSettings(workloads, repeat=args.repeat, warmup=args.warmup, seed=0)
    rows = bench.run_bench(mine, settings, bandwidth, theirs,
                           progress=lambda text: print(f"  {text}", file=sys.stderr, flush=True))
    print(f"{'backend':13} {'prompt':>7} {'prefill tok/s':>17} {'decode tok/s':>15}")
    for row in rows:
        p, d = row.prefill_tokens_per_s, row.decode_tokens_per_s
        print(f"{row.backend:13} {row.workload.prompt_tokens:7} {p.mean:9.1f} ± {p.std:5.1f} "
              f"{d.mean:7.2f} ± {d.std:5.2f}")
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    if theirs is not None:
        theirs.close()


if __name__ == "__main__":
    main()
