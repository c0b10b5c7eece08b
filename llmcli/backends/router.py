"""A Qwen MoE router whose bfloat16 weight lies in the bfloat16 kernel's panels.

torch's bfloat16 `F.linear` of one row by a 128 x 2048 router took 83-124 us a call inside a decode step of the
Qwen3-30B-A3B shape, the kernel 13-18 (2-core Zen 4): about 90 us a layer, some 4.5 ms of every step in the real
model's 48 layers. The logits are the kernel's float32 sums rounded to bfloat16, as torch's are; the sums' order
differs, so a logit can land one bfloat16 step from torch's.
"""

from __future__ import annotations

import torch
from torch import nn

from llmcli.backends import bf16_kernel
from llmcli.models.qwen_moe import TopKRouter


class PanelRouter(TopKRouter):
    """TopKRouter with `weight` [experts, hidden] moved into panels (`panels`, outputs padded to whole panels)."""

    def __init__(self, router: TopKRouter):
        nn.Module.__init__(self)  # not TopKRouter's: it would allocate a weight from a config
        self.top_k, self.normalise = router.top_k, router.normalise
        self.experts = router.weight.shape[0]
        self.register_buffer("panels", bf16_kernel.to_blocks(router.weight.detach()))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.llmcli.bf16_linear.default(x.reshape(-1, x.shape[-1]).contiguous(),
                                                   self.panels.unsqueeze(0), None, None)
        return out[:, :self.experts].reshape(*x.shape[:-1], self.experts)


def op_weight(router: TopKRouter) -> tuple[torch.Tensor, int]:
    """What the decode layer op takes for a router: its panels or its weight; and the number of experts."""
    if type(router) is PanelRouter:
        return router.panels, router.experts
    return router.weight, router.weight.shape[0]


def suits(router: nn.Module) -> bool:
    """A plain TopKRouter with a CPU bfloat16 weight the kernel can hold."""
    return type(router) is TopKRouter and bf16_kernel.suits(router.weight)


def swap_routers(module: nn.Module) -> int:
    """Every TopKRouter under `module` that `suits` becomes a PanelRouter. Returns how many."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if suits(child):
                setattr(parent, name, PanelRouter(child))
                count += 1
    return count
