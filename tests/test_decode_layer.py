"""A decoder layer on the integer kernels as one op (backends/decode_ops.FusedQwenLayer and FusedDeepseekLayer,
kernels/decode_layer.cpp): bit for bit the op-by-op path's logits, the layers it takes and leaves, and the calls
that fall back to the modules."""

from __future__ import annotations

import pytest
import torch

from llmcli.backends import bf16_kernel, decode_ops, int_dot
from llmcli.backends.decode_ops import FusedDeepseekLayer, FusedQwenLayer
from llmcli.backends.router import PanelRouter
from llmcli.loader import load_model
from llmcli.models.deepseek import DecoderLayer as DeepseekLayer
from llmcli.models.qwen import DecoderLayer
from tests.test_decode_ops import CASES, case, decode  # noqa: F401  (case: the fixture)

pytestmark = pytest.mark.skipif(not decode_ops.available() or not int_dot.runs_fast(),
                                reason="the integer kernels do not run fast here (they need AVX2)")


def layer_by_layer(runner) -> None:
    """The same model with its layers back on the op-by-op path."""
    for module in runner.model.modules():
        if type(module) is FusedQwenLayer:
            module.__class__ = DecoderLayer
        elif type(module) is FusedDeepseekLayer:
            module.__class__ = DeepseekLayer


def loaded_twice(name: str, path, quantize: str | None):
    """The model with its layers as one op each (where they are taken), and again with them op by op."""
    fused = load_model(name, path, device="cpu", dtype="bfloat16", quantize=quantize).runner
    plain = load_model(name, path, device="cpu", dtype="bfloat16", quantize=quantize).runner
    layer_by_layer(plain)
    return fused, plain


def assert_same_decoding(fused, plain) -> None:
    prompt = list(range(3, 23))  # longer than qwen2-sliding's window
    tokens, logits = decode(fused, prompt, 8)
    plain_tokens, plain_logits = decode(plain, prompt, 8)
    assert tokens == plain_tokens and torch.equal(logits, plain_logits)


def needs_bf16_kernel(quantize: str | None) -> None:
    if quantize is None and not bf16_kernel.available()[0]:
        pytest.skip("llmcli's bfloat16 kernel does not run here")


@pytest.mark.parametrize("quantize", [None, "int8", "int5", "int4"])
def test_one_op_per_layer_gives_the_op_by_op_logits_bit_for_bit(case, quantize):  # noqa: F811
    needs_bf16_kernel(quantize)
    fused, plain = loaded_twice(*case[:2], quantize)
    layers = [m for m in fused.model.modules() if isinstance(m, DecoderLayer)]
    assert layers and all(type(m) is FusedQwenLayer for m in layers)  # qwen3: with its q/k norms
    assert_same_decoding(fused, plain)


class Recorder:
    def __init__(self):
        self.seen = []

    def record(self, layer, name, value):
        self.seen.append(name)


def test_float_weights_and_recorders_keep_the_modules(case, monkeypatch):  # noqa: F811
    """A float32 model (no kernel takes its products) is not taken; a step with a recorder, or with a forward hook
    on a layer's attention (tensor parallelism's all-reduce), runs the modules, with the one-op step's logits."""
    name, path, _ = case
    float32 = load_model(name, path, device="cpu", dtype="float32").runner
    assert not any(type(m) is FusedQwenLayer for m in float32.model.modules())
    runner = load_model(name, path, device="cpu", dtype="bfloat16", quantize="int8").runner
    fallbacks = []
    modules_forward = DecoderLayer.forward

    def counted(self, *args, **kwargs):
        fallbacks.append(self.index)
        return modules_forward(self, *args, **kwargs)

    monkeypatch.setattr(DecoderLayer, "forward", counted)
    cache, recorder = runner.make_cache(1, 16), Recorder()
    with torch.inference_mode():
        runner(torch.tensor([[3, 4, 5]]), cache)  # a prompt: the modules
        prompt_calls = len(fallbacks)
        one_op = runner(torch.tensor([[6]]), cache)
        assert len(fallbacks) == prompt_calls  # the step ran one op per layer
        cache.crop(cache.length - 1)
        recorded = runner(torch.tensor([[6]]), cache, recorder=recorder)
    assert len(fallbacks) == 2 * prompt_calls and recorder.seen
    assert torch.equal(one_op, recorded)
    hooked = []
    runner.model.model.layers[0].self_attn.register_forward_hook(lambda module, args, out: hooked.append(1))
    with torch.inference_mode():
        cache.crop(cache.length - 1)
        assert torch.equal(runner(torch.tensor([[6]]), cache), one_op)
    assert hooked == [1] and len(fallbacks) == 2 * prompt_calls + 1  # that layer ran its modules


def reference(module: str, name: str, widths: dict, tmp_path_factory):
    """One of a test module's transformers-built cases, with `widths` (a field's value, where the case sets it)
    that the integer kernels take, saved: (name, path)."""
    import importlib

    cases = importlib.import_module(module)
    kind, overrides = cases.CASES[name]
    overrides = {**overrides, **{k: v for k, v in widths.items() if overrides.get(k)}}
    path = tmp_path_factory.mktemp(name)
    cases.build_reference(kind, overrides, path)
    return name, path


@pytest.fixture(scope="module", params=["v3", "v2-group", "v2-greedy"])
def deepseek_case(request, tmp_path_factory):
    """test_deepseek's cases, q_lora's rank a multiple of 32 (theirs is 24)."""
    return reference("tests.test_deepseek", request.param, {"q_lora_rank": 32}, tmp_path_factory)


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_deepseek_layers_as_one_op_give_the_op_by_op_logits_bit_for_bit(deepseek_case, quantize):
    """V3 (sigmoid, noaux_tc routing) and V2 with q_lora (softmax, group-limited): a dense first layer, then MoE
    layers with shared experts, every one as the op, in bfloat16 panels or on the integer kernels; V2 without q_lora
    keeps its modules."""
    needs_bf16_kernel(quantize)
    fused, plain = loaded_twice(*deepseek_case, quantize)
    layers = [m for m in fused.model.modules() if isinstance(m, DeepseekLayer)]
    if deepseek_case[0] == "v2-greedy":
        assert not any(type(m) is FusedDeepseekLayer for m in layers)
        return
    assert layers and all(type(m) is FusedDeepseekLayer for m in layers)
    assert any(m.is_moe for m in layers) and not all(m.is_moe for m in layers)
    assert_same_decoding(fused, plain)


@pytest.fixture(scope="module", params=["qwen2_moe", "qwen3_moe"])
def qwen_moe_case(request, tmp_path_factory):
    """test_qwen_moe's cases (Qwen1.5-MoE style: shared expert and its gate, bias, a dense layer; Qwen3-MoE: q/k
    norms, renormalised top-k, dense layers between), the shared expert 64 wide (theirs is 80)."""
    return reference("tests.test_qwen_moe", request.param, {"shared_expert_intermediate_size": 64}, tmp_path_factory)


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_qwen_moe_layers_as_one_op_give_the_op_by_op_logits_bit_for_bit(qwen_moe_case, quantize):
    needs_bf16_kernel(quantize)
    fused, plain = loaded_twice(*qwen_moe_case, quantize)
    layers = [m for m in fused.model.modules() if isinstance(m, DecoderLayer)]
    assert layers and all(type(m) is FusedQwenLayer for m in layers)
    assert any(m.is_moe for m in layers) and not all(m.is_moe for m in layers)
    if bf16_kernel.available()[0]:  # the op's router product is then the panels' too
        assert all(type(m.mlp.gate) is PanelRouter for m in layers if m.is_moe)
    assert_same_decoding(fused, plain)
