"""Check llmcli against transformers on the same weights: max |logit difference| and greedy tokens.

    python examples/compare_with_transformers.py MODEL_DIR

Needs `transformers` (pip install 'llmcli[dev]'). Works for Qwen2/Qwen3 and DeepSeek V2/V3 checkpoints;
without an argument it compares on the built-in demo model.
"""

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from llmcli.hub import resolve
from llmcli.loader import load_model

path = Path(sys.argv[1]) if len(sys.argv) > 1 else resolve("demo-qwen").path
ours = load_model("llmcli", path, device="cpu", dtype="float32")
theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()

ids = torch.tensor([ours.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)])
with torch.inference_mode():
    a = ours.runner(ids, ours.runner.make_cache(1, ids.shape[1]))
    b = theirs(ids).logits
print(f"prompt tokens: {ids.shape[1]}, max |delta logit|: {(a - b).abs().max().item():.2e}")
print(f"same next token: {bool(a[0, -1].argmax() == b[0, -1].argmax())}")
