"""What a recorder (`trace`, bench's expert counter) sees in a --tp/--ep run: the whole model's values, as in
one process, not one rank's part of them.

Most recorded values are whole on every rank already: the residual stream after each block's all-reduce, the
final norm, and the router's choice (the router is kept whole and reads the replicated hidden state, so every
rank picks the same experts with the same weights). Three are a rank's part and are joined before the
recorder sees them:
- the routed and the shared experts' outputs inside a MoE block: partial sums, all-reduced;
- per-head attention probabilities: query heads are split over the ranks in order, so an all-gather along the
  head dimension puts them back in head order;
- sparse attention's dense attention weights, a mean over the rank's heads: all-reduced and divided by tp.
Every rank records the same points in the same order (same prompt, same layers), so these collectives pair up.
"""

from __future__ import annotations

import dataclasses

from llmcli.backends.comm_clock import all_gather, all_reduce
from llmcli.models.hooks import ATTN_PROBS, INDEXER, ROUTED_OUT, SHARED_OUT, AttentionWeights
from llmcli.parallel_plan import Layout


def _summed(value):
    return all_reduce(value.detach().clone())


class RankRecorder:
    """Wraps a recorder for one forward call of a parallel runner."""

    def __init__(self, inner, layout: Layout):
        self.inner, self.layout = inner, layout

    @property
    def optional_points(self):
        return getattr(self.inner, "optional_points", ())

    def record(self, layer: int | None, name: str, value) -> None:
        wants = getattr(self.inner, "wants", None)
        if wants is not None and not wants(layer):  # the same answer on every rank: no collective is skipped alone
            return
        tp = self.layout.tp
        if name in (ROUTED_OUT, SHARED_OUT):
            value = _summed(value)
        elif name == ATTN_PROBS and tp > 1:
            value = AttentionWeights(all_gather(value.probs, 1), value.query_start)
        elif name == INDEXER and tp > 1:
            value = dataclasses.replace(value, attention=_summed(value.attention) / tp)
        self.inner.record(layer, name, value)
