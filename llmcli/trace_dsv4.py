"""`trace` for DeepSeek-V4's layers: what the compressed branches held and chose, how much attention the
sinks absorbed, and how the hyper-connections mixed the residual streams.

Per layer (JSON `v4`):
  kind           sliding_attention, compressed_sparse_attention (CSA) or heavily_compressed_attention (HCA)
  entries        compressed entries held after each call (prompt, then each decode step)
  selected       CSA: per query, the entries its indexer kept (entry w pools tokens w*rate-rate .. w*rate+rate-1)
  sink_mass      per head, the mean probability its sink took over every traced query
  comb_attn/ffn  the hyper-connections' stream mixing matrices (n x n), mean over tokens: entry [j][k] is how
                 much of old stream j flows into new stream k
  pre_attn, post_attn  mean weights collapsing the streams into attention's input / spreading its output
  stream_rms     per stream, the RMS of the residual after the layer (mean over tokens)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmcli.models.v4_hooks import HC_MIXING, CompressedRecord, MixingRecord


@dataclass
class V4Log:
    kind: str | None = None
    entries: list[int] = field(default_factory=list)
    selected: list[list[int]] = field(default_factory=list)
    sink: list[torch.Tensor] = field(default_factory=list)  # [H, T] per call
    mixing: list[MixingRecord] = field(default_factory=list)

    def add(self, name: str, value) -> None:
        """One forward call's record (the first sequence: trace runs one)."""
        if name == HC_MIXING:
            self.mixing.append(MixingRecord(*(t[0].detach().float().cpu() for t in (
                value.attn_comb, value.ffn_comb, value.attn_pre, value.attn_post, value.stream_rms))))
            return
        record: CompressedRecord = value
        self.kind = record.kind
        self.entries.append(record.entries)
        self.sink.append(record.sink_mass[0].detach().float().cpu())
        if record.indices is not None:
            indices, valid = record.indices[0].cpu(), record.valid[0].cpu()
            self.selected += [row[ok].tolist() for row, ok in zip(indices, valid, strict=True)]


def _r(x: float) -> float:
    return float(f"{x:.7g}")


def _mean_over_tokens(parts: list[torch.Tensor]) -> list:
    values = torch.cat(parts, dim=0).mean(0)
    return [_r(v) for v in values.tolist()] if values.dim() == 1 else [[_r(v) for v in row] for row in values.tolist()]


def v4_summary(log: V4Log | None) -> dict:
    """{"v4": ...} for a V4 layer's JSON, {} for any other model's layer."""
    if log is None:
        return {}
    out = {"kind": log.kind, "entries": log.entries, "selected": log.selected or None,
           "sink_mass": [_r(v) for v in torch.cat(log.sink, dim=1).mean(1).tolist()] if log.sink else None}
    if log.mixing:
        out.update(comb_attn=_mean_over_tokens([m.attn_comb for m in log.mixing]),
                   comb_ffn=_mean_over_tokens([m.ffn_comb for m in log.mixing]),
                   pre_attn=_mean_over_tokens([m.attn_pre for m in log.mixing]),
                   post_attn=_mean_over_tokens([m.attn_post for m in log.mixing]),
                   stream_rms=_mean_over_tokens([m.stream_rms for m in log.mixing]))
    return {"v4": out}
