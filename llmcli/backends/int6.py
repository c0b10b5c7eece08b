"""The head of an int4 run in 6 bits: q in 0..63 with a float16 scale and min per group of 64 inputs (6.5 bits a
weight), on the integer kernel (kernels/int6_dot.cpp) where it runs.

With the layers in 4 bits the head is the largest single product of a decode step, and on small models and
MoE models with few active weights a large share of the step: 132 MB of the DeepSeek-V3-shaped MoE's 214 in
int8. llama.cpp's Q4_0 files keep it in 6 bits (Q6_K), and so does llmcli: in 4 bits it cost too much
(README: quality), in 6 about what int8 costs.
"""

from __future__ import annotations

import torch
from torch import nn

from llmcli.backends import int_dot
from llmcli.backends.int4 import INTEGER_PROMPT_ROWS, quantized_in_parts
from llmcli.backends.int8 import bf16_matmul_is_fast
from llmcli.backends.linear import Product

GROUP = int_dot.INT6_GROUP
LEVELS = 63


def quantize_int6(weight: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] -> (q [N, K] uint8 in 0..63, scale [N, K/group], low [N, K/group]) in float32, with
    w ≈ q * scale + low: each group's minimum and maximum map to 0 and 63. The scales and mins are rounded to
    float16 (what the kernel stores) before q is chosen, so q is the nearest level of the stored grid. Callers
    pass a few thousand rows at a time (Int6Linear): a vocabulary-sized head's float copies cost gigabytes."""
    rows, columns = weight.shape
    w = weight.float().reshape(rows, columns // group, group)
    low = w.amin(-1).half().float()
    scale = ((w.amax(-1) - low) / LEVELS).clamp(min=2**-24).half().float()
    q = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, LEVELS).to(torch.uint8)
    return q.reshape(rows, columns), scale, low


class Int6Linear(Product, nn.Module):
    """A drop-in replacement for nn.Linear (the head) with 6-bit weights in the integer kernel's blocks: few rows
    (decoding, a prompt's last position) go through it with the activations quantised to int8, many rows (every
    position's logits) through a GEMM on the weight converted back to floats."""

    kernel_rows = INTEGER_PROMPT_ROWS  # int4's figure (crossover.py)

    def __init__(self, linear: nn.Linear, chunk_rows: int | None = None):
        """Quantised and stored `chunk_rows` rows (a multiple of 8; by default as int4.quantized_in_parts takes them):
        the whole head's intermediate copies (q, its nibbles and high bits) would add several times its 6-bit size
        to the load's peak."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # a vocabulary-sized head: each part's temporaries go back to the OS before the next (heap.py)
        packed, sm = quantized_in_parts(linear.weight.detach(), quantize_int6, int_dot.int6_blocks, chunk_rows,
                                        trim=True)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_mins", sm)
        self.bias = linear.bias

    @property
    def label(self) -> str:
        return f"int6 kernel (x int8 activations, {int_dot.isa_label()}, groups of {GROUP})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= self.kernel_rows * self.in_features:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return torch.ops.llmcli.int6_dot.default(x, self.packed, self.scales_and_mins, bias)
        dtype = x.dtype if x.dtype == torch.float32 or bf16_matmul_is_fast() else torch.float32
        weight = int_dot.int6_unblock(self.packed, self.scales_and_mins, dtype)
        out = torch.nn.functional.linear(x.to(dtype), weight).to(x.dtype)
        return out if self.bias is None else out + self.bias.to(out.dtype)
