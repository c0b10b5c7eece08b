"""GGUF's 4-bit block types as llmcli's int4 layout: q in 0..15 with w = (q - 8) * scale + zero per 32 inputs.

Q4_0 (w = (q - 8) * d), Q4_1 (w = q * d + m) and Q4_K (w = d * sc * q - dmin * mn per sub-block of 32, with
6-bit sc and mn) all store 4-bit codes on a per-32-input affine grid, so each maps to (q, scale, zero) with
the file's own codes: no re-quantising, no second rounding. Block layouts as ggml defines them (ggml-common.h).
"""

from __future__ import annotations

import numpy as np
import torch

GROUP = 32
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


def _q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d, dmin = _halves(blocks, 0)[..., None], _halves(blocks, 2)[..., None]
    sc, mn = _k_scales(blocks[..., 4:16])
    qs = blocks[..., 16:144].reshape(*blocks.shape[:-1], 4, 32)  # 4 chunks of 64 values: low then high nibbles
    q = np.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(*blocks.shape[:-1], 8 * 32)
    scale = d * sc
    return q, scale, -dmin * mn + 8 * scale


def int4_codes(raw: np.ndarray, type_name: str, columns: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw rows [rows, row_bytes] of a Q4_0/Q4_1/Q4_K tensor with `columns` values per row ->
    (q [rows, columns] int32, scale [rows, columns / 32] float32, zero [rows, columns / 32] float32)."""
    values, size = _BLOCK[type_name]
    blocks = raw.reshape(raw.shape[0], columns // values, size)
    if type_name == "Q4_K":
        q, scale, zero = _q4_k(blocks)
    else:
        d = _halves(blocks, 0)
        q = _nibbles(blocks[..., -16:])
        zero = np.zeros_like(d) if type_name == "Q4_0" else _halves(blocks, 2) + 8 * d
        scale = d
    rows = raw.shape[0]
    return (torch.from_numpy(np.ascontiguousarray(q).reshape(rows, columns).astype(np.int32)),
            torch.from_numpy(np.ascontiguousarray(scale).reshape(rows, columns // GROUP)),
            torch.from_numpy(np.ascontiguousarray(zero).reshape(rows, columns // GROUP)))
