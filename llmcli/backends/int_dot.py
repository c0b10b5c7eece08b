"""Integer dot-product kernels for int8, int4 and int6 weights on AVX2 CPUs, from `kernels/int_dot.cpp` (built with
llmcli's other CPU kernels, see cpu_kernels.py).

On a CPU without AVX-512 the int8 decode kernel (int8_kernel.py) converts every weight to float and is
compute-bound at about half the memory's bandwidth; torch's int4 product is no faster. llama.cpp's Q8_0 and
Q4_0 paths quantise the activation row to int8 (a scale per 32 inputs) and multiply bytes by bytes
(`maddubs`): 2.4-2.8x llmcli's decode on the same CPU. These kernels do the same for llmcli's weights:
int8 weights in the int8 kernel's blocks (a scale per output row), int4 weights with a float16 scale and
minimum per group of 32 inputs (w = q * scale + min, GGUF's Q4_1; Q4_0's scales alone), int5 weights: int4's
blocks plus a high bit per weight (GGUF's Q5 codes), and int8 weights with a scale per 32 inputs (GGUF's Q8_0
codes). Quantising the activations changes the numbers slightly (README: quality); `Options.int_dot`
(LLMCLI_INT_DOT=0) turns it off. CPUs with AVX-512 run
them too (with 256-bit instructions): on a Zen 4 their decode products matched or beat the AVX-512 float kernel,
and the fused MLP and expert ops take integer weights only.
"""

from __future__ import annotations

import torch

from llmcli.backends import cpu_kernels
from llmcli.backends.heap import release_freed_memory

GROUP = 32  # inputs per activation scale and per int4 weight scale (kGroup in the C++ source)
ROWS = 8  # output rows per block
INT4_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # the order of a block's rows in int4 storage (kInt4Order)
FAST_ISAS = {"avx2": "AVX2", "avx2_vnni": "AVX2 + VNNI"}  # what labels call the builds that run fast


def isa() -> str | None:
    """What the kernels were built for here: "avx2", "avx2_vnni" (AVX2 with VNNI's byte dot products: AVX512-VNNI
    or AVX-VNNI) or "portable"; None when not built."""
    return str(torch.ops.llmcli.int_dot_isa()) if cpu_kernels.load_once()[0] else None


def isa_label() -> str:
    """The build as bench and show name it, e.g. "AVX2 + VNNI"."""
    built = isa()
    return FAST_ISAS.get(built, built or "not built")


def runs_fast() -> bool:
    """Built with AVX2 (the plain C++ loops are slower than the float paths)."""
    return isa() in FAST_ISAS


def int8_fits(shape: torch.Size | tuple[int, ...]) -> bool:
    return len(shape) == 2 and shape[0] % ROWS == 0 and shape[1] % GROUP == 0


def int8_dot(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
             experts: torch.Tensor | None = None) -> torch.Tensor:
    """≈ (x @ w.T) * scales for x [..., in] with few rows, x quantised to int8 per group of 32. `blocks` is
    one matrix in the int8 kernel's blocks [out/8, in/16, 8, 16] with scales [out], or a stack [E, ...] with
    scales [E, out] and `experts` naming each row's matrix."""
    return torch.ops.llmcli.int8_dot(x, blocks, scales.contiguous(), experts)


def int4_fits(shape: torch.Size | tuple[int, ...]) -> bool:
    return len(shape) == 2 and shape[0] % ROWS == 0 and shape[1] % GROUP == 0 and shape[1] > 0


def int4_blocks(q: torch.Tensor, scale: torch.Tensor,
                low: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, K] in 0..15, scale and low [N, K/32] (w = q * scale + low) -> the kernel's storage: bytes
    [N/8, K/32, 8, 16] (byte j of a row's group: q[j] | q[j + 16] << 4; rows in INT4_ORDER) and float16
    [N/8, K/32, 2, 8] (scales, then mins, rows in order). With low None (GGUF's Q4_0: w = (q - 8) * scale) the
    second is [N/8, K/32, 1, 8], scales alone: 4.5 bits a weight instead of 5. The codes are placed rows in lanes
    (_in_lanes)."""
    return _nibble_blocks(_in_lanes(q)), _row_blocks([scale] if low is None else [scale, low])


def _lane_sources() -> torch.Tensor:
    """For each code of a block and group (row * 32 + input, rows in block order), which code of the matrix goes
    there so that the kernel's unpacked registers hold rows in lanes (kernels/low_bit_block.cpp): pair j's first
    register block rows 0..7's inputs 4j..4j+3 (byte 4r + i: row r's input 4j + i), its second the same 16 inputs
    later. The nibble layouts put stored row s's inputs b and 16 + b at byte 16 * (s % 2) + b of pair s // 2's
    registers."""
    source = torch.empty(ROWS * GROUP, dtype=torch.long)
    for stored, row in enumerate(INT4_ORDER):
        for half in range(2):
            for b in range(16):
                at = 16 * (stored % 2) + b
                source[row * GROUP + 16 * half + b] = (at // 4) * GROUP + 16 * half + 4 * (stored // 2) + at % 4
    return source


LANE_SOURCES = _lane_sources()


def _in_lanes(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] -> the same codes rearranged within each block and group (LANE_SOURCES), for the nibble packers."""
    n, k = q.shape
    blocks = q.reshape(n // ROWS, ROWS, k // GROUP, GROUP).transpose(1, 2).reshape(n // ROWS, k // GROUP, -1)
    lanes = blocks[..., LANE_SOURCES].reshape(n // ROWS, k // GROUP, ROWS, GROUP).transpose(1, 2)
    return lanes.reshape(n, k)


def _nibble_blocks(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] in 0..15 -> bytes [N/8, K/32, 8, 16]: byte j of a row's group q[j] | q[j + 16] << 4, rows in
    INT4_ORDER (the low nibbles of every low-bit layout but int8's)."""
    n, k = q.shape
    groups = q.to(torch.uint8).reshape(n // ROWS, ROWS, k // GROUP, 2, 16)
    packed = groups[:, :, :, 0] | (groups[:, :, :, 1] << 4)  # [N/8, 8, K/32, 16]
    return packed[:, list(INT4_ORDER)].permute(0, 2, 1, 3).contiguous()


def _row_blocks(terms: list[torch.Tensor]) -> torch.Tensor:
    """Per-row terms, each [N, G] (scales, mins), -> float16 [N/8, G, len(terms), 8]: the blocks' rows in order."""
    n, groups = terms[0].shape
    stacked = torch.stack(terms, 0).reshape(len(terms), n // ROWS, ROWS, groups).permute(1, 3, 0, 2)
    return stacked.to(torch.float16).contiguous()


def int4_with_mins(sm: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Scales alone [..., 1, 8] -> scales and mins [..., 2, 8] (min = -8 * scale for int4, -16 * scale for int5,
    exact in float16 short of overflow): the same weights, for joining with parts that have their own mins."""
    return sm if sm.shape[-2] == 2 else torch.cat([sm, sm * -(1 << (bits - 1))], -2)


INT5_BYTES = 160  # per block of 8 rows and group of 32 inputs: 128 of nibbles, 32 of high bits (kInt5Bytes)


def int5_blocks(q: torch.Tensor, scale: torch.Tensor,
                low: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, K] in 0..31, scale and low [N, K/32] (w = q * scale + low; low None: w = (q - 16) * scale, GGUF's
    Q5_0) -> the kernel's storage (kernels/low_bit_block.cpp): bytes [N/8, K/32, 160] (the low nibbles as int4_blocks
    stores them, then per pair of stored rows A, B 8 bytes whose byte b holds the high bits of A's q[b], q[b + 8],
    B's q[b], q[b + 8] at bits 0-3 and those of the same plus 16 at bits 4-7, of the codes as _in_lanes places them)
    and scales as int4_blocks gives."""
    n, k = q.shape
    q = _in_lanes(q.to(torch.uint8))
    nibbles, sm = _nibble_blocks(q & 15), _row_blocks([scale] if low is None else [scale, low])
    high = (q >> 4).reshape(n // ROWS, ROWS, k // GROUP, 32)[:, list(INT4_ORDER)].permute(0, 2, 1, 3)
    high = high.reshape(n // ROWS, k // GROUP, 4, 2, 2, 2, 8)  # [.., pair, row of pair, t >= 16, t % 16 >= 8, b]
    shifts = torch.tensor([[[0, 1], [4, 5]], [[2, 3], [6, 7]]], dtype=torch.uint8)[..., None]
    units = (high << shifts).sum((3, 4, 5), dtype=torch.uint8)  # the eight bits of a byte do not overlap
    packed = torch.cat([nibbles.reshape(n // ROWS, k // GROUP, 128), units.reshape(n // ROWS, k // GROUP, 32)], -1)
    return packed.contiguous(), sm


INT8_GROUP_BYTES = 256  # per block of 8 rows and group of 32 inputs: a byte per weight (kInt8Bytes)


def int8_group_blocks(q: torch.Tensor, scale: torch.Tensor,
                      chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, K] (or [N, K/32, 32], any strides) in -128..127 and scale [N, K/32] (w = q * scale: GGUF's Q8_0) -> the
    kernel's storage (kernels/low_bit_block.cpp): bytes [N/8, K/32, 256] of u = q + 128, rows in lanes (byte
    32k + 4r + i: block row r's input 4k + i); and scales alone [N/8, K/32, 1, 8] as int4_blocks gives them. A few
    thousand rows at a time, one copy each: a vocabulary-sized head's temporaries stay small."""
    q = q.reshape(q.shape[0], -1, GROUP)
    n, k = q.shape[0], q.shape[1] * GROUP
    packed = torch.empty(n // ROWS, k // GROUP, INT8_GROUP_BYTES, dtype=torch.uint8)
    for begin in range(0, n, chunk_rows):
        u = q[begin: begin + chunk_rows].to(torch.int8).view(torch.uint8) ^ 0x80
        u = u.reshape(-1, ROWS, k // GROUP, 8, 4).permute(0, 2, 3, 1, 4)  # [block, group, k, row, input % 4]
        packed[begin // ROWS: (begin + chunk_rows) // ROWS] = u.reshape(-1, k // GROUP, INT8_GROUP_BYTES)
    return packed, _row_blocks([scale])


INT6_BYTES = 192  # per block of 8 rows and group of 32 inputs: 128 of nibbles, 64 of high bits (kInt6Bytes)
Q6_K_BYTES = INT6_BYTES + 16  # Q6_K per block and group: the 6-bit codes, then 16 int8 sub-scales (kQ6KBytes)


def bits_of(packed: torch.Tensor) -> int:
    """4, 5, 6 or 8: which of the low-bit layouts `packed` (one matrix or a stack) is in."""
    return {INT5_BYTES: 5, Q6_K_BYTES: 6, INT8_GROUP_BYTES: 8}.get(packed.shape[-1], 4)


def int5_from_int4(packed: torch.Tensor, sm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An int4 weight [N/8, K/32, 8, 16] as the same weight in int5's layout (high bits all 0), scales with mins."""
    nibbles = packed.reshape(*packed.shape[:-2], 128)
    return torch.cat([nibbles, nibbles.new_zeros(*nibbles.shape[:-1], 32)], -1), int4_with_mins(sm, 4)


def int4_dot(x: torch.Tensor, packed: torch.Tensor, sm: torch.Tensor,
             experts: torch.Tensor | None = None) -> torch.Tensor:
    """≈ x @ w.T for x [..., in] with few rows, x quantised to int8 per group of 32. `packed` and `sm` hold one
    matrix, or a stack [E, ...] with `experts` naming each row's matrix."""
    return torch.ops.llmcli.int4_dot(x, packed, sm, experts)


def int4_unblock(packed: torch.Tensor, sm: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The int4 weight as [N, K] in `dtype` (q * scale + min): for products over many rows."""
    return torch.ops.llmcli.int4_unblock(packed, sm, dtype)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' activation quantisation in torch ops (a reference): x [..., K] -> (q [..., K] int8,
    d [..., K/32] float32) with x ≈ q * d per group: d = max|x| / 127, q = round(x * (1/d))."""
    groups = x.float().reshape(*x.shape[:-1], -1, GROUP)
    d = groups.abs().amax(-1) / 127.0
    inverse = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(groups * inverse[..., None]).clamp(-127, 127)
    return q.to(torch.int8).reshape(x.shape), d


INT6_GROUP = 64  # inputs per int6 weight scale and min (kInt6Group)
INT6_HIGH_SHIFTS = ((0, 2), (4, 6))  # [row of the pair][inputs 0-15 or 16-31]: where a unit's byte keeps the bits


def int6_fits(shape: torch.Size | tuple[int, ...]) -> bool:
    return len(shape) == 2 and shape[0] % ROWS == 0 and shape[1] % INT6_GROUP == 0 and shape[1] > 0


def int6_blocks(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, K] in 0..63, scale and low [N, K/64] (w = q * scale + low) -> the kernel's storage (kernels/int6_dot.cpp):
    bytes [N/8, K/32, 192] (each block and group of 32: the low nibbles as int4_blocks stores them, then the high
    two bits in a unit of 16 bytes per pair of stored rows) and float16 [N/8, K/64, 2, 8] (scales, then mins)."""
    return _int6_bytes(q), _row_blocks([scale, low])


def _int6_bytes(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] in 0..63 -> bytes [N/8, K/32, 192]: per block and group of 32 the low nibbles as int4_blocks stores
    them, then the high two bits in a unit of 16 bytes per pair of stored rows."""
    n, k = q.shape
    q = q.to(torch.uint8)
    nibbles = _nibble_blocks(q & 15)
    high = (q >> 4).reshape(n // ROWS, ROWS, k // GROUP, 2, 16)[:, list(INT4_ORDER)]  # [.., stored row, g, half, b]
    high = high.permute(0, 2, 1, 3, 4).reshape(n // ROWS, k // GROUP, 4, 2, 2, 16)  # [.., unit, row of pair, half, b]
    shifts = torch.tensor(INT6_HIGH_SHIFTS, dtype=torch.uint8)[:, :, None]
    units = (high << shifts).sum((3, 4), dtype=torch.uint8)  # the four 2-bit fields of a byte do not overlap
    return torch.cat([nibbles.reshape(n // ROWS, k // GROUP, 128), units.reshape(n // ROWS, k // GROUP, 64)], -1)


def q6_k_blocks(q: torch.Tensor, sub: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF's Q6_K as the file keeps it, w = (q - 32) * d * sub: q [N, K] in 0..63, sub [N, K/16] int8 sub-scales, d
    [N, K/256] (float16 values) -> the int4 op's Q6_K storage (kernels/low_bit_block.cpp): bytes [N/8, K/32, 208],
    per block and group int6_blocks' 192 with the codes rows in lanes (_in_lanes), then the sub-scales of rows 0..7
    for inputs 0-15 and for 16-31; and d as float16 [N/8, K/256, 1, 8]. 6.5625 bits a weight, as in the file."""
    n, k = q.shape
    subs = _row_blocks([sub[:, 0::2], sub[:, 1::2]]).to(torch.int8)  # [N/8, K/32, 2, 8], exact: |sub| <= 128
    subs = subs.view(torch.uint8).reshape(n // ROWS, k // GROUP, 16)
    return torch.cat([_int6_bytes(_in_lanes(q)), subs], -1), _row_blocks([d])


def rows_per_part(columns: int, values: int) -> int:
    """How many rows of a matrix `columns` wide to convert at a time for about `values` values: whole blocks of 8, at
    least one. Counted in values, not rows: a 7B model's 18944-wide down projection taken 4096 rows at a time (its
    whole 3584 rows) raised a Q4_0 load's peak by 1 GiB of extraction temporaries, as a 896-wide matrix's do not."""
    return max(ROWS, values // max(columns, 1) // ROWS * ROWS)


def blocks_in_parts(parts, rows: int, pack, trim: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One storage (packed bytes, scales) for a matrix of `rows` whose codes come in parts of whole blocks of 8 rows
    (`pack`: one of the *_blocks functions above, taking a part's codes), allocated once: packing a vocabulary-sized
    head whole held several full-size copies of its codes at once (Qwen3-30B-A3B's 255 MB Q6_K head: the load's
    resident memory rose 1.5 GB while packing it, now 0.34 GB). `trim`: hand each part's temporaries back to the OS
    before the next (a few ms each: for a file's big matrices, not for every layer's)."""
    packed = sm = None
    done = 0
    for index, codes in enumerate(parts):
        if index and trim:  # a big matrix: the earlier parts' temporaries go back to the OS (heap.py)
            release_freed_memory()
        part, part_sm = pack(*codes)
        if packed is None:
            packed = part.new_empty((rows // ROWS, *part.shape[1:]))
            sm = part_sm.new_empty((rows // ROWS, *part_sm.shape[1:]))
        packed[done: done + len(part)], sm[done: done + len(part)] = part, part_sm
        done += len(part)
    if packed is None or done * ROWS != rows:
        raise ValueError(f"the parts held {done * ROWS} rows of {rows}")
    return packed, sm


def int6_dot(x: torch.Tensor, packed: torch.Tensor, sm: torch.Tensor) -> torch.Tensor:
    """≈ x @ w.T for x [..., in] with few rows, x quantised to int8 per group of 32."""
    return torch.ops.llmcli.int6_dot(x, packed, sm)


def int6_unblock(packed: torch.Tensor, sm: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The int6 weight as [N, K] in `dtype` (q * scale + min): for products over many rows."""
    return torch.ops.llmcli.int6_unblock(packed, sm, dtype)
