"""Formulas of `trace --corpus`: routing balance, the hot-set curve, label separation, and a bounded-memory
quantile estimator. Plain functions of counts, so each is checked against worked examples.

Balance of one layer's expert counts c_1..c_E (mean m, population standard deviation s, total C):
  cv       = s / m                                   0 when even; grows with imbalance
  jain     = C^2 / (E * sum c_i^2)                   1 when even, 1/E when one expert takes everything
  entropy  = -sum p_i ln p_i / ln E, p_i = c_i / C   1 when even, 0 when one expert takes everything
  max_min  = max c / min c                           None when some expert got no token
Coverage at x%: the share of the layer's activations that the ceil(x% of E) busiest experts took.
"""

from __future__ import annotations

import math

import torch

COVERAGE_SHARES = (0.05, 0.10, 0.25, 0.50)


def balance(counts: list[int] | torch.Tensor) -> dict:
    c = torch.as_tensor(counts, dtype=torch.float64)
    e, total = c.numel(), float(c.sum())
    if e == 0 or total == 0:
        return {"cv": None, "jain": None, "entropy": None, "max_min": None, "unused": e}
    mean = total / e
    cv = float(((c - mean) ** 2).mean().sqrt()) / mean
    jain = total * total / (e * float((c * c).sum()))
    p = c[c > 0] / total
    entropy = float(-(p * p.log()).sum()) / math.log(e) if e > 1 else 1.0
    low = float(c.min())
    return {"cv": cv, "jain": jain, "entropy": entropy, "max_min": float(c.max()) / low if low > 0 else None,
            "unused": int((c == 0).sum())}


def coverage(counts: list[int] | torch.Tensor, shares=COVERAGE_SHARES) -> dict[str, float | None]:
    """{"5%": share of activations taken by the busiest ceil(5% of E) experts, ...}."""
    c = torch.as_tensor(counts, dtype=torch.float64).sort(descending=True).values
    total = float(c.sum())
    out = {}
    for share in shares:
        top = max(1, math.ceil(share * c.numel() - 1e-9))
        out[f"{share * 100:g}%"] = float(c[:top].sum()) / total if total else None
    return out


def top_pairs(pair_counts: torch.Tensor, tokens: int, n: int = 8) -> list[dict]:
    """The `n` expert pairs most often chosen together for one token. `pair_counts`: [E, E], the pair (a, b)
    counted at [min, max]."""
    flat = pair_counts.reshape(-1)
    e = pair_counts.shape[0]
    values, index = flat.topk(min(n, flat.numel()))
    return [{"experts": [int(i) // e, int(i) % e], "count": int(v), "share": int(v) / tokens if tokens else None}
            for v, i in zip(values.tolist(), index.tolist(), strict=True) if v > 0]


def separation(label_counts: torch.Tensor, top: int = 5) -> dict:
    """Which experts tell labels apart in one layer. `label_counts`: [L, E] tokens per label and expert.

    Each label's expert distribution p_l (its counts over its total), weighted by the label's share of
    tokens w_l, and their mixture m = sum w_l p_l. The divergence is the generalised Jensen-Shannon
    divergence in bits, sum_l w_l KL(p_l || m): 0 when all labels route alike, at most log2(L). Each expert's
    part of that sum ranks the experts; for each, the label it favours most (largest p_l(e) / m(e))."""
    c = label_counts.double()
    per_label = c.sum(1)
    keep = per_label > 0
    c, per_label = c[keep], per_label[keep]
    labels = keep.nonzero().reshape(-1).tolist()
    if len(labels) < 2:
        return {"divergence": None, "experts": []}
    w = per_label / per_label.sum()
    p = c / per_label[:, None]
    m = (w[:, None] * p).sum(0)
    ratio = torch.where(p > 0, p / m.clamp_min(1e-300), torch.ones_like(p))
    terms = w[:, None] * p * ratio.log2()  # [L, E]
    part = terms.sum(0)
    order = part.argsort(descending=True)[:top].tolist()
    experts = []
    for e in order:
        if part[e] <= 0:
            break
        fav = int(ratio[:, e].argmax())
        rest = (c[:, e].sum() - c[fav, e]) / (per_label.sum() - per_label[fav]).clamp_min(1)
        experts.append({"expert": e, "label": labels[fav], "share_in_label": float(p[fav, e]),
                        "share_elsewhere": float(rest), "bits": float(part[e])})
    return {"divergence": float(part.sum()), "experts": experts}


class LogHistogram:
    """Quantiles of a stream of positive values in fixed memory: counts in bins of equal width in log10
    (`per_decade` bins per decade from 10^low to 10^high), plus the exact count, sum, min and max. A
    quantile is read as the geometric middle of its bin, so it is within half a bin of the truth: a relative
    error under 10^(1 / (2 * per_decade)) - 1 (1.2% with the default 100 bins per decade). Values at or below
    10^low (zeros included) fall in the first bin, above 10^high in the last."""

    def __init__(self, low: float = -8.0, high: float = 8.0, per_decade: int = 100):
        self.low, self.high, self.per_decade = low, high, per_decade
        self.bins = int(round((high - low) * per_decade))
        self.counts = torch.zeros(self.bins, dtype=torch.int64)
        self.count, self.total = 0, 0.0
        self.min, self.max = math.inf, -math.inf

    def add(self, values: torch.Tensor) -> None:
        v = values.detach().reshape(-1).float()
        if v.numel() == 0:
            return
        index = ((v.clamp_min(1e-30).log10() - self.low) * self.per_decade).floor().clamp(0, self.bins - 1)
        self.counts += torch.bincount(index.long().cpu(), minlength=self.bins)
        self.count += v.numel()
        self.total += float(v.sum())
        lo, hi = torch.aminmax(v)
        self.min, self.max = min(self.min, float(lo)), max(self.max, float(hi))

    def quantile(self, q: float) -> float | None:
        if self.count == 0:
            return None
        rank = q * (self.count - 1) + 1  # the ceil(rank)-th smallest value's bin
        cumulative = torch.cumsum(self.counts, 0)
        b = int(torch.searchsorted(cumulative, torch.tensor(math.ceil(rank - 1e-9)), right=False))
        middle = 10 ** (self.low + (b + 0.5) / self.per_decade)
        return min(max(middle, self.min), self.max)  # never outside what was seen

    def summary(self) -> dict:
        if self.count == 0:
            return {"mean": None, "p50": None, "p99": None, "max": None}
        return {"mean": self.total / self.count, "p50": self.quantile(0.5), "p99": self.quantile(0.99),
                "max": self.max}
