"""Built-in demo models: tiny random checkpoints in the real on-disk format.

They are written deterministically (fixed seed) into llmcli's cache on first use and then go
through the normal loader, so every command works offline out of the box. The weights are
random: output is gibberish by design.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from llmcli.errors import LlmcliError
from llmcli.paths import cache_home
from llmcli.templates import CHATML_TEMPLATE

DEMO_VERSION = 1

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# A small bilingual corpus so the demo tokenizer learns real merges (and sees non-ASCII bytes).
CORPUS = [
    "The quick brown fox jumps over the lazy dog. A language model predicts the next token.",
    "Large language models read text as tokens, attend over the context, and write one token at a time.",
    "Qwen and DeepSeek are families of open models. Mixture of experts routes each token to a few experts.",
    "def greet(name):\n    return f'Hello, {name}!'\n\nprint(greet('world'))\n",
    "for i in range(10):\n    total += i * i  # sum of squares\n",
    "你好，世界！语言模型一次生成一个词元。注意力机制让模型看到上下文。",
    "こんにちは、世界。トークンを一つずつ生成します。",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828. Emoji: 🙂 🚀 ✨",
    "Attention is all you need. Rotary position embeddings rotate pairs of dimensions.",
    "The cache stores keys and values so that decoding reuses the work of the prompt.",
]


def build_demo_tokenizer(vocab_size: int = 512):
    """A byte-level BPE trained on CORPUS; deterministic for a given corpus and size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tok


def write_tokenizer(directory: Path, tok, template: str = CHATML_TEMPLATE) -> None:
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": template,
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {"content": t, "special": True} for t in SPECIAL_TOKENS
        },
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def random_state_dict(model, seed: int, skip: set[str] = frozenset()) -> dict:
    """Deterministic random weights: normal(0, 0.02) for matrices, ones for norms, small biases."""
    import torch  # imported on use: `list` and `download` never need it

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, param in sorted(model.state_dict().items()):
        if name in skip:
            continue
        if name.endswith("norm.weight") or "layernorm" in name or name.endswith("ln_1.weight"):
            value = torch.ones(param.shape)
        elif name.endswith("bias"):
            value = torch.randn(param.shape, generator=gen) * 0.1
        else:
            value = torch.randn(param.shape, generator=gen) * 0.02
        out[name] = value.contiguous()
    return out


def build_demo_qwen(directory: Path) -> None:
    from safetensors.torch import save_file

    from llmcli.config import config_from_dict
    from llmcli.models.qwen import QwenForCausalLM

    tok = build_demo_tokenizer()
    raw = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": 512,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "eos_token_id": tok.token_to_id("<|im_end|>"),
        "torch_dtype": "float32",
    }
    model = QwenForCausalLM(config_from_dict(raw))
    save_file(random_state_dict(model, seed=0, skip={"lm_head.weight"}), str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(raw, indent=2))
    write_tokenizer(directory, tok)


def build_demo_deepseek(directory: Path) -> None:
    """A tiny DeepSeek-V3-shaped model: q_lora, MLA, a dense first layer, then MoE layers with
    group-limited sigmoid routing (noaux_tc), a shared expert and YaRN."""
    from safetensors.torch import save_file

    from llmcli.config import config_from_dict
    from llmcli.models.deepseek import DeepseekForCausalLM

    tok = build_demo_tokenizer()
    raw = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 512,
        "hidden_size": 128,
        "intermediate_size": 320,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "q_lora_rank": 96,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "tie_word_embeddings": False,
        "eos_token_id": tok.token_to_id("<|im_end|>"),
        "torch_dtype": "float32",
    }
    model = DeepseekForCausalLM(config_from_dict(raw))
    save_file(random_state_dict(model, seed=1), str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(raw, indent=2))
    write_tokenizer(directory, tok)


# name -> builder(directory). Other families add their demo here.
BUILDERS: dict[str, Callable[[Path], None]] = {"demo-qwen": build_demo_qwen, "demo-deepseek": build_demo_deepseek}


def is_demo(name: str) -> bool:
    return name in BUILDERS or name.startswith("demo-")


def ensure_demo(name: str) -> Path:
    """Path of the demo model, building it on first use (atomically: a crash leaves nothing half-made)."""
    builder = BUILDERS.get(name)
    if builder is None:
        raise LlmcliError(f"unknown demo model {name!r}; available: {', '.join(sorted(BUILDERS))}")
    target = cache_home() / "demo" / f"{name}-v{DEMO_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        import torch

        with torch.inference_mode(False):
            builder(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race with another process: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
