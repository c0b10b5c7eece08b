"""The expert plan: which routed experts to keep resident under a memory budget, from measured counts.

Every routed expert of a model has the same size, so the best set under a budget is simply the busiest
(layer, expert) pairs of the whole workload, as many as fit: `budget // expert_bytes` of them (ties go to
the lower layer, then the lower expert). On the workload they came from:
  hit rate        = activations of resident experts / all activations (an activation: one token sent to
                    one expert in one layer)
  bytes per token = activations of the other experts x expert_bytes / tokens: the expert weights a token
                    needs from wherever the rest lives (disk, CPU memory), when nothing is shared between
                    tokens (batch 1 decoding; a batch shares the experts its tokens have in common)
The uniform figure (resident experts / all experts) is what the same budget would give if routing were
even: a plan pays when the measured hit rate is well above it.
The budget is for routed experts only: attention, dense layers, shared experts and the embeddings stay
resident on top of it.
"""

from __future__ import annotations

import math

import torch

from llmcli.errors import LlmcliError
from llmcli.units import parse_bytes

CURVE_SHARES = (0.05, 0.10, 0.25, 0.50, 0.75)  # resident share of all experts, for the plan's curve


def parse_size(text: str, flag: str = "--plan-memory") -> int:
    """'24GB' (10^9), '24GiB' (2^30), '512M', '1.5T', '1000' (bytes) -> bytes; an error line otherwise."""
    size = parse_bytes(text or "")
    if size is None:
        raise LlmcliError(f"{flag}: {text!r} is not a size (e.g. 24GB, 512MiB, 1.5T)", exit_code=2)
    return size


def expert_bytes(hidden_size: int, moe_intermediate_size: int, element_bytes: float) -> int:
    """One routed expert: gate, up and down projections (3 x hidden x moe_intermediate values)."""
    return math.ceil(3 * hidden_size * moe_intermediate_size * element_bytes)


def plan(layers: list[dict], tokens: int, bytes_per_expert: int, budget: int) -> dict:
    """`layers`: [{"index", "counts"}] as in trace JSON's routing section -> the plan (module docstring)."""
    if bytes_per_expert <= 0:
        raise LlmcliError("the expert size is unknown: cannot plan")
    counts = torch.tensor([layer["counts"] for layer in layers], dtype=torch.int64)  # [L, E]
    n_layers, n_experts = counts.shape
    slots = min(max(budget, 0) // bytes_per_expert, counts.numel())
    # Stable sort on the negated counts: equal counts keep (layer, expert) order.
    order = torch.sort(-counts.reshape(-1), stable=True).indices[:slots]
    resident = torch.zeros(counts.numel(), dtype=torch.bool)
    resident[order] = True
    resident = resident.view(n_layers, n_experts)
    total = int(counts.sum())
    hits = int(counts[resident].sum())
    per_layer = []
    for i, layer in enumerate(layers):
        row = counts[i]
        keep = resident[i].nonzero().reshape(-1).tolist()
        layer_total = int(row.sum())
        per_layer.append({"index": layer["index"], "resident": keep,
                          "hit_rate": int(row[resident[i]].sum()) / layer_total if layer_total else None})
    missed = total - hits
    return {
        "budget_bytes": budget,
        "expert_bytes": bytes_per_expert,
        "resident_experts": int(slots),
        "total_experts": counts.numel(),
        "resident_bytes": int(slots) * bytes_per_expert,
        "all_experts_bytes": counts.numel() * bytes_per_expert,
        "hit_rate": hits / total if total else None,
        "uniform_hit_rate": slots / counts.numel() if counts.numel() else None,
        "bytes_per_token": missed * bytes_per_expert / tokens if tokens else None,
        "bytes_per_token_without_plan": total * bytes_per_expert / tokens if tokens else None,
        "layers": per_layer,
    }


def curve(layers: list[dict], tokens: int, bytes_per_expert: int, shares=CURVE_SHARES) -> list[dict]:
    """The plan at budgets holding 5%, 10%, ... of all experts: how fast the hit rate rises."""
    total = sum(len(layer["counts"]) for layer in layers)
    out = []
    for share in shares:
        slots = max(1, round(share * total))
        p = plan(layers, tokens, bytes_per_expert, slots * bytes_per_expert)
        out.append({"share": share, "budget_bytes": p["resident_bytes"], "hit_rate": p["hit_rate"],
                    "bytes_per_token": p["bytes_per_token"]})
    return out


def plan_from_trace(data: dict, budget: int | None) -> dict:
    """The plan (and its curve) from a saved `trace --corpus --json` result."""
    routing = data.get("routing") if isinstance(data, dict) else None
    if not routing or not routing.get("layers"):
        raise LlmcliError("the trace has no routing section (a dense model, or not a `trace --corpus` JSON)")
    size = routing.get("expert_bytes")
    if not isinstance(size, int) or size <= 0:
        raise LlmcliError("the trace does not record the size of an expert (routing.expert_bytes)")
    tokens = int(routing["tokens"])
    return {"plan": plan(routing["layers"], tokens, size, budget) if budget is not None else None,
            "curve": curve(routing["layers"], tokens, size)}
