"""The cache of a hybrid model (Qwen3-Next, Qwen3.5): keys and values for its full-attention layers, and for
each Gated DeltaNet layer a fixed-size state (the conv's last inputs and the float32 recurrent state).

A recurrent state cannot be cut back: it holds a whole prefix folded together. So `crop` returns to a
snapshot taken earlier (at the end of each prompt and wherever `mark` is called, e.g. a chat turn's end),
and `restorable` tells a caller the longest prefix it can return to; what lies past it is fed again.
"""

from __future__ import annotations

import torch

from llmcli.models.cache import Cache

MAX_SNAPSHOTS = 4  # the latest few turn boundaries; older ones are rarely a common prefix


class RecurrentLayerCache:
    """One DeltaNet layer: `conv` [B, channels, Kc-1] in the model dtype (the inputs the causal conv still
    reads) and `state` [B, value_heads, dk, dv] in float32. Both are per sequence, not per token."""

    per_token = False

    def __init__(self, batch: int, channels: int, width: int, heads: int, dk: int, dv: int, dtype, device):
        self.conv = torch.zeros(batch, channels, width - 1, dtype=dtype, device=device)
        self.state = torch.zeros(batch, heads, dk, dv, dtype=torch.float32, device=device)

    def prefix_view(self, length: int) -> RecurrentLayerCache:
        return self  # the state is the same whatever the length

    def rows_view(self, first: int, end: int, length: int | None = None) -> RecurrentLayerCache:
        """Batch rows first..end-1 (writes land in this cache); `length` means nothing to a state."""
        view = object.__new__(RecurrentLayerCache)
        view.conv, view.state = self.conv[first:end], self.state[first:end]
        return view

    def tensors(self) -> list[torch.Tensor]:
        return [self.conv, self.state]

    def bytes_per_token(self) -> int:
        return 0

    def bytes_per_sequence(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.tensors())

    def clear(self) -> None:
        with torch.inference_mode():  # caches are made in inference mode; a reset may come from outside it
            for tensor in self.tensors():
                tensor.zero_()


class HybridCache(Cache):
    """Layers are `KVLayerCache`s and `RecurrentLayerCache`s, in the model's layer order."""

    def __init__(self, layers: list, max_len: int):
        super().__init__(layers, max_len)
        self.recurrent = [layer for layer in layers if isinstance(layer, RecurrentLayerCache)]
        self.snapshots: dict[int, list[torch.Tensor]] = {}  # length -> copies of the recurrent tensors
        self.writing = False  # a forward call began and has not finished: the states are half updated

    def begin(self) -> None:
        """A forward call starts writing the states (its `advance` ends that)."""
        self.writing = True

    def advance(self, count: int) -> None:
        super().advance(count)
        self.writing = False
        if count > 1:  # the end of a prompt: where a conversation's next turn may pick up
            self.mark()

    def mark(self) -> None:
        if self.writing or not self.length:
            return
        self.snapshots.pop(self.length, None)
        self.snapshots[self.length] = [t.clone() for layer in self.recurrent for t in layer.tensors()]
        while len(self.snapshots) > MAX_SNAPSHOTS:
            del self.snapshots[next(iter(self.snapshots))]

    def restorable(self, length: int) -> int:
        if length >= self.length and not self.writing:
            return self.length
        return max((n for n in self.snapshots if n <= length), default=0)

    def crop(self, length: int) -> None:
        """Return to the first `length` tokens: the present length, or a snapshot's (see `restorable`)."""
        if length >= self.length and not self.writing:
            return
        if length not in self.snapshots:
            raise ValueError(f"a recurrent state cannot be cut back to {length} tokens (no snapshot there)")
        with torch.inference_mode():  # as in `clear`
            for tensor, saved in zip((t for layer in self.recurrent for t in layer.tensors()),
                                     self.snapshots[length], strict=True):
                tensor.copy_(saved)  # in place: a compiled step reads these tensors where they are
        self.snapshots = {n: s for n, s in self.snapshots.items() if n <= length}
        self.length, self.writing = length, False

    def reset(self) -> None:
        super().reset()
        for layer in self.recurrent:
            layer.clear()
        self.snapshots.clear()
        self.writing = False

    def bytes_per_sequence(self) -> int:
        """The constant part: every DeltaNet layer's conv and recurrent state, for one sequence."""
        return sum(layer.bytes_per_sequence() for layer in self.recurrent)
