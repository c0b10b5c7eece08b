"""GGUF's 4-bit block types as llmcli's int4 layout: q in 0..15 with w = (q - 8) * scale + zero per 32 inputs; its
5-bit types as int5's: q in 0..31 with w = q * scale + low; Q8_0 as int8 with a scale per 32 (w = q * scale); and
Q6_K as 6-bit codes with an int8 sub-scale per 16 and a float16 d per 256 (w = (q - 32) * d * sub).

Q4_0 (w = (q - 8) * d), Q4_1 (w = q * d + m) and Q4_K (w = d * sc * q - dmin * mn per sub-block of 32, with
6-bit sc and mn) all store 4-bit codes on a per-32-input affine grid, so each maps to (q, scale, zero) with
the file's own codes: no re-quantising, no second rounding. Block layouts as ggml defines them (ggml-common.h).
"""

from __future__ import annotations

import numpy as np

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
_BLOCK = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144)}  # values, bytes per block


def _halves(blocks: np.ndarray, offset: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[..., offset:offset + 2]).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 codes: low nibbles are values 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4)."""
    p = packed.astype(np.uint8)
    low_sc, low_mn = p[..., 0:4] & 63, p[..., 4:8] & 63
    high_sc = (p[..., 8:12] & 0x0F) | ((p[..., 0:4] >> 6) << 4)
    high_mn = (p[..., 8:12] >> 4) | ((p[..., 4:8] >> 6) << 4)
    return (np.concatenate([low_sc, high_sc], -1).astype(np.float32),
            np.concatenate([low_mn, high_mn], -1).astype(np.float32))


def _codes(raw: np.ndarray, type_name: str, columns: int):
    """Raw rows -> (q [rows, blocks, values], and the type's own scale terms per 32 values)."""
    values, size = _BLOCK[type_name]
    blocks = raw.reshape(-1, columns // values, size)
    if type_name == "Q4_K":
        d, dmin = _halves(blocks, 0)[..., None], _halves(blocks, 2)[..., None]
        sc, mn = _k_scales(blocks[..., 4:16])
        qs = blocks[..., 16:144].reshape(*blocks.shape[:-1], 4, 32)
        q = np.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(blocks.shape[0], -1, 32)
        return q, (d * sc).reshape(blocks.shape[0], -1), (dmin * mn).reshape(blocks.shape[0], -1)
    d = _halves(blocks, 0)
    return _nibbles(blocks[..., -16:]), d, (_halves(blocks, 2) if type_name == "Q4_1" else None)


def dequantize_4bit(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Raw bytes of a Q4_0/Q4_1/Q4_K tensor -> float32 of `shape`, with ggml's own formulas (Q4_0: (q - 8) d;
    Q4_1: q d + m; Q4_K: (d sc) q - (dmin mn)), vectorised over the whole tensor (1.6x faster than the
    gguf package's loop over block groups on SmolLM2's Q4_1 tensors), bit for bit equal (tests/test_gguf.py)."""
    q, a, b = _codes(raw, type_name, shape[-1])
    q = q.astype(np.float32)
    if type_name == "Q4_0":
        out = (q - 8) * a[..., None]
    elif type_name == "Q4_1":
        out = q * a[..., None] + b[..., None]
    else:
        out = a[..., None] * q - b[..., None]
    return out.reshape(shape)


def int4_codes(raw: np.ndarray, type_name: str,
               columns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Raw rows [rows, row_bytes] of a Q4_0/Q4_1/Q4_K tensor with `columns` values per row ->
    (q [rows, columns] int32, scale [rows, columns / 32] float32, zero [rows, columns / 32] float32), zero None
    for Q4_0 (symmetric: every zero is 0, and llmcli stores no minimums for it)."""
    rows = raw.shape[0]
    q, a, b = _codes(raw, type_name, columns)
    scale = a.reshape(rows, -1)
    if type_name == "Q4_0":
        zero = None
    elif type_name == "Q4_1":
        zero = b.reshape(rows, -1) + 8 * scale
    else:
        zero = -b.reshape(rows, -1) + 8 * scale
    return q.reshape(rows, columns).astype(np.int32), scale, zero


INT5_TYPES = ("Q5_0", "Q5_1", "Q5_K")
_BLOCK5 = {"Q5_0": (32, 22), "Q5_1": (32, 24), "Q5_K": (256, 176)}  # values, bytes per block


def _bits(packed: np.ndarray, count: int) -> np.ndarray:
    """Little-endian bit fields [..., count / 8] bytes -> [..., count] of 0/1 (bit k of the field is value k's)."""
    return np.unpackbits(np.ascontiguousarray(packed), axis=-1, bitorder="little")[..., :count]


def int5_codes(raw: np.ndarray, type_name: str,
               columns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Raw rows [rows, row_bytes] of a Q5_0/Q5_1/Q5_K tensor with `columns` values per row ->
    (q [rows, columns] int32 in 0..31, scale [rows, columns / 32] float32, low [rows, columns / 32] float32 or None)
    with w = q * scale + low; low None for Q5_0, whose w = (q - 16) * d. Q5_0/Q5_1: d (and m), 32 high bits, 16 bytes
    of nibbles (value j low, j + 16 high). Q5_K: d, dmin, Q4_K's 12 bytes of 6-bit sub-scales and mins, 32 bytes of
    high bits (bit s of byte l: sub-block s's value l), then Q4_K's nibbles; w = d sc q - dmin mn."""
    rows = raw.shape[0]
    values, size = _BLOCK5[type_name]
    blocks = raw.reshape(rows, columns // values, size)
    if type_name == "Q5_K":
        d, dmin = _halves(blocks, 0)[..., None], _halves(blocks, 2)[..., None]
        sc, mn = _k_scales(blocks[..., 4:16])
        high = (blocks[..., 16:48, None] >> np.arange(8, dtype=np.uint8)) & 1  # [.., l, s]
        qs = blocks[..., 48:176].reshape(rows, -1, 4, 32)
        low4 = np.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(rows, -1, 8, 32)
        q = low4 | (np.swapaxes(high, -1, -2) << 4)
        return (q.reshape(rows, columns).astype(np.int32), (d * sc).reshape(rows, -1),
                -(dmin * mn).reshape(rows, -1))
    start = 2 if type_name == "Q5_0" else 4  # the high bits follow d (and m)
    q = _nibbles(blocks[..., start + 4:]) | (_bits(blocks[..., start:start + 4], 32) << 4)
    low = _halves(blocks, 2).reshape(rows, -1) if type_name == "Q5_1" else None
    return q.reshape(rows, columns).astype(np.int32), _halves(blocks, 0).reshape(rows, -1), low


INT8_TYPES = ("Q8_0",)
Q6_TYPES = ("Q6_K",)
STORED_IN_INT8_RUNS = INT8_TYPES + Q6_TYPES  # what an int8 run takes as stored (the integer kernel's formats)


def int8_runs_take_as_stored(layer_types: set[str]) -> bool:
    """Does an int8 run of a file whose layers are in these types take them as stored? Only where every layer is in
    one of STORED_IN_INT8_RUNS: in a mix with 4- or 5-bit parts (an int8 run of a Q4_K_M), a stored attn_v beside
    re-quantised q and k would no longer join them into one product (decode steps 20.1 -> 23.6 ms)."""
    return bool(layer_types) and layer_types <= set(STORED_IN_INT8_RUNS)


def int8_codes(raw: np.ndarray, type_name: str, columns: int) -> tuple[np.ndarray, np.ndarray, None]:
    """Raw rows [rows, row_bytes] of a Q8_0 tensor (per 32 values: float16 d, then 32 int8 q; w = q * d) ->
    (q [rows, columns / 32, 32] int8, scale [rows, columns / 32] float32, None); q is a view of `raw`, not a copy (a
    vocabulary-sized head's codes are hundreds of MB)."""
    if type_name != "Q8_0":
        raise ValueError(f"int8 codes come from Q8_0, not {type_name}")
    rows = raw.shape[0]
    blocks = raw.reshape(rows, columns // 32, 34)
    return blocks[..., 2:].view(np.int8), _halves(blocks, 0).reshape(rows, -1), None


def q6_k_codes(raw: np.ndarray, type_name: str, columns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw rows [rows, row_bytes] of a Q6_K tensor -> (q [rows, columns] uint8 in 0..63, sub [rows, columns / 16]
    int8, d [rows, columns / 256] float32) with w = (q - 32) * d * sub. Per 256 values: 128 bytes of low nibbles, 64
    of high 2-bit pairs, 16 int8 sub-scales and float16 d. In each half of 128, value 32 k + l (k < 4, l < 32) takes
    the low nibble (k < 2) or high one of byte l + 32 (k % 2), and bits 2 k of high byte l (ggml's
    dequantize_row_q6_K); sub-block 16 x (its index in the 256) takes sub-scale that many."""
    if type_name != "Q6_K":
        raise ValueError(f"6-bit codes come from Q6_K, not {type_name}")
    rows = raw.shape[0]
    blocks = raw.reshape(rows, columns // 256, 210)
    low = blocks[..., :128].reshape(rows, -1, 2, 2, 32)  # [.., half, byte l or l + 32, l]
    nibbles = np.stack([low[..., 0, :] & 0x0F, low[..., 1, :] & 0x0F, low[..., 0, :] >> 4, low[..., 1, :] >> 4], -2)
    high = blocks[..., 128:192].reshape(rows, -1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[:, None]
    q = nibbles | ((high & 3) << 4)  # [.., half, k, l]
    sub = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8)
    return q.reshape(rows, columns), sub.reshape(rows, -1), _halves(blocks, 208)
