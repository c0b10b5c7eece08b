"""Qwen2 / Qwen3 parity with transformers (float32, eager attention): logits and greedy tokens."""

from __future__ import annotations

import json

import pytest
import torch

from llmcli.config import load_config
from llmcli.loader import load_model
from llmcli.tokenizer import Tokenizer
from tests.conftest import save_hf_model

transformers = pytest.importorskip("transformers")

PROMPT = (
    "Rotary embeddings rotate pairs of dimensions by an angle that grows with the position, "
    "so attention scores depend on relative offsets. 你好，世界! def f(x): return x * 2"
)
BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)

CASES = {
    "qwen2-tied": ("Qwen2", dict(tie_word_embeddings=True)),
    "qwen2-untied": ("Qwen2", dict(tie_word_embeddings=False, rope_theta=1e6)),
    "qwen2-sliding": ("Qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "qwen2-yarn": ("Qwen2", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": 32})),
    "qwen3": ("Qwen3", dict(head_dim=24, tie_word_embeddings=False)),
    "qwen3-sliding": ("Qwen3", dict(head_dim=16, use_sliding_window=True, sliding_window=6, max_window_layers=2)),
}


def build_reference(kind: str, overrides: dict, path):
    config_cls = getattr(transformers, f"{kind}Config")
    model_cls = getattr(transformers, f"{kind}ForCausalLM")
    torch.manual_seed(0)
    config = config_cls(**{**BASE, **overrides}, attn_implementation="eager")
    model = model_cls(config).eval()
    with torch.no_grad():  # random biases, so a bias-loading bug cannot hide behind zeros
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    save_hf_model(model, path)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    kind, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    return request.param, build_reference(kind, overrides, path), path


def prompt_ids(path) -> list[int]:
    ids = Tokenizer.from_dir(path).encode(PROMPT)
    assert len(ids) >= 40
    return ids


def test_logits_match_transformers(case):
    name, reference, path = case
    ids = prompt_ids(path)
    loaded = load_model(name, path, device="cpu", dtype="float32")
    cache = loaded.model.make_cache(1, len(ids) + 4)
    with torch.inference_mode():
        ours = loaded.runner(torch.tensor([ids]), cache)
        theirs = reference(torch.tensor([ids])).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4
    # Decoding token by token from the cache gives the same logits as the full pass.
    cache2 = loaded.model.make_cache(1, len(ids))
    with torch.inference_mode():
        loaded.runner(torch.tensor([ids[:-3]]), cache2)
        steps = [loaded.runner(torch.tensor([[t]]), cache2) for t in ids[-3:]]
    assert (torch.cat(steps, 1) - theirs[:, -3:]).abs().max().item() <= 1e-4


def test_greedy_tokens_match_transformers_via_cli(case, run_cli):
    name, reference, path = case
    ids = prompt_ids(path)
    with torch.inference_mode():
        expected = reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    code, out, err = run_cli("generate", path, "--raw", "-p", PROMPT, "-n", "32", "--json", "--device", "cpu",
                             "--dtype", "float32")
    assert code == 0, err
    result = json.loads(out)
    assert result["prompt_tokens"] == len(ids)
    assert result["token_ids"] == expected
    assert result["generated_tokens"] == 32 and result["finish_reason"] == "length"


def test_config_normalisation(case):
    name, reference, path = case
    cfg = load_config(path)
    hf = reference.config
    assert cfg.num_layers == hf.num_hidden_layers and cfg.num_kv_heads == hf.num_key_value_heads
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings
    windows = [hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types]
    assert cfg.layer_windows == windows
    if name.startswith("qwen3"):
        assert cfg.qk_norm and cfg.head_dim == hf.head_dim and not cfg.attention_bias
    else:
        assert cfg.attention_bias and not cfg.qk_norm


@pytest.mark.parametrize("window", [None, 5])
def test_eager_one_query_attention_equals_sdpa(window):
    """Eager CPU decode steps attend with two float32 matmuls instead of SDPA's kernel (150 us a call)."""
    import torch.nn.functional as F

    from llmcli.models.cache import Span
    from llmcli.models.layers import attention_mask, one_query_attention_eager

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 1, 16), torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 16)
    allowed, _ = attention_mask(Span(torch.tensor([10]), 10), 1, 11, window, q.device)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.3, enable_gqa=True)
    got = one_query_attention_eager(q, k, v, allowed, 0.3)
    assert (allowed is None) == (window is None)
    assert torch.allclose(got, expected, atol=1e-6)
