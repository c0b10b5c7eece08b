"""DeepSeek-V4's attention: a sliding window plus, in compressed layers, pooled entries of past windows.

Every layer has one key per token (K = V, one head for all query heads: `kv_proj` -> RMSNorm -> RoPE on the
trailing rope dims, interleaved pairs) and attends to the last `sliding_window` of them. A per-head sink
logit joins each softmax and takes its share of the mass away. Since the values carried RoPE, the output's
rope dims are rotated back by the query's position; the heads then go through the grouped output projection
(`o_a_proj` per group of heads, then `o_b_proj`).

Compressed layers add entries (see `Compressor`): HCA pools windows of 128 tokens, and every query sees
all complete windows before it; CSA pools overlapping windows of 2 x 4 tokens with stride 4, and each
query sees only the `index_topk` entries its lightning indexer scores best (`Indexer`: ReLU'd dot
products of a few heads with its own compressed keys, weighted per head and token). Compressed layers use
the "compress" RoPE (its own base, YaRN), sliding-only layers the plain "main" one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.models.hyper_connections import FloatRMSNorm, unweighted_rms
from llmcli.models.rope import pair_cos_sin
from llmcli.models.v4_cache import CompressorState, V4LayerCache
from llmcli.models.v4_hooks import V4_ATTENTION, CompressedRecord

QUERY_BLOCK = 256  # a prompt's queries per block: scores stay [B, H, 256, 256 + window + entries]


class Rope(NamedTuple):
    """One RoPE variant's frequencies [rope/2] and the dtype its cos/sin are rounded to (transformers')."""

    inv_freq: torch.Tensor
    dtype: torch.dtype

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pair_cos_sin(positions, self.inv_freq, 1.0, self.dtype)


def rotate_trailing(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the trailing 2 * cos.shape[-1] dims of x, pairs (2i, 2i+1) rotated in place (the layout
    stays interleaved: the output projection reads it), in float32. cos/sin broadcast to x[..., :rope/2]."""
    rope = 2 * cos.shape[-1]
    pairs = x[..., -rope:].float().unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.float(), sin.float()
    rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat([x[..., :-rope], rotated.to(x.dtype)], dim=-1)


class Compressor(nn.Module):
    """Pools every window of `rate` tokens into one entry of `dim` values: a per-channel softmax over the
    window of gate + position bias weighs the projected values; RMSNorm, then RoPE at the window's first
    position. `overlap` (CSA): projections are 2 x dim wide; entry w pools the first halves of window w-1
    and the second halves of window w (2 x rate slots)."""

    def __init__(self, hidden: int, dim: int, rate: int, overlap: bool, eps: float):
        super().__init__()
        self.dim, self.rate, self.overlap = dim, rate, overlap
        width = 2 * dim if overlap else dim
        self.kv_proj = nn.Linear(hidden, width, bias=False)
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.position_bias = nn.Parameter(torch.empty(rate, width))
        self.kv_norm = FloatRMSNorm(dim, eps)

    def compress(self, x: torch.Tensor, state: CompressorState, rope: Rope) -> torch.Tensor:
        """Feed the call's tokens x [B, T, hidden]; return every entry emitted so far [B, W, dim]."""
        kv, gate, first = state.take_windows(self.kv_proj(x), self.gate_proj(x), self.rate)
        b, windows = x.shape[0], kv.shape[1] // self.rate
        if not windows:
            return state.entries if state.entries is not None else kv.new_zeros(b, 0, self.dim)
        kv = kv.view(b, windows, self.rate, -1)
        gate = gate.view(b, windows, self.rate, -1) + self.position_bias
        if self.overlap:
            kv, gate = self._overlapping(kv, gate, state)
        weights = gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)
        pooled = self.kv_norm((kv * weights).sum(dim=2))
        cos, sin = rope.at(first + torch.arange(windows, device=x.device) * self.rate)
        return state.add_entries(rotate_trailing(pooled, cos, sin))

    def _overlapping(self, kv: torch.Tensor, gate: torch.Tensor, state: CompressorState):
        """[B, W, rate, 2 dim] -> [B, W, 2 rate, dim]: window w-1's first halves, then window w's second
        halves. The first window's predecessor is the one kept from the previous call (none: weight 0)."""
        b, windows, rate, _ = kv.shape
        d = self.dim
        slots_kv = kv.new_zeros(b, windows, 2 * rate, d)
        slots_gate = gate.new_full((b, windows, 2 * rate, d), float("-inf"))
        slots_kv[:, :, rate:], slots_gate[:, :, rate:] = kv[..., d:], gate[..., d:]
        slots_kv[:, 1:, :rate], slots_gate[:, 1:, :rate] = kv[:, :-1, :, :d], gate[:, :-1, :, :d]
        if state.overlap_kv is not None:
            slots_kv[:, 0, :rate] = state.overlap_kv.to(kv.dtype)
            slots_gate[:, 0, :rate] = state.overlap_gate.to(gate.dtype)
        state.overlap_kv, state.overlap_gate = kv[:, -1, :, :d].clone(), gate[:, -1, :, :d].clone()
        return slots_kv, slots_gate


class Scorer(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.weights_proj = nn.Linear(hidden, heads, bias=False)


class Choice(NamedTuple):
    """What a CSA indexer chose for the call's queries: entry indices [B, T, k], best first, and which of
    them are real picks (valid [B, T, k]: complete before the query)."""

    indices: torch.Tensor
    valid: torch.Tensor


class Indexer(Compressor):
    """CSA's lightning indexer: its own overlapping compressor (keys of `dim` values) and `heads` queries
    from the attention's query latent c_q. score(t, w) = sum_h weight(x_t)_h * relu(q_t,h . key_w) / sqrt(dim),
    weights scaled by heads^-1/2; each query keeps its `topk` best complete entries."""

    def __init__(self, hidden: int, q_lora_rank: int, heads: int, dim: int, rate: int, topk: int, eps: float):
        super().__init__(hidden, dim, rate, True, eps)
        self.heads, self.topk = heads, topk
        self.q_b_proj = nn.Linear(q_lora_rank, heads * dim, bias=False)
        self.scorer = Scorer(hidden, heads)

    def choose(self, x, c_q, positions, state: CompressorState, rope: Rope) -> Choice:
        keys = self.compress(x, state, rope).float().transpose(-1, -2)[:, None]  # [B, 1, dim, W]
        b, t, _ = x.shape
        cos, sin = rope.at(positions)
        q = rotate_trailing(self.q_b_proj(c_q).view(b, t, self.heads, self.dim), cos[:, None], sin[:, None])
        weights = self.scorer.weights_proj(x).float() * self.heads ** -0.5
        complete = (positions + 1) // self.rate  # entries wholly in each query's past
        entry = torch.arange(keys.shape[-1], device=x.device)
        picks = []
        for a in range(0, t, QUERY_BLOCK):  # the [queries, heads, entries] products of a block at a time
            products = torch.matmul(q[:, a:a + QUERY_BLOCK].float(), keys)  # [B, block, heads, W]
            scores = (F.relu(products) * self.dim ** -0.5 * weights[:, a:a + QUERY_BLOCK, :, None]).sum(dim=2)
            scores = scores.masked_fill(entry >= complete[a:a + QUERY_BLOCK, None], float("-inf"))
            picks.append(scores.topk(min(self.topk, keys.shape[-1]), dim=-1).indices)
        indices = torch.cat(picks, dim=1)
        return Choice(indices, indices < complete[:, None])


def sink_attention(q: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, sinks: torch.Tensor,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, T, H, D] over keys = values [B, S, D] where allowed [B, T, S]; each head's softmax also holds its
    sink logit, whose mass is dropped. Returns (output [B, T, H, D], the sinks' mass [B, H, T]), float32 math."""
    logits = torch.matmul(q.float().transpose(1, 2), keys.float().transpose(-1, -2)[:, None]) * scale
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    b, h, t, _ = logits.shape
    combined = torch.cat([logits, sinks.float().view(1, h, 1, 1).expand(b, h, t, 1)], dim=-1)
    combined = combined - combined.amax(dim=-1, keepdim=True)
    probs = combined.softmax(dim=-1)[..., :-1]
    out = torch.matmul(probs, keys.float()[:, None])  # [B, H, T, D]
    return out.transpose(1, 2).to(q.dtype), 1 - probs.sum(-1)


def windowed_attention(q: torch.Tensor, keys: torch.Tensor, window: int, entries: torch.Tensor | None,
                       visible: torch.Tensor | None, sinks: torch.Tensor, scale: float):
    """The call's T queries [B, T, H, D] over the window keys [B, N, D] (ending with the call's own T, in
    position order) and the compressed entries [B, W, D] each sees (visible [B, T, W]), QUERY_BLOCK queries
    at a time: a block reads only the keys its window reaches. Returns (output, sink mass [B, H, T])."""
    b, t = q.shape[:2]
    offset = keys.shape[1] - t  # keys index of the call's first query
    outs, masses = [], []
    for a in range(0, t, QUERY_BLOCK):
        end = min(a + QUERY_BLOCK, t)
        lo, hi = max(0, offset + a - window + 1), offset + end
        distance = torch.arange(offset + a, hi, device=q.device)[:, None] - torch.arange(lo, hi, device=q.device)
        allowed = ((distance >= 0) & (distance < window)).expand(b, -1, -1)
        block_keys = keys[:, lo:hi]
        if entries is not None:
            block_keys = torch.cat([block_keys, entries], dim=1)
            allowed = torch.cat([allowed, visible[:, a:end]], dim=-1)
        out, mass = sink_attention(q[:, a:end], block_keys, allowed, sinks, scale)
        outs.append(out)
        masses.append(mass)
    return torch.cat(outs, dim=1), torch.cat(masses, dim=-1)


class CompressedAttention(nn.Module):
    """One V4 attention layer of kind `kind` (sliding_attention, compressed_sparse_attention or
    heavily_compressed_attention); attribute names are transformers'."""

    def __init__(self, cfg, settings, index: int):
        super().__init__()
        self.index, self.kind = index, settings.layer_types[index]
        self.heads, self.head_dim, self.eps = cfg.num_heads, cfg.head_dim, cfg.rms_norm_eps
        self.window, self.groups = settings.sliding_window, settings.o_groups
        self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
        self.q_a_norm = FloatRMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.heads * self.head_dim, bias=False)
        self.kv_proj = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.kv_norm = FloatRMSNorm(self.head_dim, cfg.rms_norm_eps)
        group_in = self.heads * self.head_dim // self.groups
        self.o_a_proj = nn.Linear(group_in, self.groups * settings.o_lora_rank, bias=False)
        self.o_b_proj = nn.Linear(self.groups * settings.o_lora_rank, cfg.hidden_size, bias=False)
        self.sinks = nn.Parameter(torch.empty(self.heads))
        rate = settings.rate(index)
        self.compressor = Compressor(cfg.hidden_size, self.head_dim, rate, self.csa, cfg.rms_norm_eps) \
            if rate else None
        if self.csa:
            self.compressor.indexer = Indexer(cfg.hidden_size, cfg.q_lora_rank, settings.index_n_heads,
                                              settings.index_head_dim, rate, settings.index_topk, cfg.rms_norm_eps)

    @property
    def csa(self) -> bool:
        return self.kind == "compressed_sparse_attention"

    def forward(self, x, rope: Rope, positions: torch.Tensor, layer_cache: V4LayerCache,
                recorder=None) -> torch.Tensor:
        b, t, _ = x.shape
        cos, sin = rope.at(positions)
        c_q = self.q_a_norm(self.q_a_proj(x))
        q = unweighted_rms(self.q_b_proj(c_q).view(b, t, self.heads, self.head_dim), self.eps)
        q = rotate_trailing(q, cos[:, None], sin[:, None])
        keys = layer_cache.update_window(rotate_trailing(self.kv_norm(self.kv_proj(x)), cos, sin))
        record = CompressedRecord(self.kind, 0, None)
        entries = visible = None
        if self.compressor is not None:
            entries, visible = self._compressed(x, c_q, positions, layer_cache, rope, record)
        out, record.sink_mass = windowed_attention(q, keys, self.window, entries, visible, self.sinks,
                                                   self.head_dim ** -0.5)
        if recorder is not None:
            recorder.record(self.index, V4_ATTENTION, record)
        out = rotate_trailing(out, cos[:, None], -sin[:, None])  # the values' rotation, undone at the query
        return self.grouped_output(out.reshape(b, t, -1))

    def _compressed(self, x, c_q, positions, layer_cache: V4LayerCache, rope: Rope, record: CompressedRecord):
        """The layer's compressed entries [B, W, head_dim] and which each query sees [B, T, W]; for a CSA decode
        step only the entries its indexer picked [B, k, head_dim] (valid [B, 1, k])."""
        entries = self.compressor.compress(x, layer_cache.states["kv"], rope)
        count = record.entries = entries.shape[1]
        if not self.csa:  # HCA: every complete window before the query
            complete = (positions + 1) // self.compressor.rate
            visible = torch.arange(count, device=x.device)[None] < complete[:, None]
            return entries, visible.expand(x.shape[0], -1, -1)
        choice = self.compressor.indexer.choose(x, c_q, positions, layer_cache.states["index"], rope)
        record.indices, record.valid = choice.indices, choice.valid
        if x.shape[1] == 1:  # a decode step attends to its picks only: O(index_topk), whatever the context
            picked = entries.gather(1, choice.indices[:, 0, :, None].expand(-1, -1, entries.shape[-1]))
            return picked, choice.valid
        visible = torch.zeros(*choice.indices.shape[:2], count, dtype=torch.bool, device=x.device)
        visible.scatter_(-1, choice.indices, choice.valid)
        return entries, visible

    def grouped_output(self, out: torch.Tensor) -> torch.Tensor:
        """[B, T, heads * head_dim] in `groups` contiguous groups, each through its slice of o_a_proj
        (weight [groups * rank, group_in] read as [groups, rank, group_in]), then o_b_proj."""
        b, t, _ = out.shape
        weight = self.o_a_proj.weight.view(self.groups, -1, out.shape[-1] // self.groups)
        grouped = torch.einsum("btgi,gri->btgr", out.view(b, t, self.groups, -1), weight.to(out.dtype))
        return self.o_b_proj(grouped.reshape(b, t, -1))
