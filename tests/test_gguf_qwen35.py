"""Qwen3.5 GGUF files (architecture qwen35): written by a stand-in for llama.cpp's converter (its transforms: norms
stored as 1 + w, A_log as -exp(A_log), value heads reordered where there are more of them than key heads), they
load to the safetensors checkpoint's logits, in float32 and in int4."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from llmcli.backends import int4
from llmcli.formats.gguf_qwen35 import untile
from llmcli.loader import load_model
from tests.gguf_convert_qwen35 import convert_qwen35, tile
from tests.test_qwen_hybrid import build_reference

pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["qwen3_5", "qwen3_5_moe"])
def qwen35(request, tmp_path_factory):
    """A tiny Qwen3.5 or Qwen3.5-MoE (4 value heads over 2 key heads: the converter reorders them) and its GGUF."""
    path = tmp_path_factory.mktemp(request.param)
    build_reference(request.param, path / "hf", seed=2)
    return path / "hf", convert_qwen35(path / "hf", path / "qwen35.gguf")


def logits(path, **settings) -> torch.Tensor:
    loaded = load_model("q", path, device="cpu", dtype="float32", **settings)
    ids = torch.tensor([list(range(5, 80))])  # crosses the DeltaNet's 64-token chunk
    with torch.inference_mode():
        return loaded.runner(ids, loaded.runner.make_cache(1, 80)).float()


def test_untile_inverts_the_converters_reorder():
    w = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(5, 2 * 3 * 4)
    for axis in (0, 1):
        x = w if axis == 1 else w.T
        assert np.array_equal(untile(tile(x, axis, 2, 3, 4), axis, 2, 3, 4), x)
    assert not np.array_equal(tile(w, 1, 2, 3, 4), w)


def test_qwen35_gguf_gives_the_checkpoints_logits(qwen35):
    source, gguf_path = qwen35
    loaded = load_model("q", gguf_path, device="cpu", dtype="float32")
    text = json.loads((source / "config.json").read_text())["text_config"]
    cfg = loaded.config
    assert cfg.family == json.loads((source / "config.json").read_text())["model_type"]
    assert cfg.layer_types == text["layer_types"] and cfg.n_routed_experts == text.get("num_experts", 0)
    assert (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.rotary_dim) == (2, 4, 4)
    expected = logits(source)
    assert (logits(gguf_path) - expected).abs().max().item() <= 1e-4


def test_qwen35_gguf_runs_in_int4_and_from_the_cli(qwen35, tmp_path, run_cli):
    """A 4-bit file runs in int4 by default; the DeltaNet's qkv and z projections, whose value heads the converter
    reordered by rows, still multiply by exactly the file's matrix (their codes taken as stored, rows moved back)."""
    source, _ = qwen35
    path = convert_qwen35(source, tmp_path / "q4.gguf", qtype=Q.Q4_0)
    code, out, err = run_cli("generate", path, "--raw", "-p", "hello", "-n", "4", "--json", "--device", "cpu")
    assert code == 0, err
    assert len(json.loads(out)["token_ids"]) == 4
    assert "running them in int4" in err  # the file's 4-bit layers, as stored
    floats = load_model("f", path, device="cpu", dtype="float32", quantize=None).model.model.layers[0].linear_attn
    ours = load_model("q", path, device="cpu", dtype="float32", quantize="int4").model.model.layers[0].linear_attn
    expected = floats.in_proj.weight  # the four input products, fused: [qkv | z | b | a]
    parts = [ours.in_proj] if hasattr(ours, "in_proj") else [ours.in_proj_qkv, ours.in_proj_z]
    assert all(isinstance(p, int4.Int4Linear) for p in parts)
    with torch.inference_mode():
        weight = torch.cat([p(torch.eye(p.in_features)).t() for p in parts])
    assert torch.allclose(weight, expected[: len(weight)], atol=1e-6, rtol=0)
