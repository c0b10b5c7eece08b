"""Checkpoints with the layer count and attention layout of small real models but tiny widths, so that a
decode step's products cost next to nothing and its time is what runs around them (ops, Python):

    python benchmarks/skinny_models.py /tmp/skinny      # writes qwen2-24l, qwen3-28l, deepseek-v3-8l
    python benchmarks/decode_profile.py /tmp/skinny/qwen2-24l --threads 1

Random bfloat16 weights from transformers (a test-only dependency), saved with a byte-level tokenizer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import save_hf_model  # noqa: E402

SHAPES = {
    # Qwen2.5-0.5B: 24 layers, 14 query heads over 2 KV heads (GQA 7), q/k/v biases, tied head
    "qwen2-24l": ("Qwen2", dict(hidden_size=448, num_attention_heads=14, num_key_value_heads=2,
                                intermediate_size=64, num_hidden_layers=24, tie_word_embeddings=True)),
    # Qwen3-0.6B: 28 layers, 16 over 8 heads of 128 with q/k norms
    "qwen3-28l": ("Qwen3", dict(hidden_size=256, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                intermediate_size=64, num_hidden_layers=28, tie_word_embeddings=True)),
    # DeepSeek-V3's MLA and routed experts, 8 layers (the first dense)
    "deepseek-v3-8l": ("DeepseekV3", dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=8,
                                          q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32,
                                          v_head_dim=32, intermediate_size=128, moe_intermediate_size=32,
                                          n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
                                          n_group=4, topk_group=2, first_k_dense_replace=1,
                                          num_hidden_layers=8, tie_word_embeddings=False)),
}


def main(root: Path) -> None:
    for name, (kind, shape) in SHAPES.items():
        torch.manual_seed(0)
        config = getattr(transformers, f"{kind}Config")(vocab_size=1024, max_position_embeddings=4096, **shape)
        model = getattr(transformers, f"{kind}ForCausalLM")(config).to(torch.bfloat16).eval()
        save_hf_model(model, root / name)
        print(root / name)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/skinny"))
