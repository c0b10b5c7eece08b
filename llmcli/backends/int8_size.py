"""How many bytes a checkpoint takes after `--quantize int8` or `int4`, from tensor names and shapes alone (no
torch: `llmcli show` reads only headers)."""

from __future__ import annotations

import math


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Is this checkpoint tensor a linear weight that `--quantize int8` stores as int8? Embeddings,
    norms, the MoE router, Qwen's shared-expert gate and DeepSeek's kv_b_proj (read directly by the absorbed
    decode: the model says so with `keeps_weight`, which needs a model; this works from names only) are not."""
    excluded = ("embed_tokens.", "transformer.wte.", ".mlp.gate.", ".shared_expert_gate.", "kv_b_proj.")
    return len(shape) == 2 and name.endswith(".weight") and not any(e in name for e in excluded)


def int8_size(tensors: dict[str, tuple[int, ...]], element: int, tied_head: tuple[int, int] | None) -> int:
    """Bytes of the weights after int8 quantisation: int8 values plus one scale per output row for the
    linears, `element` bytes per value for everything else; a tied head gets its own int8 copy."""
    total = 0
    for name, shape in tensors.items():
        numel = math.prod(shape)
        total += numel + shape[0] * element if quantizable(name, shape) else numel * element
    if tied_head is not None:
        total += tied_head[0] * tied_head[1] + tied_head[0] * element
    return total


INT4_GROUP = 32  # backends.int4.GROUP (this module stays torch-free)
INT6_GROUP = 64  # backends.int6.GROUP


def six_bit_head_size(shape: tuple[int, ...]) -> int | None:
    """Bytes of a head in 6 bits (an int4 run's, where the integer kernels run): 6 bits a value, a float16 scale
    and min per 64 inputs; None for a shape the kernel's blocks do not take (it stays int8)."""
    rows, columns = shape
    if rows % 8 or columns % INT6_GROUP:
        return None
    return rows * columns * 6 // 8 + rows * (columns // INT6_GROUP) * 4


def int4_size(tensors: dict[str, tuple[int, ...]], element: int, tied_head: tuple[int, int] | None,
              six_bit_head: bool = True, bits: int = 4) -> int:
    """Bytes after int4 quantisation: half a byte per value plus a scale and a zero point per group of 32 inputs
    for the linears that fit torch's packing (outputs a multiple of 16, inputs of 32); the head in 6 bits
    (`six_bit_head`: the integer kernels run, as on x86 CPUs with AVX2) or else int8, as the linears that do not
    fit; everything else as it is. `bits` 5: int5's 5/8 of a byte per value and float16 scale and min per 32, for
    outputs a multiple of 8."""
    rows_multiple = 16 if bits == 4 else 8
    def head(shape: tuple[int, ...]) -> int:
        six = six_bit_head_size(shape) if six_bit_head else None
        return six if six is not None else shape[0] * shape[1] + shape[0] * element

    total = 0
    for name, shape in tensors.items():
        numel = math.prod(shape)
        if not quantizable(name, shape):
            total += numel * element
        elif name.endswith("lm_head.weight"):
            total += head(shape)
        elif shape[0] % rows_multiple or shape[1] % INT4_GROUP:
            total += numel + shape[0] * element
        elif bits == 5:
            total += numel * 5 // 8 + 4 * (numel // INT4_GROUP)
        else:
            total += numel // 2 + 2 * (numel // INT4_GROUP) * element
    if tied_head is not None:
        total += head(tied_head)
    return total
