"""The Gated DeltaNet decode step as one op (backends/deltanet_op.py): against the module's torch ops, step by
step (the state and the conv's columns it leaves, and the output), in float32 and bfloat16, with more value heads
than key heads; and a whole model's greedy decode with and without it."""

from __future__ import annotations

import pytest
import torch

from llmcli.backends import decode_ops
from llmcli.backends.deltanet_op import FusedGatedDeltaNet
from llmcli.config import ModelConfig
from llmcli.loader import load_model
from llmcli.models.deltanet import GatedDeltaNet
from llmcli.models.hybrid_cache import RecurrentLayerCache
from tests.test_qwen_hybrid import build_reference

pytestmark = pytest.mark.skipif(not decode_ops.available(), reason="llmcli's CPU kernels could not be built here")


def deltanet(dtype: torch.dtype, seed: int = 0) -> GatedDeltaNet:
    cfg = ModelConfig(family="qwen3_5", vocab_size=8, hidden_size=48, intermediate_size=8, num_layers=1, num_heads=2,
                      num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=64,
                      linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                      linear_value_head_dim=24, linear_conv_kernel_dim=4)
    torch.manual_seed(seed)
    module = GatedDeltaNet(cfg)
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.normal_(0, 0.5 if name in ("A_log", "dt_bias", "norm.weight") else 0.2)
    return module.to(dtype).eval()


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_one_step_op_follows_the_modules_ops(dtype, tolerance):
    plain = deltanet(dtype)
    fused = deltanet(dtype)
    fused.__class__ = FusedGatedDeltaNet
    caches = [RecurrentLayerCache(2, 2 * 2 * 16 + 4 * 24, 4, 4, 16, 24, dtype, torch.device("cpu")) for _ in range(2)]
    torch.manual_seed(1)
    with torch.inference_mode():
        for step in range(6):  # the conv's columns fill, the state builds up
            x = torch.randn(2, 1, 48).to(dtype)
            expected, got = plain(x, caches[0]), fused(x, caches[1])
            scale = expected.float().abs().max().item()
            assert (got.float() - expected.float()).abs().max().item() <= tolerance * scale, step
            assert torch.allclose(caches[1].state, caches[0].state, rtol=tolerance, atol=tolerance * 1e-2)
            assert torch.equal(caches[1].conv, caches[0].conv)


def test_model_decodes_the_same_tokens_with_the_op(tmp_path, monkeypatch):
    build_reference("qwen3_5", tmp_path / "hf", seed=4)
    ids = torch.tensor([list(range(5, 40))])

    def greedy(loaded, steps=12):
        runner = loaded.runner
        cache = runner.make_cache(1, ids.shape[1] + steps + 1)
        with torch.inference_mode():
            token = runner(ids, cache, last_only=True)[:, -1].float().argmax(-1, keepdim=True)
            out, logits = [], []
            for _ in range(steps):
                step = runner(token, cache, last_only=True)[:, -1].float()
                token = step.argmax(-1, keepdim=True)
                out.append(token.item())
                logits.append(step)
        return out, torch.stack(logits)

    fused = load_model("f", tmp_path / "hf", device="cpu", dtype="float32")
    assert any(type(m) is FusedGatedDeltaNet for m in fused.model.modules())
    monkeypatch.setenv("LLMCLI_FUSED_DECODE", "0")
    plain = load_model("p", tmp_path / "hf", device="cpu", dtype="float32")
    assert not any(type(m) is FusedGatedDeltaNet for m in plain.model.modules())
    (tokens, logits), (expected_tokens, expected) = greedy(fused), greedy(plain)
    assert tokens == expected_tokens
    assert (logits - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
