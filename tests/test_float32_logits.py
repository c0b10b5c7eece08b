"""A bfloat16 model's head in a CPU kernel returns float32 logits (llmcli/backends/head.py): the kernel's float32
sums, not bfloat16's steps, in which near-equal candidates tie."""

from __future__ import annotations

import pytest
import torch

from llmcli.backends import bf16_kernel, int8_kernel
from llmcli.backends.int8 import Int8Linear
from llmcli.backends.linear import BlockedLinear
from llmcli.demo import ensure_demo
from llmcli.loader import load_model


def head_input_and_logits(runner, steps):
    """Run `steps` (a prompt with last_only, then decode steps); returns (rows into the head, logits) per step."""
    seen = []
    hook = runner.model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    results = []
    try:
        with torch.inference_mode():
            cache = runner.make_cache(1, 32)
            for i, step in enumerate(steps):
                logits = runner(step, cache, last_only=i == 0)
                results.append((seen[-1], logits))
    finally:
        hook.remove()
    return results


STEPS = [torch.arange(3, 15)[None], torch.tensor([[7]]), torch.tensor([[9]])]


@pytest.mark.skipif(not bf16_kernel.available()[0], reason="llmcli's bfloat16 kernel does not run on this CPU")
def test_a_bfloat16_head_in_panels_gives_float32_logits():
    runner = load_model("demo-qwen", ensure_demo("demo-qwen"), device="cpu", dtype="bfloat16").runner
    head = runner.model.lm_head
    assert isinstance(head, BlockedLinear)
    weight = bf16_kernel.from_blocks(head.weight, head.out_features).double()
    for rows, logits in head_input_and_logits(runner, STEPS):
        assert rows.dtype == torch.float32 and logits.dtype == torch.float32
        assert torch.equal(rows, rows.bfloat16().float())  # the norm's bfloat16 values, widened
        exact = rows.double() @ weight.T
        assert (logits.double() - exact).abs().max() <= 1e-5 * exact.abs().max()


@pytest.mark.skipif(not int8_kernel.available()[0], reason="llmcli's int8 kernel does not build here")
@pytest.mark.parametrize("quantize", ["int8", "int4"])  # an int4 run's head: 6 bits with the integer kernels, else int8
def test_a_quantised_head_in_a_kernel_gives_float32_logits(quantize):
    from llmcli.backends.int6 import Int6Linear

    runner = load_model("demo-qwen", ensure_demo("demo-qwen"), device="cpu", dtype="bfloat16",
                        quantize=quantize).runner
    head = runner.model.lm_head
    assert isinstance(head, Int6Linear) or (isinstance(head, Int8Linear) and (head.blocked or head.integer))
    for rows, logits in head_input_and_logits(runner, STEPS):
        assert rows.dtype == torch.float32 and logits.dtype == torch.float32
        # the same sums as from the bfloat16 rows, before their rounding
        assert torch.equal(logits.bfloat16(), head.forward(rows.bfloat16()))  # forward: without the hook


@pytest.mark.skipif(not bf16_kernel.available()[0], reason="llmcli's bfloat16 kernel does not run on this CPU")
def test_logits_for_every_position_of_a_long_prompt_stay_bfloat16():
    """Widening is for a few rows: a whole prompt's logits would double their memory in float32."""
    from llmcli.backends.head import FLOAT32_ROWS

    runner = load_model("demo-qwen", ensure_demo("demo-qwen"), device="cpu", dtype="bfloat16").runner
    with torch.inference_mode():
        few = runner(torch.arange(3, 3 + FLOAT32_ROWS)[None], runner.make_cache(1, 64))
        many = runner(torch.arange(3, 4 + FLOAT32_ROWS)[None], runner.make_cache(1, 64))
    assert few.dtype == torch.float32 and many.dtype == torch.bfloat16


def test_torch_products_keep_their_logits_dtype(monkeypatch):
    """Without a kernel the head is torch's bfloat16 product, whose outputs are rounded: nothing to widen."""
    monkeypatch.setenv("LLMCLI_BF16_KERNEL", "0")
    runner = load_model("demo-qwen", ensure_demo("demo-qwen"), device="cpu", dtype="bfloat16").runner
    assert not runner.model.lm_head._forward_pre_hooks
    for rows, logits in head_input_and_logits(runner, STEPS):
        assert rows.dtype == logits.dtype == torch.bfloat16
