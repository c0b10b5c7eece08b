"""Checkpoint loading: sharded files, dtype conversion, bounded peak memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from llmcli.loader import load_model
from llmcli.weights import Checkpoint
from tests.conftest import save_hf_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.manual_seed(1)
    config = transformers.Qwen2Config(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(config).eval()
    single = save_hf_model(model, tmp_path_factory.mktemp("single"))
    sharded = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(sharded, max_shard_size="40KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((single / name).read_bytes())
    return model, single, sharded


def test_sharded_checkpoint_loads_like_single_file(reference):
    model, single, sharded = reference
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    ids = torch.arange(5, 45)[None]
    with torch.inference_mode():
        expected = model(ids).logits
        for path in (single, sharded):
            m = load_model("t", path, device="cpu", dtype="float32").runner
            assert (m(ids, m.make_cache(1, 40)) - expected).abs().max() <= 1e-4


def test_bfloat16_load_converts_each_tensor(reference):
    model, single, _ = reference
    m = load_model("t", single, device="cpu", dtype="bfloat16").model
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    expected = model.model.embed_tokens.weight.to(torch.bfloat16)
    assert torch.equal(m.model.embed_tokens.weight, expected)
    expected = model.model.layers[1].self_attn.k_proj.bias.to(torch.bfloat16)  # k follows q in the fused qkv
    q_size = model.model.layers[1].self_attn.q_proj.out_features
    fused_bias = m.model.layers[1].self_attn.qkv_proj.bias
    assert torch.equal(fused_bias[q_size: q_size + expected.numel()], expected)


def test_checkpoint_reads_exact_bytes(reference):
    model, single, _ = reference
    with Checkpoint(single) as ckpt:
        weight = ckpt.get("model.layers.0.self_attn.q_proj.bias")
        out = torch.empty(ckpt.shape("model.embed_tokens.weight"))
        assert ckpt.get("model.embed_tokens.weight", out=out) is out  # read in place
    assert torch.equal(weight, model.model.layers[0].self_attn.q_proj.bias)
    assert torch.equal(out, model.model.embed_tokens.weight)


def test_index_pointing_at_missing_shard(reference, tmp_path, run_cli):
    _, _, sharded = reference
    for f in sharded.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    victim = sorted(tmp_path.glob("*.safetensors"))[1]
    victim.unlink()
    code, _, err = run_cli("generate", tmp_path, "-p", "hi")
    assert code != 0 and victim.name in err and "Traceback" not in err


PEAK_CHILD = r"""
import json, sys
from pathlib import Path
from llmcli.loader import load_model
import llmcli.models.qwen, llmcli.tokenizer, llmcli.weights  # imports are not part of the load
from llmcli.tokenizer import Tokenizer
import torch
Tokenizer.from_dir(Path(sys.argv[1]))
with torch.device("meta"):  # torch's one-off set-up for meta tensors is not part of the load either
    torch.nn.Linear(2, 2), torch.nn.Embedding(2, 2)

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS
base = status("VmRSS")
m = load_model("t", Path(sys.argv[1]), device="cpu", dtype="float32").model
size = sum(p.numel() * p.element_size() for p in m.parameters())
print(json.dumps({"growth": status("VmHWM") - base, "weights": size}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_memory_while_loading_is_about_one_copy(tmp_path):
    """A 64 MiB float32 checkpoint loads with well under two copies of the weights resident."""
    torch.manual_seed(2)
    config = transformers.Qwen2Config(vocab_size=16384, hidden_size=512, intermediate_size=1024,
                                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                      tie_word_embeddings=False)
    save_hf_model(transformers.Qwen2ForCausalLM(config), tmp_path, vocab_size=512)
    out = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(tmp_path)], check=True, capture_output=True,
                         text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["weights"] > 60 * 2**20
    assert r["growth"] < 1.35 * r["weights"], r


def test_loading_and_decoding_without_compile_never_imports_dynamo():
    """Building on the meta device must not run meta arithmetic (rope) or parameter init: torch sends
    both through torch._dynamo, whose import alone costs ~75 MiB of resident memory."""
    import subprocess
    import sys

    from llmcli.demo import ensure_demo

    code = (
        "import sys, torch\n"
        "from llmcli.loader import load_model\n"
        "for name in ('demo-qwen', 'demo-deepseek'):\n"
        "    m = load_model(name, sys.argv[1 if name == 'demo-qwen' else 2], device='cpu', dtype='bfloat16').runner\n"
        "    with torch.inference_mode():\n"
        "        cache = m.make_cache(1, 8)\n"
        "        m(torch.tensor([[1, 2, 3]]), cache)\n"
        "        m(torch.tensor([[4]]), cache)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    paths = [str(ensure_demo("demo-qwen")), str(ensure_demo("demo-deepseek"))]
    result = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
