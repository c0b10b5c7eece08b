"""Caches: what a model keeps between forward calls, and where a call's tokens sit.

A `Cache` owns its length: forward calls read and write it through `Span`, which carries the positions
of the call's tokens (a tensor, always) and, for an ordinary cache, the Python start to slice with. A
`StaticView` of a cache is what a compiled decode step gets: its rows are read whole and masked by
position, and it holds no Python length, so nothing in the step changes from one token to the next.
Storage is sequence-major ([max_len, B, ...]) so that the first n positions are one contiguous block.

Continuous batching (`llmcli serve`) runs sequences of different lengths in one step: a static view of the
first rows of the batch with per-row positions [B, T] (each row writes and reads up to its own position),
and `row_cache(b)`, an ordinary cache over one batch row, to prefill a prompt into that row alone.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Span(NamedTuple):
    """Where a forward call's tokens sit: `positions` [T] always; `start` (= positions[0]) when the cache is
    read up to its length, None in a static step (the cache is read whole, rows past the position masked).
    A static step may give each batch row its own positions: [B, T]."""

    positions: torch.Tensor
    start: int | None

    @property
    def static(self) -> bool:
        return self.start is None


class Cache:
    """Per-layer storage for `max_len` tokens plus the number of tokens seen. `state` holds per-sequence
    values that must persist across calls (e.g. original Qwen's NTK alpha)."""

    static = False

    def __init__(self, layers: list, max_len: int):
        self.layers = layers
        self.max_len = max_len
        self.length = 0
        self.state: dict = {}
        self._view: StaticView | None = None  # the last static_view, kept: later steps mostly ask for it again

    def span(self, count: int, device: torch.device | str | None = None) -> Span:
        """The span of the next `count` tokens; a ValueError when they do not fit."""
        if self.length + count > self.max_len:
            raise ValueError(f"sequence of {self.length + count} tokens exceeds the cache ({self.max_len})")
        return Span(torch.arange(self.length, self.length + count, device=device), self.length)

    def advance(self, count: int) -> None:
        """`count` more tokens are stored (called once per forward call, after every layer wrote)."""
        self.length += count

    def reset(self) -> None:
        self.length = 0
        self.state.clear()

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` tokens (chat reuses a common prefix)."""
        self.length = min(self.length, length)

    def restorable(self, length: int) -> int:
        """The longest prefix of at most `length` tokens that `crop` can return to: any, where every token
        has its own rows (a recurrent state's cache can only return to its snapshots)."""
        return length

    def mark(self) -> None:
        """Remember the present length as a point to `crop` back to (only recurrent states need it)."""

    def static_view(self, length: int | None = None) -> StaticView:
        """The first `length` rows for a compiled step (a shorter view is less to read), or with None the
        cache's own tensors, whole (CUDA graphs replay fixed addresses). Kept: later steps mostly ask again."""
        view = self._view
        if view is None or view.length != length:
            view = self._view = StaticView(self, length)
        return view

    def tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.layers for t in layer.tensors()]

    def row_cache(self, row: int) -> Cache:
        """An empty cache of this kind over batch row `row` of this one's storage (writes land in this cache)."""
        return type(self)([layer.rows_view(row, row + 1) for layer in self.layers], self.max_len)

    def copy_row(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` tokens of batch row `source` to row `target` (storage is [max_len, B, ...]), and
        its per-sequence state where a layer keeps one ([B, ...]: a recurrent layer's)."""
        for layer in self.layers:
            for t in layer.tensors():
                if layer.per_token:
                    t[:length, target] = t[:length, source]
                else:
                    t[target] = t[source]

    def bytes_per_token(self) -> int:
        """Bytes stored per token, summed over layers."""
        return sum(layer.bytes_per_token() for layer in self.layers)


class StaticView:
    """A cache's first `max_len` rows as one static step reads them: every row, masked past the position."""

    static = True

    def __init__(self, cache: Cache, length: int | None, rows: int | None = None):
        """`rows`: only the first `rows` batch rows (continuous batching steps the sequences it holds)."""
        self.length = length
        if rows is not None:
            self.layers = [layer.rows_view(0, rows, length) for layer in cache.layers]
        else:
            self.layers = cache.layers if length is None else [layer.prefix_view(length) for layer in cache.layers]
        self.max_len = cache.max_len if length is None else length
        self.state = cache.state  # shared: e.g. the NTK frequencies chosen at prefill

    def span(self, count: int, device=None) -> Span:
        raise TypeError("a static view has no length: the compiled step is given its position")

    def advance(self, count: int) -> None:
        """Nothing: the view has no length; whoever runs the step advances the cache it views."""

    def tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.layers for t in layer.tensors()]

    def sequence_tensors(self) -> list[torch.Tensor]:
        """The tensors with a row per position (dim 0), whose length a compiled step treats as dynamic."""
        return [t for layer in self.layers if layer.per_token for t in layer.tensors()]


class KVLayerCache:
    """Keys and values of one attention layer: [max_len, B, kv_heads, dim] each. Callers see
    [B, kv_heads, n, dim] views."""

    per_token = True  # rows per position (a recurrent layer's state has none)

    def __init__(self, batch: int, kv_heads: int, max_len: int, k_dim: int, v_dim: int, dtype, device):
        self.k = torch.zeros(max_len, batch, kv_heads, k_dim, dtype=dtype, device=device)
        self.v = torch.zeros(max_len, batch, kv_heads, v_dim, dtype=dtype, device=device)

    def prefix_view(self, length: int) -> KVLayerCache:
        view = object.__new__(KVLayerCache)
        view.k, view.v = self.k[:length], self.v[:length]
        return view

    def rows_view(self, first: int, end: int, length: int | None = None) -> KVLayerCache:
        view = object.__new__(KVLayerCache)
        view.k, view.v = self.k[:length, first:end], self.v[:length, first:end]
        return view

    def update(self, span: Span, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, kv_heads, T, dim] at the span; return the keys/values attended to (a static step:
        every row, the mask hides the unwritten ones)."""
        if span.static:
            if span.positions.dim() == 2:  # per-row positions: row b writes at its own positions[b]
                at = (span.positions.T, torch.arange(k.shape[0], device=k.device))
                self.k[at], self.v[at] = k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)
            else:
                self.k.index_copy_(0, span.positions, k.permute(2, 0, 1, 3))
                self.v.index_copy_(0, span.positions, v.permute(2, 0, 1, 3))
            return self.k.permute(1, 2, 0, 3), self.v.permute(1, 2, 0, 3)
        end = span.start + k.shape[2]
        self.k[span.start:end] = k.permute(2, 0, 1, 3)
        self.v[span.start:end] = v.permute(2, 0, 1, 3)
        return self.k[:end].permute(1, 2, 0, 3), self.v[:end].permute(1, 2, 0, 3)

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v]

    def bytes_per_token(self) -> int:
        return (self.k[0, 0].numel() + self.v[0, 0].numel()) * self.k.element_size()


class LatentLayerCache:
    """One MLA layer's cache: normalised c_kv then the rotated k_pe, one row of kv_lora_rank + rope values
    per token, [max_len, B, row]. Callers see [B, n, row]: one tensor, so that the absorbed form scores
    [q_latent | q_pe] against it in one product."""

    per_token = True

    def __init__(self, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int, dtype, device):
        self.kv_lora_rank = kv_lora_rank
        self.kv = torch.zeros(max_len, batch, kv_lora_rank + rope_dim, dtype=dtype, device=device)

    def prefix_view(self, length: int) -> LatentLayerCache:
        view = object.__new__(type(self))  # a subclass's view adds its own tensors
        view.kv_lora_rank, view.kv = self.kv_lora_rank, self.kv[:length]
        return view

    def rows_view(self, first: int, end: int, length: int | None = None) -> LatentLayerCache:
        view = object.__new__(type(self))
        view.kv_lora_rank, view.kv = self.kv_lora_rank, self.kv[:length, first:end]
        return view

    def update(self, span: Span, c_kv: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        """Store the span's tokens (c_kv [B, T, rank], k_pe [B, T, rope]); return the rows attended to."""
        if span.static:
            rows = torch.cat((c_kv, k_pe), dim=-1).transpose(0, 1)
            if span.positions.dim() == 2:  # per-row positions: row b writes at its own positions[b]
                self.kv[span.positions.T, torch.arange(rows.shape[1], device=rows.device)] = rows
            else:
                self.kv.index_copy_(0, span.positions, rows)
            return self.kv.transpose(0, 1)
        end = span.start + c_kv.shape[1]
        self.kv[span.start:end, :, : self.kv_lora_rank] = c_kv.transpose(0, 1)
        self.kv[span.start:end, :, self.kv_lora_rank:] = k_pe.transpose(0, 1)
        return self.kv[:end].transpose(0, 1)

    def tensors(self) -> list[torch.Tensor]:
        return [self.kv]

    def bytes_per_token(self) -> int:
        return self.kv.shape[-1] * self.kv.element_size()
