"""`trace --corpus --json`: the aggregates of a workload run as one JSON-ready dict (schema in the README).

MoE layers are listed by their model index; `routing` is None for a dense model. Counts are exact; the
activation quantiles come from log histograms (llmcli.workload_stats.LogHistogram, within 1.2%).
"""

from __future__ import annotations

import math

from llmcli import expert_plan
from llmcli.corpus import CorpusReader
from llmcli.workload import WorkloadRun
from llmcli.workload_recorder import MASSIVE_FACTOR, POINTS, PointAgg, RoutingAgg
from llmcli.workload_stats import balance, coverage, separation, top_pairs

ESTIMATOR = "log10 histogram, 100 bins per decade over 1e-8..1e8; quantiles within 1.2%, max exact"


def _r(x):
    """7 significant digits: the float32 values do not hold more."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return float(f"{x:.7g}") if isinstance(x, float) else x


def _rd(d: dict) -> dict:
    return {k: _r(v) for k, v in d.items()}


def routing_layer(index: int, agg: RoutingAgg, points: dict) -> dict:
    counts = agg.counts.tolist()
    shared, routed = points.get((index, "shared_out")), points.get((index, "routed_out"))
    return {
        "index": index,
        "counts": counts,
        "gate_mass": [_r(v) for v in agg.gate_mass.tolist()],
        **_rd(balance(counts)),
        "coverage": _rd(coverage(counts)),
        "pairs": [{**p, "share": _r(p["share"])} for p in top_pairs(agg.pairs.view(agg.num_experts, -1), agg.tokens)],
        "router_entropy": _r(agg.entropy_sum / agg.tokens) if agg.tokens else None,
        "router_entropy_max": _r(math.log(agg.num_experts)),
        "shared_rms": _r(shared.rms.summary()["mean"]) if shared else None,
        "routed_rms": _r(routed.rms.summary()["mean"]) if routed else None,
    }


def label_sections(rec) -> tuple[dict | None, list | None]:
    names = rec.label_names
    if not names:
        return None, None
    labels = {}
    for i, name in enumerate(names):
        layers = []
        for index, agg in sorted(rec.routing.items()):
            counts = agg.label_counts[i].tolist()
            layers.append({"index": index, "counts": counts, **_rd(balance(counts)), "coverage": _rd(coverage(counts))})
        labels[name] = {"prompts": int(rec.label_prompts[i]), "tokens": int(rec.label_tokens[i]), "layers": layers}
    sep = []
    for index, agg in sorted(rec.routing.items()):
        s = separation(agg.label_counts[: len(names)])
        experts = [{**_rd(e), "label": names[e["label"]]} for e in s["experts"]]
        sep.append({"index": index, "divergence": _r(s["divergence"]), "experts": experts})
    return labels, sep


def point_json(agg: PointAgg) -> dict:
    channels = []
    if agg.channels is not None:
        values, idx = agg.channels.topk(min(8, agg.channels.numel()))
        channels = [[int(i), int(v)] for v, i in zip(values.tolist(), idx.tolist(), strict=True) if v > 0]
    positions = []
    if agg.positions.numel():
        values, idx = agg.positions.topk(min(8, agg.positions.numel()))
        positions = [[int(i), int(v)] for v, i in zip(values.tolist(), idx.tolist(), strict=True) if v > 0]
    return {
        "tokens": agg.rms.count,
        "rms": _rd(agg.rms.summary()),
        "max_abs": _rd(agg.max_abs.summary()),
        "massive": {"values": agg.massive, "tokens": agg.massive_tokens,
                    "median_abs": _r(agg.median_sum / agg.median_n) if agg.median_n else None,
                    "channels": channels, "positions": positions},
    }


def activations_json(rec) -> dict:
    layers: dict[int, dict] = {}
    for (index, name), agg in rec.points.items():
        layers.setdefault(index, {})[name] = point_json(agg)
    ordered = [{"index": i, "points": {n: layers[i][n] for n in POINTS if n in layers[i]}} for i in sorted(layers)]
    return {"estimator": ESTIMATOR, "massive_factor": MASSIVE_FACTOR, "layers": ordered}


def build_workload_json(run: WorkloadRun, reader: CorpusReader, model_name: str, *, expert_size: int | None,
                        plan_budget: int | None = None, settings: dict | None = None) -> dict:
    rec = run.recorder
    tokens = run.tokens + run.generated
    corpus = {"format": reader.format, "prompts": run.prompts, "tokens": run.tokens, "generated": run.generated,
              "skipped": reader.skipped_total, "skip_reasons": dict(reader.skipped),
              "skipped_examples": [{"line": n, "reason": r} for n, r in reader.examples],
              "budget_reached": run.budget_reached, "seconds": _r(run.seconds),
              "tokens_per_second": _r(tokens / run.seconds) if run.seconds else None,
              "labels_over_limit": rec.unlabelled_overflow}
    routing = None
    if rec.routing:
        first = next(iter(rec.routing.values()))
        labels, sep = label_sections(rec)
        k = int(first.counts.sum()) // first.tokens if first.tokens else None
        routing = {"tokens": first.tokens, "prompts": run.prompts, "skipped": reader.skipped_total,
                   "num_experts": first.num_experts, "experts_per_token": k, "expert_bytes": expert_size,
                   "layers": [routing_layer(i, agg, rec.points) for i, agg in sorted(rec.routing.items())],
                   "labels": labels, "separation": sep}
    data = {"model": model_name, "settings": dict(settings or {}), "corpus": corpus, "routing": routing,
            "activations": activations_json(rec), "plan": None, "plan_curve": None}
    if routing and expert_size:
        planned = expert_plan.plan_from_trace(data, plan_budget)
        data["plan"], data["plan_curve"] = planned["plan"], planned["curve"]
    return data
