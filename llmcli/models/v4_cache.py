"""DeepSeek-V4's cache: per layer the last `sliding_window - 1` keys (K = V, one head) and, for the compressed
layers, what their compressors have emitted and still hold.

A compressor turns every complete window of `rate` tokens into one entry. Between calls it keeps the raw
projections of an incomplete window (`buffer_*`) and, for CSA's overlapping windows, the first-half
projections of the last complete window (`overlap_*`, gate with its position bias added), which the next
window pools too. Entries only ever grow, so per token a CSA layer stores (head_dim + index_head_dim) / 4
values and an HCA layer head_dim / 128: what lets a million tokens fit. Nothing here can be cut back to an
earlier length (a window's pooled entry holds several tokens): `crop` only returns to the start.
"""

from __future__ import annotations

import torch

from llmcli.errors import LlmcliError
from llmcli.models.cache import Cache


class CompressorState:
    """One compressor's emitted entries [B, W, dim] and its pending inputs."""

    def __init__(self):
        self.entries: torch.Tensor | None = None
        self.buffer_kv: torch.Tensor | None = None
        self.buffer_gate: torch.Tensor | None = None
        self.overlap_kv: torch.Tensor | None = None
        self.overlap_gate: torch.Tensor | None = None
        self.count = 0  # entries emitted: the next window starts at position count * rate

    def take_windows(self, kv: torch.Tensor, gate: torch.Tensor, rate: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The buffered inputs followed by the new ones, cut to whole windows (the rest is kept for the next
        call), and the position of the first window."""
        first = self.count * rate
        if self.buffer_kv is not None and self.buffer_kv.shape[1]:
            kv, gate = torch.cat([self.buffer_kv, kv], dim=1), torch.cat([self.buffer_gate, gate], dim=1)
        usable = kv.shape[1] // rate * rate
        self.buffer_kv, self.buffer_gate = kv[:, usable:], gate[:, usable:]
        return kv[:, :usable], gate[:, :usable], first

    def add_entries(self, new: torch.Tensor) -> torch.Tensor:
        """Append newly emitted entries [B, w, dim]; return all of them."""
        self.entries = new if self.entries is None else torch.cat([self.entries, new], dim=1)
        self.count += new.shape[1]
        return self.entries

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.entries, self.buffer_kv, self.buffer_gate, self.overlap_kv, self.overlap_gate)
                if t is not None]


class V4LayerCache:
    """One layer: the sliding window's keys [B, <window, head_dim] and its compressors' states
    ("kv": the attention's entries, "index": the CSA indexer's keys)."""

    per_token = False

    def __init__(self, window: int, compressors: tuple[str, ...]):
        self.window = window
        self.keys: torch.Tensor | None = None
        self.states = {name: CompressorState() for name in compressors}

    def update_window(self, kv: torch.Tensor) -> torch.Tensor:
        """Store the call's keys [B, T, dim]; return those it attends to: the kept ones, then the call's."""
        full = kv if self.keys is None else torch.cat([self.keys, kv], dim=1)
        self.keys = full[:, full.shape[1] - min(full.shape[1], self.window - 1):]
        return full

    def tensors(self) -> list[torch.Tensor]:
        kept = [] if self.keys is None else [self.keys]
        return kept + [t for state in self.states.values() for t in state.tensors()]

    def bytes_per_token(self) -> int:
        return 0  # per-token growth is a compressor's, counted by the model's attention_info


class V4Cache(Cache):
    """The layers' `V4LayerCache`s; `make` rebuilds them empty (reset, crop to 0)."""

    def __init__(self, make, max_len: int):
        super().__init__(make(), max_len)
        self.make = make

    def reset(self) -> None:
        super().reset()
        self.layers = self.make()

    def restorable(self, length: int) -> int:
        return self.length if length >= self.length else 0

    def crop(self, length: int) -> None:
        if length >= self.length:
            return
        if length:
            raise ValueError(f"a DeepSeek-V4 cache cannot be cut back to {length} tokens, only emptied")
        self.reset()

    def static_view(self, length: int | None = None):
        raise LlmcliError("DeepSeek-V4 runs eagerly only: its cache grows by compressed entries, which a "
                          "compiled step cannot take (drop --compile)")

    def row_cache(self, row: int):
        raise LlmcliError("DeepSeek-V4 is not served here yet: the server steps rows of one batch cache, which its "
                          "compressed cache does not split into (use generate or chat)")
