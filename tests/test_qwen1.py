"""Original Qwen (QWenLMHeadModel): config, weights, LogN, dynamic NTK, windows, tiktoken vocabulary, CLI.

Oracles: transformers' Qwen2 (which original Qwen equals when kv heads = heads and the sequence fits in
seq_length), a plain float64 re-implementation written here from the published formulas (for everything
beyond seq_length), the worked values in DESIGN.md, and the `tiktoken` library for the vocabulary.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import math
import random
import shutil
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llmcli.cli.common import parse_window_spec
from llmcli.cli.generate import stop_token_ids
from llmcli.config import config_from_dict
from llmcli.errors import LlmcliError
from llmcli.generate import Generation
from llmcli.loader import load_model
from llmcli.models.cache import Span
from llmcli.models.layers import attention_mask
from llmcli.models.rope import logn_scale, ntk_alpha, ntk_base
from llmcli.qwen_tiktoken import QWEN_PATTERN, SPECIAL_TOKENS, cache_path, load_qwen_tiktoken
from llmcli.tokenizer import Tokenizer

S = 16  # seq_length of the tiny checkpoints
VOCAB = 512  # 304 BPE tokens + 208 specials
HIDDEN, HEADS, LAYERS, MLP = 64, 4, 3, 96
HEAD_DIM = HIDDEN // HEADS


# --- a tiny qwen.tiktoken ---------------------------------------------------------------------------------

CORPUS = ("the quick brown fox jumps over the lazy dog while the other dogs sleep in the sun; "
          "then the fox thinks about the weather and the theory of everything. ") * 3


def tiny_ranks(merges: int = VOCAB - len(SPECIAL_TOKENS) - 256) -> dict[bytes, int]:
    """256 single bytes, then `merges` tokens learned by naive BPE on CORPUS (deterministic)."""
    ranks = {bytes([b]): b for b in range(256)}
    words = [[bytes([c]) for c in w.encode()] for w in CORPUS.replace(" ", " \x00").split("\x00")]
    while len(ranks) < 256 + merges:
        pairs = Counter((a, b) for w in words for a, b in zip(w, w[1:], strict=False) if a + b not in ranks)
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks[a + b] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i:i + 2] = [a + b]
                i += 1
    return ranks


def write_tiktoken(path: Path, ranks: dict[bytes, int]) -> None:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))


def tiktoken_encoding(ranks: dict[bytes, int]):
    tiktoken = pytest.importorskip("tiktoken")
    specials = {t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding("qwen-test", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


# --- tiny checkpoints ---------------------------------------------------------------------------------------


def random_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Qwen2-named float32 weights, with sharp attention (large q/k) so LogN and NTK visibly matter."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, attn_implementation="eager")
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
            elif "q_proj" in name or "k_proj" in name:
                param.normal_(0, 0.25)
            elif "embed" in name or "lm_head" in name:
                param.normal_(0, 0.5)
    return model


def qwen1_tensors(qwen2) -> dict[str, torch.Tensor]:
    """The same weights under original-Qwen names: fused c_attn rows Q|K|V, w2 = gate, w1 = up."""
    sd = qwen2.state_dict()
    out = {
        "transformer.wte.weight": sd["model.embed_tokens.weight"],
        "transformer.ln_f.weight": sd["model.norm.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(LAYERS):
        p, a = f"model.layers.{i}.", f"transformer.h.{i}."
        out[a + "ln_1.weight"] = sd[p + "input_layernorm.weight"]
        out[a + "ln_2.weight"] = sd[p + "post_attention_layernorm.weight"]
        for kind in ("weight", "bias"):
            out[a + f"attn.c_attn.{kind}"] = torch.cat([sd[p + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
        out[a + "attn.c_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[a + "mlp.w2.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[a + "mlp.w1.weight"] = sd[p + "mlp.up_proj.weight"]
        out[a + "mlp.c_proj.weight"] = sd[p + "mlp.down_proj.weight"]
        out[a + "attn.rotary_emb.inv_freq"] = torch.ones(HEAD_DIM // 2)  # a stray buffer: must be skipped
    return {k: v.contiguous().clone() for k, v in out.items()}


def qwen1_config(style: str = "current", **overrides) -> dict:
    if style == "current":  # Qwen-7B-Chat style keys
        raw = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "hidden_size": HIDDEN,
               "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "intermediate_size": 2 * MLP,
               "kv_channels": HEAD_DIM, "max_position_embeddings": 256, "vocab_size": VOCAB}
    else:  # first-release GPT-2/Megatron style keys
        raw = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "n_embd": HIDDEN, "n_head": HEADS,
               "n_layer": LAYERS, "ffn_hidden_size": 2 * MLP, "kv_channels": HEAD_DIM, "n_positions": 256,
               "padded_vocab_size": VOCAB, "vocab_size": VOCAB, "params_dtype": "torch.float32",
               "bos_token_id": 0, "eos_token_id": VOCAB - 208}
    raw.update({"layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": S,
                "no_bias": True, "scale_attn_weights": True, "tie_word_embeddings": False,
                "use_dynamic_ntk": True, "use_logn_attn": True, "torch_dtype": "float32"})
    if style != "current":
        del raw["torch_dtype"]
    raw.update(overrides)
    return raw


def write_qwen1(directory: Path, tensors: dict, style: str = "current", **overrides) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(qwen1_config(style, **overrides)))
    write_tiktoken(directory / "qwen.tiktoken", tiny_ranks())
    return directory


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: a second thread only adds synchronisation (costly on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def qwen2():
    return random_weights()


@pytest.fixture(scope="module")
def tensors(qwen2):
    return qwen1_tensors(qwen2)


@pytest.fixture(scope="module")
def ckpt(tensors, tmp_path_factory):
    return write_qwen1(tmp_path_factory.mktemp("qwen1"), tensors)


def load(path, **kw):
    return load_model("tiny-qwen1", path, device="cpu", dtype="float32", **kw)


# --- the uncached reference ---------------------------------------------------------------------------------


def reference_logits(t: dict, ids: list[int], alpha: float = 1.0, logn: bool = True,
                     windows: list[int | None] | None = None, rotary: int = HEAD_DIM) -> torch.Tensor:
    """Original Qwen over the whole sequence at once, in float64, straight from the checkpoint tensors:
    RoPE over the first `rotary` dims with base 10000 * alpha^(r/(r-2)), queries at p+1 > S scaled by
    ln(p+1)/ln(S), causal (windowed) mask."""
    t = {k: v.double() for k, v in t.items()}

    def rms(x, w):
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    n, d, r = len(ids), HEAD_DIM, rotary
    base = 10000.0 * alpha ** (r / (r - 2))
    inv = 1.0 / base ** (torch.arange(0, r, 2, dtype=torch.float64) / r)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def rope(x):  # [H, n, d], rotate-half layout over the first r dims
        x, rest = x[..., :r], x[..., r:]
        return torch.cat([x * cos + torch.cat([-x[..., r // 2:], x[..., :r // 2]], -1) * sin, rest], -1)

    scale = torch.tensor([math.log(p + 1) / math.log(S) if logn and p + 1 > S else 1.0 for p in range(n)])
    x = t["transformer.wte.weight"][ids]
    i_pos, j_pos = torch.arange(n)[:, None], torch.arange(n)[None]
    for layer in range(LAYERS):
        a = f"transformer.h.{layer}."
        h = rms(x, t[a + "ln_1.weight"])
        qkv = h @ t[a + "attn.c_attn.weight"].T + t[a + "attn.c_attn.bias"]
        q, k, v = (m.view(n, HEADS, d).transpose(0, 1) for m in qkv.split(HIDDEN, -1))
        q, k = rope(q) * scale[:, None], rope(k)
        allowed = j_pos <= i_pos
        w = windows[layer] if windows else None
        if w:
            allowed &= j_pos > i_pos - w
        scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~allowed, float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, HIDDEN)
        x = x + out @ t[a + "attn.c_proj.weight"].T
        h = rms(x, t[a + "ln_2.weight"])
        x = x + (h @ t[a + "mlp.w1.weight"].T * torch.nn.functional.silu(h @ t[a + "mlp.w2.weight"].T)) \
            @ t[a + "mlp.c_proj.weight"].T
    return rms(x, t["transformer.ln_f.weight"]) @ t["lm_head.weight"].T


def reference_greedy(t, prompt: list[int], steps: int, logn=True, ntk=True, windows=None):
    """Recompute everything for every new token; alpha comes from the prompt length, as at prefill."""
    alpha = max(2 ** math.ceil(math.log2(len(prompt) / S) + 1) - 1, 1) if ntk else 1
    ids, last = list(prompt), []
    for _ in range(steps):
        logits = reference_logits(t, ids, alpha, logn, windows)[-1]
        last.append(logits)
        ids.append(int(logits.argmax()))
    return ids[len(prompt):], torch.stack(last)


def prompt_of(length: int, seed: int = 1) -> list[int]:
    return torch.randint(0, VOCAB - 208, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


# --- config -------------------------------------------------------------------------------------------------


def test_config_both_key_styles():
    for style in ("current", "gpt2"):
        cfg = config_from_dict(qwen1_config(style))
        assert (cfg.family, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.num_layers) == \
            ("qwen", HIDDEN, HEADS, HEADS, LAYERS)
        assert cfg.intermediate_size == MLP  # half of intermediate_size / ffn_hidden_size
        assert (cfg.head_dim, cfg.seq_length, cfg.vocab_size, cfg.rope_theta) == (HEAD_DIM, S, VOCAB, 10000.0)
        assert cfg.use_logn_attn and cfg.use_dynamic_ntk and cfg.attention_bias and not cfg.tie_word_embeddings
        assert cfg.bos_token_id is None and cfg.layer_windows == [None] * LAYERS
        assert cfg.torch_dtype == "float32"
    real = {"architectures": ["QWenLMHeadModel"], "bf16": False, "fp16": False, "fp32": False,
            "hidden_size": 4096, "intermediate_size": 22016, "kv_channels": 128, "layer_norm_epsilon": 1e-06,
            "max_position_embeddings": 8192, "model_type": "qwen", "no_bias": True, "num_attention_heads": 32,
            "num_hidden_layers": 32, "rotary_emb_base": 10000, "rotary_pct": 1.0, "scale_attn_weights": True,
            "seq_length": 8192, "tie_word_embeddings": False, "use_dynamic_ntk": True, "use_logn_attn": True,
            "vocab_size": 151936}
    cfg = config_from_dict(real)
    assert (cfg.intermediate_size, cfg.torch_dtype, cfg.eos_token_ids, cfg.rotary_dim) == (11008, "bfloat16",
                                                                                           [151643], None)
    assert config_from_dict({**real, "rotary_pct": 0.5}).rotary_dim == 64
    assert not config_from_dict({**real, "use_logn_attn": False}).use_logn_attn


@pytest.mark.parametrize("change, message", [
    ({"visual": {"heads": 16}}, "Qwen-VL"),
    ({"intermediate_size": 193}, "even"),
    ({"hidden_size": None}, "hidden_size"),
    ({"no_bias": False}, "no_bias"),
    ({"rotary_pct": 0.1}, "rotary"),
])
def test_config_errors(change, message):
    with pytest.raises(LlmcliError, match=message):
        config_from_dict({k: v for k, v in {**qwen1_config(), **change}.items() if v is not None})


# --- equivalence with Qwen2 within seq_length -------------------------------------------------------------


@pytest.mark.parametrize("style", ["current", "gpt2"])
def test_logits_match_qwen2_within_seq_length(qwen2, tensors, tmp_path, style):
    path = write_qwen1(tmp_path / style, tensors, style)
    loaded = load(path)
    assert loaded.config.family == "qwen" and loaded.dtype == torch.float32
    for n in (1, 5, S):
        ids = prompt_of(n, seed=n)
        cache = loaded.model.make_cache(1, n)
        with torch.inference_mode():
            ours = loaded.runner(torch.tensor([ids]), cache)
            theirs = qwen2(torch.tensor([ids])).logits
        assert (ours - theirs).abs().max().item() <= 1e-4
    # Token-by-token decoding from the cache up to seq_length agrees too.
    ids = prompt_of(S, seed=3)
    cache = loaded.model.make_cache(1, S)
    with torch.inference_mode():
        loaded.runner(torch.tensor([ids[:4]]), cache)
        steps = torch.cat([loaded.runner(torch.tensor([[i]]), cache) for i in ids[4:]], 1)
        theirs = qwen2(torch.tensor([ids])).logits[:, 4:]
    assert (steps - theirs).abs().max().item() <= 1e-4


def test_checkpoint_errors(tensors, tmp_path):
    broken = dict(tensors)
    del broken["transformer.h.1.mlp.w1.weight"]
    with pytest.raises(LlmcliError, match="up_proj.weight is missing"):
        load(write_qwen1(tmp_path / "missing", broken))
    broken = {**tensors, "transformer.h.0.attn.c_attn.bias": torch.zeros(3 * HIDDEN + 1)}
    with pytest.raises(LlmcliError, match="multiple of 3"):
        load(write_qwen1(tmp_path / "rows", broken))
    broken = {**tensors, "transformer.h.0.attn.c_attn.weight": torch.zeros(3 * HIDDEN, HIDDEN + 1)}
    with pytest.raises(LlmcliError, match="c_attn.weight.*shape"):
        load(write_qwen1(tmp_path / "shape", broken))


# --- beyond seq_length: NTK, LogN, cached vs uncached ------------------------------------------------------


def test_ntk_worked_values():
    assert ntk_alpha(3072, 2048) == 3  # L = 1.5 S
    assert ntk_base(10000, 3, 128) == pytest.approx(30527.7, abs=0.05)
    assert ntk_alpha(int(3.5 * 2048), 2048) == 7
    assert ntk_base(10000, 7, 128) == pytest.approx(72195.9, abs=0.05)
    assert [ntk_alpha(n, 2048) for n in (1, 1024, 1025, 2048, 2049, 4096, 4097)] == [1, 1, 1, 1, 3, 3, 7]


def test_logn_factor():
    got = logn_scale(0, 40, S).flatten().tolist()
    assert got == pytest.approx([math.log(p + 1) / math.log(S) if p + 1 > S else 1.0 for p in range(40)], rel=1e-12)
    assert logn_scale(30, 1, S).item() == pytest.approx(math.log(31) / math.log(S), rel=1e-12)


@pytest.mark.parametrize("prompt_len, steps, alpha", [
    (S // 2, S + 4, 1),  # short prompt, generation crosses seq_length: alpha 1, LogN switches on mid-way
    (S, 6, 1),  # exactly seq_length
    (S * 3 // 2, 6, 3),  # 1.5 S: alpha 3, LogN from the prefill on
    (S * 5 // 2, 4, 7),  # 2.5 S: alpha 7
])
def test_cached_generation_matches_uncached_reference(ckpt, tensors, prompt_len, steps, alpha):
    loaded = load(ckpt)
    prompt = prompt_of(prompt_len, seed=prompt_len)
    gen = Generation(loaded.model, loaded.tokenizer, prompt, steps)
    for _ in gen:
        pass
    expected, ref_logits = reference_greedy(tensors, prompt, steps)
    assert gen.result.token_ids == expected
    # The logits along the way agree as well (decoding from the cache vs recomputing everything).
    cache = loaded.model.make_cache(1, prompt_len + steps)
    with torch.inference_mode():
        rows = [loaded.runner(torch.tensor([prompt]), cache)[0, -1]]
        rows += [loaded.runner(torch.tensor([[tok]]), cache)[0, -1] for tok in expected[:-1]]
    assert cache.state["ntk_alpha"] == alpha
    assert (torch.stack(rows).double() - ref_logits).abs().max().item() <= 1e-4
    # The features matter at this length: switching either off changes the reference.
    if prompt_len + steps > S:
        _, no_logn = reference_greedy(tensors, prompt, steps, logn=False)
        assert (no_logn - ref_logits).abs().max().item() > 1e-2
    if alpha > 1:
        _, no_ntk = reference_greedy(tensors, prompt, steps, ntk=False)
        assert (no_ntk - ref_logits).abs().max().item() > 1e-2


def test_switches_and_attention_info(ckpt, tensors):
    loaded = load(ckpt)
    model, n = loaded.model, S * 3 // 2
    prompt = prompt_of(n, seed=7)
    assert model.context_limit == 32768
    cache = model.make_cache(1, n)
    with torch.inference_mode():
        loaded.runner(torch.tensor([prompt]), cache)
    info = model.attention_info(0, cache)
    assert info["ntk_alpha"] == 3 and info["rope_base"] == pytest.approx(10000 * 3 ** (16 / 14))
    assert info["logn_scale"] == pytest.approx((1.0, math.log(n) / math.log(S)))
    assert model.attention_info(0)["logn_scale"] == (1.0, 1.0)
    expected_inv = 1 / (10000 * 3 ** (16 / 14)) ** (torch.arange(0, 16, 2).double() / 16)
    assert torch.allclose(cache.state["inv_freq"].double(), expected_inv, rtol=1e-6)

    model.set_attention_options(use_logn_attn=False, use_dynamic_ntk=False)
    cache = model.make_cache(1, n)
    with torch.inference_mode():
        ours = loaded.runner(torch.tensor([prompt]), cache)[0].double()
    assert (ours - reference_logits(tensors, prompt, 1, logn=False)).abs().max().item() <= 1e-4
    info = model.attention_info(0, cache)
    assert info["logn_scale"] is None and info["ntk_alpha"] is None and info["rope_base"] == 10000.0
    assert model.context_limit == 256


def test_partial_rotary_and_bfloat16(tensors, tmp_path):
    prompt = prompt_of(S * 3 // 2, seed=5)  # alpha 3 and LogN both act
    loaded = load(write_qwen1(tmp_path / "half", tensors, rotary_pct=0.5))
    assert loaded.model.rope_dim == 8
    cache = loaded.model.make_cache(1, len(prompt))
    with torch.inference_mode():
        ours = loaded.runner(torch.tensor([prompt]), cache)[0].double()
    expected = reference_logits(tensors, prompt, alpha=3, rotary=8)
    assert (ours - expected).abs().max().item() <= 1e-4
    assert (expected - reference_logits(tensors, prompt, alpha=3)).abs().max().item() > 1e-2
    # bfloat16 (the released checkpoints' dtype) stays close to the float64 reference.
    loaded = load_model("tiny-qwen1", write_qwen1(tmp_path / "bf16", tensors), device="cpu", dtype="bfloat16")
    cache = loaded.model.make_cache(1, len(prompt))
    with torch.inference_mode():
        ours = loaded.runner(torch.tensor([prompt]), cache)[0].double()
    expected = reference_logits(tensors, prompt, alpha=3)
    assert (ours - expected).abs().max().item() <= 0.05 * expected.abs().max().item()


# --- layer-wise windows -------------------------------------------------------------------------------------


def test_window_mask_admits_exactly_the_window():
    for w in (1, 3, 5, 512):
        for start, length, total in ((0, 9, 9), (4, 5, 9), (8, 1, 9), (0, 1, 1), (20, 1, 21), (6, 7, 13)):
            span = Span(torch.arange(start, start + length), start)
            mask, causal = attention_mask(span, length, total, w, torch.device("cpu"))
            if mask is None:  # the fast paths: plain causal (prefill) or all keys (one query)
                mask = torch.ones(length, total, dtype=torch.bool)
                if causal:
                    mask = mask.tril(start)
            if length == 1:  # a compiled step (a static span: positions only) admits the same keys
                static, _ = attention_mask(Span(span.positions, None), 1, total, w, torch.device("cpu"))
                assert torch.equal(static, mask)
            for qi in range(length):
                i = start + qi
                assert mask[qi].tolist() == [i - w < j <= i for j in range(total)], (w, start, length, total)


def test_window_spec():
    spread = parse_window_spec("512:2048", 32)
    assert spread[0] == 512 and spread[-1] == 2048 and spread == sorted(spread) and len(spread) == 32
    assert spread[16] == round(512 + 1536 * 16 / 31)
    assert parse_window_spec("4:8", 3) == [4, 6, 8]
    assert parse_window_spec("7", 3) == [7, 7, 7]
    assert parse_window_spec("4, full ,9", 3) == [4, None, 9]
    assert parse_window_spec("full", 2) == [None, None]
    assert parse_window_spec("9:9", 1) == [9]
    for bad in ("0:5", "a:b", "1:2:3", "-4", "", "1,2", "1,x,3", "5:"):
        with pytest.raises(LlmcliError) as err:
            parse_window_spec(bad, 3)
        assert err.value.exit_code == 2


def test_windows_in_prefill_and_decode(ckpt, tensors):
    loaded = load(ckpt)
    windows = [3, 5, None]
    loaded.model.set_attention_options(windows=windows)
    assert [loaded.model.attention_info(i)["window"] for i in range(LAYERS)] == windows
    assert loaded.model.attention_info(0)["type"] == "sliding"
    prompt = prompt_of(10, seed=11)
    expected, ref_logits = reference_greedy(tensors, prompt, 10, windows=windows)
    cache = loaded.model.make_cache(1, 20)
    with torch.inference_mode():
        rows = [loaded.runner(torch.tensor([prompt]), cache)[0, -1]]
        rows += [loaded.runner(torch.tensor([[tok]]), cache)[0, -1] for tok in expected[:-1]]
    assert (torch.stack(rows).double() - ref_logits).abs().max().item() <= 1e-4
    _, full = reference_greedy(tensors, prompt, 10)
    assert (full - ref_logits).abs().max().item() > 1e-2  # the windows really cut something


# --- CLI ----------------------------------------------------------------------------------------------------


def cli_tokens(run_cli, *args) -> list[int]:
    code, out, err = run_cli("generate", *args, "--raw", "--json", "--device", "cpu", "--dtype", "float32")
    assert code == 0, err
    return json.loads(out)["token_ids"]


def test_cli_options(ckpt, tensors, run_cli):
    text = "the fox thinks about the weather while the dogs sleep in the sun"
    prompt = Tokenizer.from_dir(ckpt).encode(text)
    assert len(prompt) > S  # LogN and NTK both act
    for flags, kw in (((), {}),
                      (("--no-logn",), {"logn": False}),
                      (("--no-ntk", "--window", "4:8"), {"ntk": False, "windows": [4, 6, 8]}),
                      (("--window", "3,full,5", "--no-logn", "--no-ntk"),
                       {"logn": False, "ntk": False, "windows": [3, None, 5]})):
        expected, _ = reference_greedy(tensors, prompt, 6, **kw)
        assert cli_tokens(run_cli, str(ckpt), "-p", text, "-n", "6", *flags) == expected, flags


def test_cli_option_errors(ckpt, run_cli):
    code, out, err = run_cli("generate", str(ckpt), "-p", "hi", "--window", "0:5")
    assert code == 2 and err.startswith("error: --window") and err.count("\n") == 1
    code, _, err = run_cli("generate", "demo-qwen", "-p", "hi", "--no-logn")
    assert code == 2
    assert err.splitlines()[-1] == "error: --no-logn applies to original Qwen models only; demo-qwen is qwen2"
    code, out, err = run_cli("generate", "demo-qwen", "-p", "hi", "-n", "3", "--window", "2:5", "--json")
    assert code == 0, err  # windows work for Qwen2/3 as well


# --- tokenizer ----------------------------------------------------------------------------------------------


def test_tiny_vocabulary_matches_tiktoken(tmp_path):
    ranks = tiny_ranks()
    write_tiktoken(tmp_path / "qwen.tiktoken", ranks)
    tok, enc = Tokenizer.from_dir(tmp_path), tiktoken_encoding(ranks)
    assert tok.vocab_size == VOCAB
    for text in (CORPUS, "the theory<|im_end|>\n\n  the\tfox's dog  ", "Ünïcödé 你好 🙂", ""):
        assert tok.encode(text) == enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")
        assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


@pytest.mark.parametrize("content, message", [
    ("not-base64! 0\n", "line 1"),
    ("IQ== 0\nIg==\n", "line 2"),
    ("IQ== zero\n", "line 1"),
    ("IQ== 0\nIg== 2\n", "ranks"),
    ("IQ== 0\nIQ== 1\n", "repeats"),
    ("IQ== 0\nIg== 1\n", "single-byte"),
    ("\n\n", "no tokens"),
])
def test_malformed_tiktoken(tmp_path, content, message):
    (tmp_path / "qwen.tiktoken").write_text(content)
    with pytest.raises(LlmcliError, match=message) as err:
        Tokenizer.from_dir(tmp_path)
    assert "qwen.tiktoken" in str(err.value) and "\n" not in str(err.value)


def test_missing_tiktoken(tmp_path, ckpt, run_cli):
    with pytest.raises(LlmcliError, match="qwen.tiktoken not found"):
        load_qwen_tiktoken(tmp_path)
    broken = tmp_path / "model"
    shutil.copytree(ckpt, broken)
    (broken / "qwen.tiktoken").write_text("garbage\n")
    code, _, err = run_cli("generate", str(broken), "-p", "hi")
    assert code == 1 and err.startswith("error: ") and "qwen.tiktoken line 1" in err and err.count("\n") == 1


def _qwen_vocab() -> Path | None:
    spec = importlib.util.find_spec("dashscope")  # found without importing it (its dependencies are heavy)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"
    return path if path.is_file() else None


QWEN_VOCAB = _qwen_vocab()
needs_vocab = pytest.mark.skipif(QWEN_VOCAB is None, reason="dashscope (which ships qwen.tiktoken) is not installed")


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("qwen-vocab")
    shutil.copy(QWEN_VOCAB, directory / "qwen.tiktoken")
    return directory


@pytest.fixture(scope="module")
def real(real_dir, llmcli_home):
    with pytest.MonkeyPatch.context() as mp:  # module scope runs before the per-test isolated env
        mp.setenv("LLMCLI_HOME", str(llmcli_home))
        return Tokenizer.from_dir(real_dir)


@pytest.fixture(scope="module")
def real_tiktoken():
    ranks = {}
    for line in QWEN_VOCAB.read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return tiktoken_encoding(ranks)


PIECES = [
    # languages
    "Hello", " world", "The quick brown fox", "don't", "I'LL", "they've", "It's", "naïve café", "ÉCOLE",
    "e\u0301", "A\u030a", "\u212b", "ﬁ", "你好", "世界", "机器学习", "自然语言处理。", "中文，标点！", "こんにちは",
    "カタカナ", "ｶﾀｶﾅ", "안녕하세요", "مرحبا بالعالم", "Привет, мир", "ёлка", "नमस्ते दुनिया", "Γειά σου",
    "שלום", "สวัสดี", "Tiếng Việt", "ß", "Ⅻ", "①②", "x²", "½", "∑∫√∞", "™©®", "٣٤٥", "१२३",
    # code
    "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}", "SELECT * FROM t;",
    "<div class=\"a\">&amp;</div>", "fn main() { println!(\"hi\"); }", "x = {'k': [1, 2.5e-3, None]}",
    "#!/bin/bash\necho $HOME | grep -v '^#'", "0x1F", "3.14159", "1,000,000", "2024-01-01T00:00:00Z",
    "https://example.com/a?b=c", "user@example.com", "C:\\Windows\\System32", "$$\\frac{a}{b}$$",
    # emoji and symbols
    "🙂", "🚀✨", "👨‍👩‍👧‍👦", "🇨🇳", "❤️", "👍🏽", "\u200b", "\u200d", "\ufeff", "\ufffd", "\x00", "\x7f",
    # whitespace
    " ", "  ", "    ", "\t", "\t\t", "\n", "\n\n", "\r\n", " \n ", "\n\n\n\t ", "\u3000", "\u00a0", "\u2028",
    "   \n", "\n   ", " \t \n",
    # specials
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_0|>", "<|extra_204|>", "<|im_start", "|>",
]


def mixed_strings(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = list(PIECES)
    while len(out) < count:
        parts = rng.choices(PIECES, k=rng.randint(1, 8))
        glue = rng.choice(["", " ", "\n", "  ", "\t", "", ""])
        out.append(glue.join(parts))
    return out


def vocabulary_strings(encoding, count: int, seed: int = 0) -> list[str]:
    """Whole vocabulary tokens (the valid UTF-8 ones), alone and glued in twos and threes: they reach
    merges that ordinary text rarely needs."""
    rng = random.Random(seed)
    tokens = []
    for rank in rng.sample(range(encoding.n_vocab - 208), 4 * count):
        try:
            tokens.append(encoding.decode_single_token_bytes(rank).decode("utf-8"))
        except UnicodeDecodeError:
            continue
    return [tokens[i] if i % 3 == 0 else "".join(rng.sample(tokens, 1 + i % 3)) for i in range(count)]


@needs_vocab
def test_real_vocabulary_matches_tiktoken(real, real_tiktoken):
    strings = mixed_strings(6000) + vocabulary_strings(real_tiktoken, 3000)
    assert len(strings) >= 9000
    assert real.vocab_size == 151643 + 208
    mismatches = []
    for text in strings:
        ids = real.encode(text)
        expected = real_tiktoken.encode(unicodedata.normalize("NFC", text), allowed_special="all")
        if ids != expected:
            mismatches.append(text)
        elif real.decode(ids) != unicodedata.normalize("NFC", text):
            mismatches.append(("decode", text))
    assert not mismatches, mismatches[:5]


@needs_vocab
def test_real_vocabulary_specials_and_cache(real, real_dir):
    assert [real.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_204|>")] == \
        [151643, 151644, 151645, 151850]
    assert real.eos_token_id == 151643 and real.bos_token_id is None
    assert real.decode([151643, 151645], skip_special_tokens=True) == ""
    import hashlib

    cached = cache_path(hashlib.sha256(QWEN_VOCAB.read_bytes()).hexdigest())
    assert cached.is_file()
    assert Tokenizer.from_dir(real_dir).encode("Hello 世界") == real.encode("Hello 世界")
    cached.write_text("{damaged")  # a broken cache entry is rebuilt, not fatal
    assert Tokenizer.from_dir(real_dir).encode("Hello 世界") == real.encode("Hello 世界")
    assert json.loads(cached.read_text())["model"]["type"] == "BPE"


@needs_vocab
def test_builtin_chatml(real, real_tiktoken):
    """Qwen's own chat code: ChatML turns, default system prompt, no BOS; ids as its make_context builds them."""
    text = real.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    enc = real_tiktoken.encode
    im_start, im_end, nl = [151644], [151645], enc("\n")
    expected = (im_start + enc("system") + nl + enc("You are a helpful assistant.") + im_end + nl
                + im_start + enc("user") + nl + enc("What is 2+2?") + im_end + nl + im_start + enc("assistant") + nl)
    assert real.encode(text) == expected
    custom = real.apply_chat_template([{"role": "system", "content": "Be terse."},
                                       {"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert custom == "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def test_stop_ids(ckpt):
    loaded = load(ckpt)
    stops = stop_token_ids(loaded)
    tok = loaded.tokenizer  # config.json's eos, then where this vocabulary's chat turns end (not a family's ids)
    assert stops == [151643, tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>"),
                     tok.token_to_id("<|im_start|>")]
    assert tok.chat_template is not None and not tok.adds_bos
