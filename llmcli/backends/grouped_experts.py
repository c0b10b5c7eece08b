"""A MoE layer's routed experts run as grouped matrix products: for many rows (prompts, batched decode), every
(token, slot) pair is sorted by its expert and each projection of all experts is one `torch._grouped_mm` call
over the stacked weights [E, out, in], instead of a loop that runs the experts one after another.

The loop (`Experts.forward`) reads the per-expert token counts back to the host (`.tolist()`) and launches
two products per expert that got tokens: on a GPU that is a synchronisation and up to 2E small launches per
layer, and it cannot be captured in a CUDA graph. Here the sorted rows always number tokens x k, the group
offsets stay a tensor on the device, and nothing waits for the host. One-row compiled steps keep the stacks'
gathered sum (`StackedExperts`).

`torch._grouped_mm` takes bfloat16 (on CPU also float32, eagerly) with rows whose byte strides are multiples
of 16; other cases run the loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmcli.backends.experts import PROJECTIONS, StackedExperts, in_kernel_blocks
from llmcli.backends.linear import one_row
from llmcli.models.hooks import RouterChoice
from llmcli.models.layers import Experts

ALIGN_BYTES = 16  # torch._grouped_mm: each row of both operands starts on a 16-byte boundary


def grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


def grouped_dtype_fits(dtype: torch.dtype, device: torch.device) -> bool:
    """bfloat16 anywhere; float32 only in eager CPU runs (the compiled form and CUDA take bfloat16 only)."""
    return dtype == torch.bfloat16 or (dtype == torch.float32 and device.type == "cpu"
                                       and not torch.compiler.is_compiling())


def can_group(experts: Experts) -> bool:
    """Plain (unquantised, not in a CPU kernel's blocks) fused projections whose shapes the grouped product
    takes."""
    if not grouped_mm_available() or in_kernel_blocks(experts):
        return False
    for name in PROJECTIONS:
        linear = getattr(experts[0], name, None)
        weight = getattr(linear, "weight", None)
        if weight is None or weight.dim() != 2 or not weight.is_floating_point() or hasattr(linear, "scales"):
            return False
        if getattr(linear, "bias", None) is not None:
            return False
        if any(size * weight.element_size() % ALIGN_BYTES for size in weight.shape):
            return False
    return True


def expert_offsets(ids: torch.Tensor, count: int) -> torch.Tensor:
    """Flat expert ids [P] -> int32 [count]: where each expert's rows end once the rows are sorted by expert
    (torch._grouped_mm's `offs`), computed on the ids' device."""
    return torch.bincount(ids, minlength=count).cumsum(0).to(torch.int32)


def grouped_swiglu(x: torch.Tensor, choice: RouterChoice, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """x [N, hidden] through each row's k experts, with the experts' stacked weights gate_up [E, 2I, hidden]
    and down [E, hidden, I]: two grouped products in all. Rounds like `Experts.forward`: the model's dtype
    between products, float32 for the weighted sum."""
    k = choice.experts.shape[1]
    ids = choice.experts.reshape(-1)
    order = ids.argsort(stable=True)  # (token, slot) pairs grouped by expert
    token = order // k
    offsets = expert_offsets(ids, gate_up.shape[0])
    gate, up = torch._grouped_mm(x[token], gate_up.transpose(-2, -1), offs=offsets).chunk(2, dim=-1)
    outputs = torch._grouped_mm((F.silu(gate) * up).contiguous(), down.transpose(-2, -1), offs=offsets)
    weighted = outputs.float() * choice.weights.reshape(-1)[order, None]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return out.index_add_(0, token, weighted).to(x.dtype)


class GroupedExperts(StackedExperts):
    """`Experts` whose weights also live in one stack per projection (see StackedExperts), run as grouped
    products for many rows."""

    @property
    def label(self) -> str:
        return "stacked, grouped products (torch._grouped_mm)"

    def forward(self, x: torch.Tensor, choice: RouterChoice) -> torch.Tensor:
        if one_row(x):
            return self._stacked(x, choice)
        gate_up, down = (self._buffers[f"{name}_weight_stack"] for name in PROJECTIONS)
        if x.dtype != gate_up.dtype or not grouped_dtype_fits(x.dtype, x.device):
            return Experts.forward(self, x, choice)
        return grouped_swiglu(x, choice, gate_up, down)
