"""Sampled tokens -> text for one request: UTF-8-safe detokenisation and stop strings.

Text that might be the start of a stop string is held back until it is known not to be, so a client
never sees part of a stop string (the same rule as `generate.Generation`).
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop_strings=()):
        self.decoder = tokenizer.stream_decoder()
        self.stop_strings = [s for s in stop_strings if s]
        self.hold = max((len(s) for s in self.stop_strings), default=1) - 1
        self.emitted = ""  # text released so far
        self.pending = ""  # decoded, held back: it may begin a stop string
        self.stopped = False  # a stop string was found: nothing more is released

    def add(self, token: int) -> str:
        """The text that `token` releases (often "", e.g. half a character or a possible stop string)."""
        self.pending += self.decoder.add(token)
        if self._cut():
            return self._release(len(self.pending))
        return self._release(len(self.pending) - self.hold)

    def flush(self) -> str:
        """At the end: everything still held (an unfinished character as U+FFFD), up to a stop string."""
        if not self.stopped:
            self.pending += self.decoder.flush()
            self._cut()
        return self._release(len(self.pending))

    def _cut(self) -> bool:
        """Cut pending at the earliest stop string; True when one was found. The released text never holds
        a whole stop string; one may straddle the boundary."""
        if self.stopped or not self.stop_strings:
            return self.stopped
        text, offset = self.emitted + self.pending, len(self.emitted)
        found = [i for s in self.stop_strings if (i := text.find(s, max(0, offset - len(s) + 1))) != -1]
        if not found:
            return False
        self.pending = self.pending[:max(min(found) - offset, 0)]
        self.stopped = True
        return True

    def _release(self, count: int) -> str:
        if count <= 0:
            return ""
        out, self.pending = self.pending[:count], self.pending[count:]
        self.emitted += out
        return out
