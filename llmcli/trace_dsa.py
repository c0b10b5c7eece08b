"""`trace` for sparse attention layers (DeepSeek V3.2's DSA): which earlier tokens the indexer kept for each
query, how they compare with the tokens dense attention would weigh most, and how peaked the index scores are.

Per query (every traced token, prompt then decode steps, in position order):
  selected     the positions kept (at most index_topk), best index score first
  overlap      the fraction of them among the same number of positions that dense MLA (the layer's own
               attention without the selection, averaged over heads) weighs most: 1.0 = the indexer kept
               exactly what dense attention looks at
  entropy      of the softmax of the index scores over the visible positions (nats; max = ln(visible))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from llmcli.models.hooks import IndexerChoice


@dataclass
class IndexerLog:
    selected: list[list[int]] = field(default_factory=list)
    visible: list[int] = field(default_factory=list)
    overlap: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    topk: int = 0

    def add(self, choice: IndexerChoice) -> None:
        """Reduce one forward call's choice (the first sequence: trace runs one) to per-query numbers."""
        indices, valid = choice.indices[0].cpu(), choice.valid[0].cpu()
        scores, attention = choice.scores[0].float().cpu(), choice.attention[0].float().cpu()
        self.topk = max(self.topk, indices.shape[-1])
        visible = torch.isfinite(scores)
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
        dense_order = attention.masked_fill(~visible, -1.0).argsort(dim=-1, descending=True, stable=True)
        for t in range(indices.shape[0]):
            kept = indices[t][valid[t]].tolist()
            top = set(dense_order[t, : len(kept)].tolist())
            self.selected.append(kept)
            self.visible.append(int(visible[t].sum()))
            self.overlap.append(len(top.intersection(kept)) / len(kept) if kept else 1.0)
            self.entropy.append(float(entropy[t]))


def _r(x: float) -> float:
    return float(f"{x:.7g}")


def indexer_summary(log: IndexerLog) -> dict:
    """The JSON of one layer's indexer (schema in the README's trace section)."""
    sparse = [i for i, (kept, seen) in enumerate(zip(log.selected, log.visible, strict=True)) if len(kept) < seen]
    return {
        "topk": log.topk,
        "selected": log.selected,
        "visible": log.visible,
        "overlap": [_r(x) for x in log.overlap],
        "entropy": [_r(x) for x in log.entropy],
        "max_entropy": [_r(math.log(n)) if n else 0.0 for n in log.visible],
        "sparse_queries": len(sparse),  # queries that saw more positions than the indexer keeps
        "mean_overlap": _r(sum(log.overlap[i] for i in sparse) / len(sparse)) if sparse else None,
        "mean_entropy": _r(sum(log.entropy) / len(log.entropy)) if log.entropy else None,
    }


def positions_text(positions: list[int], limit: int = 16) -> str:
    """Sorted positions as ranges ("0-3,7,9-12"), cut after `limit` items with the count left."""
    items, run = [], []
    for p in sorted(positions):
        if run and p == run[-1] + 1:
            run.append(p)
            continue
        if run:
            items.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [p]
    if run:
        items.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    shown = ",".join(items[:limit])
    return shown + (f",… (+{len(items) - limit})" if len(items) > limit else "")
