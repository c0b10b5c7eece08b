"""The cache bytes a decode step reads (`llmcli.cache_reads`, bench's "BW use"), against what each family's real
cache holds after a prompt: counted here from the cache's own tensors, not from the facts the module reads."""

from __future__ import annotations

import pytest
import torch

from llmcli.cache_reads import mean_step_cache_bytes, step_cache_bytes
from llmcli.loader import load_model
from llmcli.models.cache import KVLayerCache, LatentLayerCache
from llmcli.models.dsa import IndexedLatentCache
from llmcli.models.hybrid_cache import RecurrentLayerCache
from llmcli.models.v4_cache import V4LayerCache

transformers = pytest.importorskip("transformers")


def row_bytes(t: torch.Tensor) -> int:
    """Bytes of one token's row of a [tokens, batch, ...] or [batch, tokens, ...] cache tensor."""
    return t[0, 0].numel() * t.element_size()


def v4_layer_reads(model, layer: V4LayerCache) -> int:
    """The window's keys (those kept and the new one) and the compressed entries emitted so far."""
    key = layer.keys[0, 0].numel() * layer.keys.element_size()
    read = (layer.keys.shape[1] + 1) * key
    entries = {name: state.entries for name, state in layer.states.items() if state.entries is not None}
    count = entries["kv"].shape[1] if "kv" in entries else 0
    if "index" in entries:  # CSA: every entry's indexer key, and the top-k entries
        read += entries["index"][0].numel() * entries["index"].element_size()
        read += min(model.settings.index_topk, count) * key
    elif "kv" in entries:
        read += count * key
    return read


def reads_after_prompt(model, cache, tokens: int) -> int:
    """What the step after a `tokens`-token prompt reads from `cache` (it attends to tokens + 1 keys)."""
    context, total = tokens + 1, 0
    for index, layer in enumerate(cache.layers):
        if isinstance(layer, RecurrentLayerCache):
            total += layer.bytes_per_sequence()
        elif isinstance(layer, IndexedLatentCache):
            attn = model.model.layers[index].self_attn
            selected = min(context, attn.indexer.topk) if attn.mode == "sparse" else context
            total += context * row_bytes(layer.index_keys) + selected * row_bytes(layer.kv)
        elif isinstance(layer, LatentLayerCache):
            total += context * row_bytes(layer.kv)
        elif isinstance(layer, KVLayerCache):
            window = getattr(model.model.layers[index].self_attn, "window", None)  # gated attention has none
            total += min(context, window or context) * (row_bytes(layer.k) + row_bytes(layer.v))
        elif isinstance(layer, V4LayerCache):
            total += v4_layer_reads(model, layer)
        else:
            raise AssertionError(f"no count for {type(layer).__name__}")
    return total


def prefilled(model, tokens: int):
    cache = model.make_cache(1, tokens + 8)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    with torch.inference_mode():
        model(ids, cache.span(tokens).positions, cache)
    return cache


def assert_reads_match(model, lengths) -> None:
    for tokens in lengths:
        cache = prefilled(model, tokens)
        assert step_cache_bytes(model, tokens + 1) == pytest.approx(reads_after_prompt(model, cache, tokens)), tokens


def loaded(path):
    return load_model("m", path, device="cpu", dtype="float32").model


def test_qwen_full_and_sliding_layers(tmp_path):
    from tests.test_qwen_parity import CASES, build_reference

    kind, overrides = CASES["qwen2-sliding"]
    build_reference(kind, overrides, tmp_path)
    model = loaded(tmp_path)
    windows = [layer.self_attn.window for layer in model.model.layers]
    assert None in windows and 8 in windows  # both kinds of layer
    assert_reads_match(model, [3, 7, 20])
    # Past the window only the full layers' reads grow: one token's keys and values each, per full layer.
    per_token = sum(layer.bytes_per_token() for layer, w in zip(model.make_cache(1, 1).layers, windows, strict=True)
                    if w is None)
    assert step_cache_bytes(model, 41) - step_cache_bytes(model, 40) == per_token


def test_deepseek_latent_rows(tmp_path):
    from tests.conftest import save_hf_model
    from tests.test_trace import deepseek_v3_reference

    save_hf_model(deepseek_v3_reference(), tmp_path)
    model = loaded(tmp_path)
    assert_reads_match(model, [1, 9])


@pytest.mark.parametrize("mode", ["sparse", "masked"])
def test_deepseek_v32_reads_every_index_key_and_the_selected_rows(tmp_path, mode):
    from tests.test_deepseek_v32 import TOPK, build_reference

    build_reference(tmp_path)
    model = loaded(tmp_path)
    for layer in model.model.layers:
        layer.self_attn.mode = mode
    assert_reads_match(model, [TOPK - 3, TOPK + 10])
    grows = step_cache_bytes(model, 4 * TOPK + 1) - step_cache_bytes(model, 4 * TOPK)
    index_key = sum(row_bytes(layer.index_keys) for layer in model.make_cache(1, 1).layers)
    assert grows == (index_key if mode == "sparse" else model.make_cache(1, 1).bytes_per_token())


def test_hybrid_reads_its_states_whatever_the_context(tmp_path):
    from tests.test_qwen_hybrid import build_reference

    build_reference("qwen3_5", tmp_path)
    model = loaded(tmp_path)
    assert_reads_match(model, [2, 30])
    states = sum(layer.bytes_per_sequence() for layer in model.make_cache(1, 1).layers
                 if isinstance(layer, RecurrentLayerCache))
    assert states > 0
    assert step_cache_bytes(model, 1) == pytest.approx(states + model.make_cache(1, 1).bytes_per_token())


def test_deepseek_v4_windows_and_compressed_entries(tmp_path):
    from tests.test_deepseek_v4 import CSA_RATE, HCA_RATE, TOPK, WINDOW, build_reference

    build_reference(tmp_path)
    model = loaded(tmp_path)
    # Steps that complete no compressor window (the cache after the prompt holds what the step reads); the
    # longest past the window, past top-k CSA entries and with several HCA entries.
    lengths = [2, 9, 4 * HCA_RATE + 1]
    assert all((n + 1) % CSA_RATE and (n + 1) % HCA_RATE for n in lengths)
    assert lengths[-1] > WINDOW and lengths[-1] // CSA_RATE > TOPK
    assert_reads_match(model, lengths)


def test_the_mean_over_a_run_is_over_its_steps_contexts(tmp_path):
    from tests.test_qwen_parity import CASES, build_reference

    kind, overrides = CASES["qwen2-sliding"]
    build_reference(kind, overrides, tmp_path)
    model = loaded(tmp_path)
    exact = [step_cache_bytes(model, 16 + i) for i in range(1, 31)]  # 30 steps after a 16-token prompt
    assert mean_step_cache_bytes(model, 16, 30) == pytest.approx(sum(exact) / 30)
    assert mean_step_cache_bytes(model, 16, 0) == 0
    long = mean_step_cache_bytes(model, 100, 10_000)  # sampled: the reads are linear in the context here
    assert long == pytest.approx((step_cache_bytes(model, 101) + step_cache_bytes(model, 10_100)) / 2, rel=1e-3)
