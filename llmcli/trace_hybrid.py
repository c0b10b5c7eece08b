"""`trace` for hybrid models (Qwen3-Next, Qwen3.5): what the Gated DeltaNet and gated attention layers decide.

Per DeltaNet layer: the norm of each value head's recurrent state after the prompt and after every decode
step (the state is all the layer remembers; a head whose norm keeps growing is accumulating, one that
stays small forgets fast), the log-decay g (the state shrinks by e^g per token), the write strength beta
and how much the output gate SiLU(z) lets through, per head. Per gated attention layer: the sigmoid
output gate's mean per head. Values come from the first sequence (trace runs one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from rich.table import Table

from llmcli.models.hooks import ATTN_GATE, DELTA_BETA, DELTA_DECAY, DELTA_GATE, DELTA_STATE

HYBRID_POINTS = (DELTA_STATE, DELTA_DECAY, DELTA_BETA, DELTA_GATE, ATTN_GATE)


@dataclass
class MixerLog:
    """One layer's records: state norms per forward call [heads], the rest per token [T, heads]."""

    state_norms: list[torch.Tensor] = field(default_factory=list)
    per_token: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach()[0].float().clone()
        if name == DELTA_STATE:
            self.state_norms.append(value)
        else:
            self.per_token.setdefault(name, []).append(value)

    def tokens(self, name: str) -> torch.Tensor | None:
        parts = self.per_token.get(name)
        return torch.cat(parts).cpu() if parts else None


def _r(x: float) -> float:
    return float(f"{x:.5g}")


def _row(values: torch.Tensor) -> list[float]:
    return [_r(v) for v in values.tolist()]


def _per_head(values: torch.Tensor) -> dict:
    return {"mean": _row(values.mean(0)), "min": _row(values.amin(0)), "max": _row(values.amax(0)),
            "mean_per_token": _row(values.mean(1))}


def mixer_summary(log: MixerLog | None) -> dict:
    """The JSON fields `deltanet` and `attn_gate` of a layer (None where they do not apply)."""
    if log is None:
        return {"deltanet": None, "attn_gate": None}
    gate = log.tokens(ATTN_GATE)
    if gate is not None:
        return {"deltanet": None, "attn_gate": _per_head(gate)}
    g, beta, out_gate = (log.tokens(name) for name in (DELTA_DECAY, DELTA_BETA, DELTA_GATE))
    norms = [n.cpu() for n in log.state_norms]
    return {"attn_gate": None, "deltanet": {
        "heads": len(norms[0]) if norms else 0,
        "state_norm": _row(norms[0]) if norms else [],
        "state_norm_per_step": [_row(n) for n in norms[1:]],
        "g": _per_head(g), "decay": _row(g.exp().mean(0)),
        "beta": _per_head(beta),
        "output_gate": _per_head(out_gate),
    }}


def _spread(values: list[float]) -> str:
    return f"{sum(values) / len(values):.2g}/{max(values):.2g}"


def hybrid_table(data: dict) -> Table | None:
    """One row per DeltaNet or gated attention layer: mean over heads, and the range over heads."""
    rows = [layer for layer in data["layers"] if layer.get("deltanet") or layer.get("attn_gate")]
    if not rows:
        return None
    table = Table(title="token mixers: mean/max over heads", title_justify="left",
                  box=None, pad_edge=False)
    for name in ("layer", "mixer", "state norm", "last step", "decay e^g", "beta", "output gate"):
        table.add_column(name)
    for layer in rows:
        delta = layer.get("deltanet")
        if delta is None:
            table.add_row(str(layer["index"]), "full", "", "", "", "", _spread(layer["attn_gate"]["mean"]))
            continue
        steps = delta["state_norm_per_step"]
        table.add_row(str(layer["index"]), "linear", _spread(delta["state_norm"]),
                      _spread(steps[-1]) if steps else "", _spread(delta["decay"]),
                      _spread(delta["beta"]["mean"]), _spread(delta["output_gate"]["mean"]))
    return table
