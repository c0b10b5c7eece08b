"""`llmcli show`: model facts from config.json and safetensors headers.

Oracles: the tensors themselves (read with the safetensors library), transformers' own models for
the shapes a config implies, closed-form expert arithmetic for active parameters, and the published
sizes of real models (Qwen2.5-7B: 7,615,616,512; DeepSeek-V3: 671B total / 37B active; ...).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llmcli.config import config_from_dict, load_config
from llmcli.demo import BUILDERS, ensure_demo
from llmcli.show import count_config, run_dtype
from tests.conftest import save_hf_model, seeded

ELEM = {"float32": 4, "bfloat16": 2, "float16": 2}


def show_json(run_cli, model) -> dict:
    code, out, err = run_cli("show", str(model), "--json")
    assert code == 0, err
    return json.loads(out)


def tensor_sizes(model_dir: Path) -> dict[str, int]:
    """name -> numel, read with the safetensors library."""
    sizes = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                sizes[name] = torch.Size(f.get_slice(name).get_shape()).numel()
    return sizes


def inactive_by_formula(cfg) -> int:
    """Parameters a MoE token skips: (E - k) routed experts of 3 * hidden * moe_intermediate in each MoE
    layer, and the (untied) embedding table, which DeepSeek leaves out of its "activated" counts."""
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    experts = moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * 3 * cfg.hidden_size * \
        cfg.moe_intermediate_size
    return experts + (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)


def without_weights(model_dir: Path, tmp_path: Path) -> Path:
    """A copy with config and tokenizer only (as `show` fetches for a model not on disk)."""
    target = tmp_path / f"{model_dir.name}-meta"
    target.mkdir()
    for p in model_dir.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors"):
            shutil.copy(p, target / p.name)
    return target


# -- demo models -----------------------------------------------------------------------------------


def test_show_demo_qwen(run_cli):
    facts = show_json(run_cli, "demo-qwen")
    path = ensure_demo("demo-qwen")
    raw = json.loads((path / "config.json").read_text())
    assert facts["params_total"] == sum(tensor_sizes(path).values())
    assert facts["params_active"] == facts["params_total"] and facts["experts"] is None
    assert (facts["layers"], facts["hidden_size"], facts["heads"], facts["kv_heads"]) == (
        raw["num_hidden_layers"], raw["hidden_size"], raw["num_attention_heads"], raw["num_key_value_heads"])
    head_dim = raw["hidden_size"] // raw["num_attention_heads"]
    assert facts["kv_cache"]["bytes_per_token"] == \
        2 * raw["num_key_value_heads"] * head_dim * 4 * raw["num_hidden_layers"]
    assert facts["chat_template"] == "checkpoint" and facts["tokenizer"] == "tokenizer.json"
    assert facts["dtype_on_disk"] == "float32" and facts["fp8"] is False
    assert facts["context_length"] == raw["max_position_embeddings"]
    assert facts["rope"]["base"] == raw["rope_theta"] and facts["rope"]["scaling"] is None


@pytest.mark.skipif("demo-deepseek" not in BUILDERS, reason="demo-deepseek is not built yet")
def test_show_demo_deepseek(run_cli):
    facts = show_json(run_cli, "demo-deepseek")
    path = ensure_demo("demo-deepseek")
    cfg = load_config(path)
    assert facts["params_total"] == sum(tensor_sizes(path).values())
    assert facts["params_active"] == facts["params_total"] - inactive_by_formula(cfg)
    assert facts["experts"]["routed"] == cfg.n_routed_experts and facts["experts"]["per_token"] == \
        cfg.num_experts_per_tok
    assert facts["kv_cache"]["bytes_per_token"] == \
        (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * ELEM[facts["run_dtype"]] * cfg.num_layers


# -- transformers checkpoints ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    seeded(0)
    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=False, use_sliding_window=True, sliding_window=128, max_window_layers=2,
                      rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
                      rope_theta=1e6)
    model = Qwen2ForCausalLM(cfg)
    directory = save_hf_model(model, tmp_path_factory.mktemp("qwen2"))
    (directory / "expected.json").write_text(json.dumps({"params": sum(p.numel() for p in model.parameters())}))
    return directory


def test_show_qwen2(run_cli, qwen2_dir, tmp_path):
    expected = json.loads((qwen2_dir / "expected.json").read_text())["params"]
    facts = show_json(run_cli, qwen2_dir)
    assert facts["params_total"] == expected == sum(tensor_sizes(qwen2_dir).values())
    assert facts["params_active"] == expected and facts["params_source"] == "checkpoint"
    assert facts["attention"] == {"kind": "GQA", "qkv_bias": True, "qk_norm": False}
    assert facts["window"]["layer_windows"] == [None, None, 128, 128]
    assert "layers 2-3" in facts["window"]["summary"]
    assert facts["rope"]["base"] == 1e6
    assert facts["rope"]["scaling"]["type"] == "yarn" and facts["rope"]["scaling"]["factor"] == 4.0
    assert facts["kv_cache"]["bytes_per_token"] == 2 * 2 * 16 * 4 * 4
    meta = without_weights(qwen2_dir, tmp_path)
    facts = show_json(run_cli, meta)
    assert facts["params_source"] == "config" and facts["params_total"] == expected
    assert facts["weights_on_disk"] is False


def test_show_qwen3_tied(run_cli, tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    seeded(0)
    cfg = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True,
                      max_position_embeddings=512, torch_dtype="bfloat16")
    model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    directory = save_hf_model(model, tmp_path / "qwen3")
    expected = sum(p.numel() for p in model.parameters())  # the tied head counted once
    facts = show_json(run_cli, directory)
    assert facts["params_total"] == expected == sum(tensor_sizes(directory).values())
    assert facts["attention"]["qk_norm"] is True and facts["attention"]["qkv_bias"] is False
    assert facts["head_dim"] == 24 and facts["tied_embeddings"] is True
    assert facts["dtype_on_disk"] == "bfloat16"
    assert facts["kv_cache"]["bytes_per_token"] == 2 * 2 * 24 * 2 * 2  # bfloat16
    assert count_config(load_config(directory)).total == expected


def deepseek_dir(tmp_path: Path, version: int) -> tuple[Path, int]:
    pytest.importorskip("llmcli.config_deepseek")
    import transformers

    seeded(0)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
                  qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8,
                  num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=256)
    if version == 3:
        cfg = transformers.DeepseekV3Config(q_lora_rank=32, n_shared_experts=1, n_group=4, topk_group=2, **common)
        model = transformers.DeepseekV3ForCausalLM(cfg)
    else:
        cfg = transformers.DeepseekV2Config(q_lora_rank=None, n_shared_experts=2, topk_method="greedy", **common)
        model = transformers.DeepseekV2ForCausalLM(cfg)
    directory = save_hf_model(model, tmp_path / f"deepseek-v{version}")
    # Every checkpoint tensor is a parameter here, V3's e_score_correction_bias (a buffer) included.
    return directory, sum(t.numel() for t in model.state_dict().values())


@pytest.mark.parametrize("version", [2, 3])
def test_show_deepseek(run_cli, tmp_path, version):
    directory, expected = deepseek_dir(tmp_path, version)
    cfg = load_config(directory)
    facts = show_json(run_cli, directory)
    assert facts["params_total"] == expected == sum(tensor_sizes(directory).values())
    assert facts["params_active"] == expected - inactive_by_formula(cfg)
    assert facts["params_active"] < facts["params_total"]
    assert facts["kv_cache"]["bytes_per_token"] == (16 + 8) * 4 * 3  # latent c_kv + rope key, float32
    assert facts["kv_cache"]["expanded_bytes_per_token"] == 4 * (8 + 8 + 8) * 4 * 3
    e = facts["experts"]
    assert (e["routed"], e["per_token"], e["moe_layers"], e["dense_layers"]) == (8, 2, 2, 1)
    assert e["shared"] == (1 if version == 3 else 2)
    assert facts["attention"]["q_lora_rank"] == (32 if version == 3 else None)
    total = count_config(cfg)
    assert (total.total, total.active) == (facts["params_total"], facts["params_active"])


def test_show_fp8_and_mtp(run_cli, tmp_path):
    """FP8 scales are not parameters; the multi-token-prediction layer is counted apart."""
    directory, expected = deepseek_dir(tmp_path, 3)
    weights = load_file(str(directory / "model.safetensors"))
    fp8 = {}
    for name, tensor in weights.items():
        if name.endswith("q_b_proj.weight"):
            fp8[name] = tensor.to(torch.float8_e4m3fn)
            fp8[name + "_scale_inv"] = torch.ones(1, 1)
        else:
            fp8[name] = tensor
    mtp = {k.replace("model.layers.1.", "model.layers.3."): v.clone() for k, v in weights.items()
           if k.startswith("model.layers.1.")}
    mtp["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    save_file({**fp8, **mtp}, str(directory / "model.safetensors"))
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (directory / "config.json").write_text(json.dumps(config))
    facts = show_json(run_cli, directory)
    assert facts["params_total"] == expected
    assert facts["params_mtp"] == sum(v.numel() for v in mtp.values())
    assert facts["fp8"] is True and facts["fp8_block_size"] == [128, 128]
    assert facts["dtype_bytes_on_disk"]["float8_e4m3fn"] == sum(v.numel() for k, v in fp8.items()
                                                                  if v.dtype == torch.float8_e4m3fn)
    assert facts["run_dtype"] == "bfloat16"
    assert facts["kv_cache"]["bytes_per_token"] == (16 + 8) * 2 * 3


def test_show_qwen1(run_cli, tmp_path):
    """Original Qwen, tensors by their documented shapes: fused c_attn with bias, w1/w2 of half the
    config's intermediate_size, an untied lm_head; the rotary inv_freq buffer is not a parameter."""
    pytest.importorskip("llmcli.config_qwen1")
    h, heads, layers, inter, vocab = 64, 4, 2, 192, 256
    tensors = {"transformer.wte.weight": torch.zeros(vocab, h), "transformer.ln_f.weight": torch.ones(h),
               "lm_head.weight": torch.zeros(vocab, h)}
    for i in range(layers):
        p = f"transformer.h.{i}."
        tensors.update({
            p + "ln_1.weight": torch.ones(h), p + "ln_2.weight": torch.ones(h),
            p + "attn.c_attn.weight": torch.zeros(3 * h, h), p + "attn.c_attn.bias": torch.zeros(3 * h),
            p + "attn.c_proj.weight": torch.zeros(h, h),
            p + "mlp.w1.weight": torch.zeros(inter // 2, h), p + "mlp.w2.weight": torch.zeros(inter // 2, h),
            p + "mlp.c_proj.weight": torch.zeros(h, inter // 2),
        })
    buffers = {"transformer.rotary_emb.inv_freq": torch.zeros(8)}
    directory = tmp_path / "qwen1"
    directory.mkdir()
    save_file({**tensors, **buffers}, str(directory / "model.safetensors"))
    raw = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "hidden_size": h,
           "num_attention_heads": heads, "num_hidden_layers": layers, "intermediate_size": inter,
           "vocab_size": vocab, "kv_channels": h // heads, "seq_length": 2048, "max_position_embeddings": 8192,
           "rotary_emb_base": 10000, "use_logn_attn": True, "use_dynamic_ntk": True, "bf16": True}
    (directory / "config.json").write_text(json.dumps(raw))
    (directory / "qwen.tiktoken").write_text("")
    facts = show_json(run_cli, directory)
    expected = sum(t.numel() for t in tensors.values())
    assert facts["params_total"] == expected
    assert count_config(load_config(directory)).total == expected
    assert facts["logn_attention"] is True and facts["dynamic_ntk"] is True and facts["seq_length"] == 2048
    assert facts["chat_template"] == "built-in ChatML" and facts["tokenizer"] == "qwen.tiktoken"
    assert facts["intermediate_size"] == inter // 2
    assert facts["kv_cache"]["bytes_per_token"] == 2 * h * 2 * layers  # bfloat16 keys + values
    code, out, _ = run_cli("show", str(directory))
    assert code == 0 and "LogN on, dynamic NTK on" in out


# -- published sizes of real models ------------------------------------------------------------------


QWEN25_7B = {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
             "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
             "tie_word_embeddings": False, "max_position_embeddings": 32768, "rope_theta": 1e6,
             "torch_dtype": "bfloat16"}
QWEN3_8B = {"model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
            "tie_word_embeddings": False, "max_position_embeddings": 40960, "rope_theta": 1e6,
            "torch_dtype": "bfloat16"}
DEEPSEEK_V3 = {"model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432,
               "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
               "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
               "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256, "n_shared_experts": 1,
               "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "first_k_dense_replace": 3,
               "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
               "routed_scaling_factor": 2.5, "vocab_size": 129280, "max_position_embeddings": 163840,
               "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
               "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
               "torch_dtype": "bfloat16"}
DEEPSEEK_V2_LITE = {"model_type": "deepseek_v2", "hidden_size": 2048, "intermediate_size": 10944,
                    "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
                    "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                    "v_head_dim": 128, "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
                    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "topk_method": "greedy",
                    "vocab_size": 102400, "max_position_embeddings": 163840, "torch_dtype": "bfloat16"}


def test_real_model_sizes():
    assert count_config(config_from_dict(QWEN25_7B)).total == 7_615_616_512
    assert abs(count_config(config_from_dict(QWEN3_8B)).total / 8.19e9 - 1) < 0.005
    pytest.importorskip("llmcli.config_deepseek")
    v3 = count_config(config_from_dict(DEEPSEEK_V3))
    assert abs(v3.total / 671e9 - 1) < 0.005 and abs(v3.active / 37e9 - 1) < 0.02  # 36.6B
    lite = count_config(config_from_dict(DEEPSEEK_V2_LITE))
    assert abs(lite.total / 15.7e9 - 1) < 0.01 and abs(lite.active / 2.4e9 - 1) < 0.03  # 2.45B


def test_real_kv_cache_sizes():
    from llmcli.show import kv_cache

    # Qwen2.5-7B: 28 layers x 2 x 4 kv heads x 128 x bf16 = 56 KiB per token.
    assert kv_cache(config_from_dict(QWEN25_7B), "bfloat16")["bytes_per_token"] == 28 * 2 * 4 * 128 * 2
    pytest.importorskip("llmcli.config_deepseek")
    # DeepSeek-V3: (512 + 64) x bf16 x 61 layers, against 128 x (192 + 128) expanded.
    v3 = kv_cache(config_from_dict(DEEPSEEK_V3), "bfloat16")
    assert v3["bytes_per_token"] == 576 * 2 * 61 and v3["expanded_bytes_per_token"] == 40960 * 2 * 61


@pytest.mark.parametrize("saved", ["float32", "bfloat16", "float16", None])
def test_run_dtype_matches_the_loader(saved):
    from llmcli.loader import resolve_dtype

    cfg = config_from_dict({**QWEN25_7B, "torch_dtype": saved})
    for device in ("cpu", "meta"):  # meta stands for an accelerator: float16 stays float16 there
        chosen = resolve_dtype("auto", cfg, torch.device(device))
        assert chosen.itemsize == ELEM[run_dtype(cfg)]


def test_show_text_and_bad_input(run_cli, tmp_path):
    code, out, err = run_cli("show", "demo-qwen")
    assert code == 0, err
    for label in ("parameters", "attention", "context", "rope", "kv cache", "chat template", "dtype on disk"):
        assert label in out
    code, _, err = run_cli("show", str(tmp_path))
    assert code == 1 and err.startswith("error:") and "config.json" in err
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_7B))
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 4)
    code, _, err = run_cli("show", str(tmp_path))
    assert code == 1 and "safetensors" in err and "Traceback" not in err
