"""The recorder of `trace --corpus`: every recorded tensor is folded into fixed-size aggregates at once, so
memory does not grow with the corpus (per layer: expert counts, gate mass, pair counts, per-label counts,
two log histograms per hook point, massive-activation counts per channel and position).

Prompts run in right-padded batches: attention is causal, so the padding after a prompt never changes
what its real tokens compute, and the driver tells the recorder (`begin`) which tokens are real; only
those are counted.
"""

from __future__ import annotations

import math

import torch

from llmcli.models.hooks import RESIDUAL_POINTS, ROUTED_OUT, ROUTER, SHARED_OUT
from llmcli.trace import score_entropy
from llmcli.workload_stats import LogHistogram

POINTS = (*RESIDUAL_POINTS, ROUTED_OUT, SHARED_OUT)  # hook points with activation statistics
MASSIVE_FACTOR = 100.0  # |x| above this many times the median |x| of the point is a massive activation
MEDIAN_SAMPLE_ROWS = 64  # tokens per batch whose |x| give the median (a sample: a full median is a sort)
MAX_LABELS = 32  # labels past this many are traced but get no statistics of their own (memory is per label)


class RoutingAgg:
    """One MoE layer's routing over every real token."""

    def __init__(self, num_experts: int):
        e = num_experts
        self.num_experts = e
        self.counts = torch.zeros(e, dtype=torch.int64)
        self.gate_mass = torch.zeros(e, dtype=torch.float64)
        self.pairs = torch.zeros(e * e, dtype=torch.int64)
        self.label_counts = torch.zeros(MAX_LABELS, e, dtype=torch.int64)
        self.entropy_sum = 0.0
        self.tokens = 0

    def add(self, choice, valid: torch.Tensor | None, labels: torch.Tensor | None) -> None:
        e = self.num_experts
        k = choice.experts.shape[-1]
        # Small per-token tensors move to the CPU first, where the indices and aggregates live.
        experts = choice.experts.reshape(-1, k).cpu()
        weights = choice.weights.reshape(-1, k).cpu()
        entropy = score_entropy(choice.scores.reshape(-1, choice.scores.shape[-1])).cpu()
        if valid is not None:
            experts, weights, entropy = experts[valid], weights[valid], entropy[valid]
        flat = experts.reshape(-1)
        self.counts += torch.bincount(flat, minlength=e)
        self.gate_mass.index_add_(0, flat, weights.reshape(-1).double().cpu())
        if k > 1:
            a, b = torch.triu_indices(k, k, 1)
            low, high = torch.minimum(experts[:, a], experts[:, b]), torch.maximum(experts[:, a], experts[:, b])
            self.pairs += torch.bincount((low * e + high).reshape(-1), minlength=e * e)
        if labels is not None:
            keep = labels >= 0
            ids = (labels[keep][:, None] * e + experts[keep]).reshape(-1)
            self.label_counts += torch.bincount(ids, minlength=MAX_LABELS * e).view(MAX_LABELS, e)
        self.entropy_sum += float(entropy.sum())
        self.tokens += experts.shape[0]


class PointAgg:
    """One hook point of one layer: per-token RMS and max |x| distributions, and massive activations."""

    def __init__(self):
        self.rms, self.max_abs = LogHistogram(), LogHistogram()
        self.massive = 0  # values above the threshold
        self.massive_tokens = 0  # tokens holding at least one
        self.channels: torch.Tensor | None = None  # [hidden] massive values per channel
        self.positions = torch.zeros(0, dtype=torch.int64)  # massive values per position in the prompt
        self.median_sum, self.median_n = 0.0, 0  # mean of the per-batch median |x| (the threshold's base)

    def add(self, x: torch.Tensor, valid: torch.Tensor | None, positions: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        hidden = x.shape[-1]
        rms = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32) / math.sqrt(hidden)
        high, low = x.amax(-1), x.amin(-1)
        rms, top = rms.cpu(), torch.maximum(high, -low).float().cpu()  # one value per token
        rows = valid
        if rows is not None:
            rms, top = rms[rows], top[rows]
        self.rms.add(rms)
        self.max_abs.add(top)
        self._massive(x, rows, top, positions)

    def _massive(self, x, rows, top, positions) -> None:
        n = top.numel()
        sample = torch.linspace(0, n - 1, min(n, MEDIAN_SAMPLE_ROWS)).long()
        sample_rows = sample if rows is None else rows[sample]
        median = float(x[sample_rows.to(x.device)].abs().float().median())
        self.median_sum += median
        self.median_n += 1
        threshold = MASSIVE_FACTOR * median
        hit = (top > threshold).nonzero().reshape(-1)
        if hit.numel() == 0 or median == 0:
            return
        source = hit if rows is None else rows[hit]
        where = (x[source.to(x.device)].abs().float() > threshold).nonzero().cpu()  # [(token, channel)]
        if self.channels is None:
            self.channels = torch.zeros(x.shape[-1], dtype=torch.int64)
        self.channels += torch.bincount(where[:, 1], minlength=x.shape[-1])
        pos = positions[hit][where[:, 0]]
        counts = torch.bincount(pos)
        if counts.numel() > self.positions.numel():
            counts[: self.positions.numel()] += self.positions
            self.positions = counts
        else:
            self.positions[: counts.numel()] += counts
        self.massive += where.shape[0]
        self.massive_tokens += hit.numel()


class WorkloadRecorder:
    """A recorder (llmcli.models.hooks) that aggregates a whole workload. Call `begin` before each forward
    call with the real length of every batch row and its label id (None: no label)."""

    def __init__(self):
        self.routing: dict[int, RoutingAgg] = {}
        self.points: dict[tuple[int, str], PointAgg] = {}
        self.label_names: list[str] = []
        self.label_tokens = torch.zeros(MAX_LABELS, dtype=torch.int64)
        self.label_prompts = torch.zeros(MAX_LABELS, dtype=torch.int64)
        self.unlabelled_overflow = 0  # prompts whose label came after MAX_LABELS others
        self._valid = self._positions = self._labels = None
        self._flat = 0

    def label_id(self, label: str | None) -> int:
        if label is None:
            return -1
        if label in self.label_names:
            return self.label_names.index(label)
        if len(self.label_names) >= MAX_LABELS:
            self.unlabelled_overflow += 1
            return -1
        self.label_names.append(label)
        return len(self.label_names) - 1

    def begin(self, lengths: list[int], width: int, labels: list[int], start: int = 0,
              new_prompt: bool = True) -> None:
        """The next call holds len(lengths) rows of `width` tokens at positions start..start+width-1; row b's
        first lengths[b] tokens are real. `new_prompt`: False for a decode step of a prompt already counted."""
        rows = len(lengths)
        length = torch.tensor(lengths)
        valid = (torch.arange(width)[None, :] < length[:, None]).reshape(-1)
        self._flat = rows * width
        self._valid = None if bool(valid.all()) else valid.nonzero().reshape(-1)
        positions = (start + torch.arange(width)).repeat(rows)
        label = torch.tensor(labels).repeat_interleave(width)
        self._positions = positions if self._valid is None else positions[self._valid]
        self._labels = None
        if any(i >= 0 for i in labels):
            self._labels = label if self._valid is None else label[self._valid]
            for i, n in zip(labels, lengths, strict=True):
                if i >= 0:
                    self.label_tokens[i] += n
                    self.label_prompts[i] += int(new_prompt)

    def record(self, layer: int | None, name: str, value) -> None:
        if layer is None:
            return  # the final norm: with last_only it holds the last position only (its input is resid_post)
        if name == ROUTER:
            agg = self.routing.get(layer)
            if agg is None:
                agg = self.routing[layer] = RoutingAgg(int(value.scores.shape[-1]))
            agg.add(value, self._valid, self._labels)
            return
        if name not in POINTS or not isinstance(value, torch.Tensor):
            return
        if value.numel() // value.shape[-1] != self._flat:
            return  # not one value per token of this call
        agg = self.points.get((layer, name))
        if agg is None:
            agg = self.points[layer, name] = PointAgg()
        agg.add(value, self._valid, self._positions)
