"""Float32 logits from a bfloat16 model's head, where a CPU kernel computes it.

The kernels sum each logit in float32 and would round it to bfloat16 on the way out: 8 bits of mantissa, so
logits near 25 come in steps of 0.125 and near-equal candidates tie. (On "What is the capital of France?" the
bundled SmolLM2's two best first tokens are 0.02 apart in float32 and tied in bfloat16; greedy then took
whichever token id is lower.) Given float32 rows, the kernels return their float32 sums instead, at the cost
of writing 4 bytes a logit rather than 2. The rows' values are the same: they come from the bfloat16 norm.
Only a few rows are widened (decode steps, a prompt's last position, small batches): logits for every position
of a long prompt (a trace, a perplexity run) stay bfloat16, where float32 would double their memory (4,096
positions of a 152K vocabulary: 2.5 GB instead of 1.2).
"""

from __future__ import annotations

import torch
from torch import nn

from llmcli.backends.int4 import Int4Linear
from llmcli.backends.int6 import Int6Linear
from llmcli.backends.int8 import KERNEL_ROWS, Int8Linear
from llmcli.backends.linear import BlockedLinear

FLOAT32_ROWS = KERNEL_ROWS  # the most rows widened: an int8 head's kernel takes up to this many


def returns_float32(head: nn.Module) -> bool:
    """Can this head give float32 logits from the same sums? The bfloat16 kernel's panels, an int8 head in a
    kernel's blocks, an int4 run's 6-bit head, and a Q8_0 or Q6_K head as stored (the integer kernel's blocks)."""
    if isinstance(head, (BlockedLinear, Int6Linear)) or (isinstance(head, Int4Linear) and head.integer):
        return True
    return isinstance(head, Int8Linear) and (head.blocked or head.integer)


def _rows_as_float32(head: nn.Module, args: tuple) -> tuple | None:
    x = args[0]
    if x.dtype != torch.bfloat16 or x.numel() // x.shape[-1] > FLOAT32_ROWS:
        return None
    return (x.float(), *args[1:])


def float32_logits(model: nn.Module) -> bool:
    """Make the model's head (`lm_head`) return float32 logits for up to FLOAT32_ROWS rows where it can (see
    `returns_float32`). Returns whether it does."""
    head = getattr(model, "lm_head", None)
    if head is None or not returns_float32(head):
        return False
    head.register_forward_pre_hook(_rows_as_float32)
    return True
