"""A MoE layer's routed experts with their weights stacked per projection, for decode steps.

A decode step runs each token through its k chosen experts: 2k small products, each a separate call.
Stacked ([E, ...] per projection), the step reads its k experts with one call per projection: llmcli's
CPU kernels take the stack and pick each row's expert themselves (bf16 panels or int8 blocks), and a
compiled one-row step gathers the chosen rows into one multiply-and-sum. The experts keep working as
before on views into the stacks (prompts: many rows per expert), so memory does not grow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.backends import bf16_kernel, int8_kernel, int_dot
from llmcli.backends.heap import EXPERTS_PER_TRIM, release_freed_memory
from llmcli.backends.int4 import Int4Linear
from llmcli.backends.int8 import Int8Linear
from llmcli.backends.linear import FEW_ROWS, BlockedLinear, one_row, one_row_linear
from llmcli.models.hooks import RouterChoice
from llmcli.models.layers import Experts

PROJECTIONS = ("gate_up_proj", "down_proj")  # the experts' projections after fusing gate and up
# Prompts up to this many tokens go through low-bit stacks (int4, int5, Q8_0, Q6_K) in one kernel call per
# projection, which takes each expert's rows together, instead of a call per expert (Qwen3-30B-A3B shape, 128
# experts: 256 calls a layer; a 128-token prompt of its Q5_K_M file 1.13x faster, DeepSeek-V3 shape's Q4_K_M 1.09x,
# 2-core Zen 4).
STACKED_PROMPT_ROWS = 512
STACKED = ("weight", "scales", "packed", "scales_and_mins")  # tensors of a projection that go into stacks


def in_kernel_blocks(experts: Experts) -> bool:
    """Are the experts' weights in a CPU kernel's blocks (bf16 panels, int8 or int4 blocks), so that one
    kernel call can run each row through its own expert of a stack?"""
    first = getattr(experts[0], PROJECTIONS[0], None)
    return (isinstance(first, BlockedLinear) or (isinstance(first, Int8Linear) and first.blocked)
            or (isinstance(first, Int4Linear) and first.integer))


class StackedExperts(Experts):
    """`Experts` whose weights (and int8 scales) also live in one stack per projection. Each expert is moved
    into its stack, then its own tensors become views of it, in turn; the stacks' pages are only touched
    as they are filled, so memory does not grow."""

    def __init__(self, experts: Experts):
        nn.ModuleList.__init__(self, list(experts))
        self.kernel = in_kernel_blocks(experts)
        for name in PROJECTIONS:
            for attr in STACKED:  # scales: int8 experts; packed, scales_and_mins: int4 experts
                self._stack(name, attr)

    @property
    def label(self) -> str:
        if not self.kernel:
            return "stacked, compiled one-row steps multiply-and-sum"
        if "gate_up_proj_packed_stack" in self._buffers:
            return "stacked, int4 kernel"
        if self.gate_up_proj_weight_stack.dtype == torch.int8:
            return "stacked, int8 kernel"
        return f"stacked, {bf16_kernel.label()}"

    def _stack(self, name: str, attr: str) -> None:
        part = getattr(getattr(self[0], name), attr, None)
        if not isinstance(part, torch.Tensor):  # absent, or a flag of the same name (Int8Linear.packed)
            return
        stack = torch.empty((len(self), *part.shape), dtype=part.dtype, device=part.device)
        for index, expert in enumerate(self):
            if index % EXPERTS_PER_TRIM == EXPERTS_PER_TRIM - 1:  # the replaced tensors' heap memory (heap.py)
                release_freed_memory()
            linear = getattr(expert, name)
            stack[index].copy_(getattr(linear, attr).detach())
            if isinstance(linear._parameters.get(attr), nn.Parameter):
                linear._parameters[attr] = nn.Parameter(stack[index], requires_grad=False)
            else:
                linear._buffers[attr] = stack[index]
        self.register_buffer(f"{name}_{attr}_stack", stack, persistent=False)

    def forward(self, x: torch.Tensor, choice: RouterChoice) -> torch.Tensor:
        """Few rows through the stacks (one kernel call per projection, or a compiled one-row step's
        gathered sum), and prompts too where the integer kernels hold them (the kernel takes each expert's rows
        together); many rows expert by expert, as `Experts` does."""
        if one_row(x) or (self.kernel and (torch.compiler.is_compiling()
                                           or x.shape[0] <= (STACKED_PROMPT_ROWS if self.integer else FEW_ROWS))):
            return self._stacked(x, choice)
        return super().forward(x, choice)

    @property
    def integer(self) -> bool:
        """Are the stacks low-bit blocks (int4, int5, Q8_0, Q6_K) on the integer kernel? (Whose many-row products run
        that kernel too, where int8's take a bfloat16 GEMM.)"""
        linear = getattr(self[0], PROJECTIONS[0])
        return self.kernel and isinstance(linear, Int4Linear) and linear.integer

    def stack(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A projection's stacks: int4 blocks with their scales and minimums, else the weights with their int8
        scales (None for bfloat16 weights)."""
        buffers = self._buffers
        if f"{name}_packed_stack" in buffers:
            return buffers[f"{name}_packed_stack"], buffers[f"{name}_scales_and_mins_stack"]
        return buffers[f"{name}_weight_stack"], buffers.get(f"{name}_scales_stack")

    def _project(self, inputs: torch.Tensor, name: str, choice: RouterChoice) -> torch.Tensor:
        stack, scales = self.stack(name)
        if self.kernel:  # the kernel picks each row's expert itself
            rows = inputs.expand(*choice.experts.shape, inputs.shape[-1])
            if stack.dtype == torch.uint8:  # int4 blocks
                return int_dot.int4_dot(rows, stack, scales, choice.experts.reshape(-1))
            if stack.dtype == torch.int8:
                integer = getattr(getattr(self[0], name), "integer", False)  # activations quantised to int8
                product = int_dot.int8_dot if integer else int8_kernel.gemv
                return product(rows, stack, scales, choice.experts.reshape(-1))
            out = bf16_kernel.linear(rows, stack, experts=choice.experts.reshape(-1))
            return out[..., :getattr(self[0], name).out_features]  # outputs padded to whole panels
        weight = stack[choice.experts]  # [N, k, out, in]
        return one_row_linear(inputs, weight, scales=None if scales is None else scales[choice.experts])

    def _stacked(self, x: torch.Tensor, choice: RouterChoice) -> torch.Tensor:
        """x [N, hidden] through each row's k experts, reading only the chosen rows of the stacks. Rounds
        like the expert-by-expert path: the model's dtype between products."""
        gate, up = self._project(x[:, None, :], "gate_up_proj", choice).chunk(2, dim=-1)  # [N, k, I] each
        outputs = self._project(F.silu(gate) * up, "down_proj", choice)  # [N, k, hidden]
        return (outputs.float() * choice.weights[..., None]).sum(1).to(x.dtype)
