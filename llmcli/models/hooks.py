"""Hook points: the names under which a model hands intermediate values to a recorder (`trace`, `bench`).

Defined once here and imported by the models, `trace` and `bench`. A recorder is any object with
`record(layer, name, value)`; `layer` is None for points outside the decoder layers. Recording observes
only: a model computes the same logits with and without a recorder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

# The residual stream of every decoder layer, in the order they occur (TransformerLens' vocabulary).
RESID_PRE = "resid_pre"  # the layer's input
ATTN_OUT = "attn_out"  # what attention adds
RESID_MID = "resid_mid"  # after attention
MLP_OUT = "mlp_out"  # what the MLP (or MoE) adds
RESID_POST = "resid_post"  # the layer's output
RESIDUAL_POINTS = (RESID_PRE, ATTN_OUT, RESID_MID, MLP_OUT, RESID_POST)

# MoE layers.
ROUTER = "router"  # a RouterChoice
ROUTED_OUT = "routed_out"  # the routed experts' weighted sum
SHARED_OUT = "shared_out"  # the shared experts' output

FINAL_NORM = "final_norm"  # the final norm's output (layer None)

# Sparse attention layers (DeepSeek V3.2).
INDEXER = "indexer"  # an IndexerChoice
# Hybrid (Gated DeltaNet) models: what their token mixers decide, per head.
DELTA_STATE = "delta_state_norm"  # [B, nv] Frobenius norm of each value head's recurrent state after the call
DELTA_DECAY = "delta_g"  # [B, T, nv] log-decay g (<= 0): the state is multiplied by e^g per token
DELTA_BETA = "delta_beta"  # [B, T, nv] write strength beta in (0, 1)
DELTA_GATE = "delta_gate"  # [B, T, nv] mean |SiLU(z)|: how much of each head's output the gate lets through
ATTN_GATE = "attn_gate"  # [B, T, heads] mean sigmoid output gate of a gated full-attention layer

# Costly points: a model computes them only for a recorder that lists them in `optional_points`.
ATTN_PROBS = "attn_probs"  # an AttentionWeights (an extra QK^T beside the fused attention kernel)


class Recorder(Protocol):
    def record(self, layer: int | None, name: str, value) -> None: ...


@dataclass
class RouterChoice:
    """What a MoE router decided for each token, recorded for `trace` (nothing is recomputed)."""

    experts: torch.Tensor  # [T, k] expert ids, highest weight first
    weights: torch.Tensor  # [T, k] the weights the expert outputs are mixed with
    scores: torch.Tensor  # [T, E] router probabilities (softmax or sigmoid), before any choice bias
    groups: torch.Tensor | None = None  # [T, topk_group] groups kept by group-limited routing


@dataclass
class AttentionWeights:
    """Every query's attention distribution over the keys, computed beside (not instead of) the kernel."""

    probs: torch.Tensor  # [B, H, T, total] float32; masked keys hold 0
    query_start: int  # position of the first query (keys are positions 0..total-1)


def asks(recorder: Recorder | None, name: str) -> bool:
    """Does the recorder want the costly point `name`? (Plain recorders never do.)"""
    return recorder is not None and name in getattr(recorder, "optional_points", ())


def record_residuals(recorder: Recorder | None, index: int, resid_pre, attn_out, resid_mid, mlp_out,
                     resid_post) -> None:
    """Hand a decoder layer's residual points to the recorder; a no-op without one."""
    if recorder is not None:
        for name, value in zip(RESIDUAL_POINTS, (resid_pre, attn_out, resid_mid, mlp_out, resid_post), strict=True):
            recorder.record(index, name, value)


@dataclass
class IndexerChoice:
    """What a sparse attention layer's indexer chose for each query of one forward call (for `trace`)."""

    indices: torch.Tensor  # [B, T, k] selected key positions, best first
    valid: torch.Tensor  # [B, T, k] False where a selection is not visible (fewer than k keys precede)
    scores: torch.Tensor  # [B, T, S] index scores, -inf where hidden
    attention: torch.Tensor  # [B, T, S] dense MLA's attention weights without the selection, mean over heads
