"""Hook points of DeepSeek-V4's layers (beside `models.hooks`' shared ones), for `trace` (llmcli.trace_dsv4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

V4_ATTENTION = "v4_attention"  # a CompressedRecord
HC_MIXING = "hc_mixing"  # a MixingRecord
V4_POINTS = (V4_ATTENTION, HC_MIXING)


@dataclass
class CompressedRecord:
    """One attention call of a V4 layer: what it could attend to besides its sliding window."""

    kind: str  # sliding_attention, compressed_sparse_attention, heavily_compressed_attention
    entries: int  # compressed entries held after the call
    sink_mass: torch.Tensor  # [B, H, T] probability each head's sink took (dropped from the output)
    indices: torch.Tensor | None = None  # CSA: [B, T, k] entries the indexer picked, best first
    valid: torch.Tensor | None = None  # CSA: [B, T, k] picks complete before their query


@dataclass
class MixingRecord:
    """A layer's hyper-connection weights for the call's tokens (float32) and its output streams' RMS."""

    attn_comb: torch.Tensor  # [B, T, n, n] mixing of the residual streams around attention
    ffn_comb: torch.Tensor  # [B, T, n, n] ... around the MoE
    attn_pre: torch.Tensor  # [B, T, n] weights collapsing the streams into attention's input
    attn_post: torch.Tensor  # [B, T, n] weights spreading attention's output over the streams
    stream_rms: torch.Tensor  # [B, T, n] RMS of each residual stream after the layer
