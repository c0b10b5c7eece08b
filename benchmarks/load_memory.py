"""Peak memory while loading: llmcli converts tensor by tensor, so the load should cost about one
copy of the weights in the target dtype, not two.

    python benchmarks/load_memory.py [--layers 24] [--dtype bfloat16]

Builds a random checkpoint with the Qwen2.5-0.5B shape (float32 on disk by default, so a bfloat16
load also exercises conversion) and loads it in a fresh process, reporting the peak resident set
size above the baseline measured just before loading, against the size of the loaded weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                  max_position_embeddings=32768, rope_theta=1e6)

CHILD = r"""
import json, sys, torch
from pathlib import Path
from llmcli.bench import parameter_bytes
from llmcli.loader import load_model
from llmcli.machine import PeakMemory

memory = PeakMemory(torch.device("cpu"))
memory.start()  # the peak (VmHWM) starts again from the current RSS
if memory.method != "rss_hwm":
    sys.exit("needs Linux's /proc/self/clear_refs to reset the peak")
loaded = load_model("bench", Path(sys.argv[1]), device="cpu", dtype=sys.argv[2])
growth = memory.stop()[1]
print(json.dumps({"growth": growth, "weights_bytes": parameter_bytes(loaded.model)[0],
                  "load_seconds": loaded.load_seconds}))
"""


def build_checkpoint(directory: Path, layers: int, disk_dtype: str) -> None:
    """A random Qwen2 checkpoint of the given depth, written tensor by tensor with safetensors."""
    import torch
    from safetensors.torch import save_file

    from llmcli.config import config_from_dict
    from llmcli.demo import build_demo_tokenizer, write_tokenizer
    from llmcli.models.qwen import QwenForCausalLM

    raw = {"model_type": "qwen2", **QWEN25_05B, "num_hidden_layers": layers, "torch_dtype": disk_dtype}
    with torch.device("meta"):
        model = QwenForCausalLM(config_from_dict(raw))
    gen = torch.Generator().manual_seed(0)
    tensors = {
        name: (torch.randn(p.shape, generator=gen) * 0.02).to(getattr(torch, disk_dtype))
        for name, p in model.state_dict().items()
        if name != "lm_head.weight"
    }
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(raw))
    write_tokenizer(directory, build_demo_tokenizer())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--disk-dtype", default="float32")
    parser.add_argument("--dtype", action="append", help="load dtype(s); default float32 and bfloat16")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        build_checkpoint(directory, args.layers, args.disk_dtype)
        disk = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
        print(f"checkpoint: {disk / 2**20:.0f} MiB of {args.disk_dtype} safetensors, {args.layers} layers")
        for dtype in args.dtype or ["float32", "bfloat16"]:
            out = subprocess.run([sys.executable, "-c", CHILD, str(directory), dtype],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            growth = r["growth"]
            print(f"load as {dtype:9s}: weights {r['weights_bytes'] / 2**20:7.0f} MiB, peak RSS growth "
                  f"{growth / 2**20:7.0f} MiB ({growth / r['weights_bytes']:.2f}x weights), "
                  f"{r['load_seconds']:.1f} s")


if __name__ == "__main__":
    main()
