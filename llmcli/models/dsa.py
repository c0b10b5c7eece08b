"""DeepSeek Sparse Attention (V3.2): the lightning indexer, its key cache, and the sparse decode step.

The indexer scores every earlier token for each query with a few cheap heads: it reuses MLA's query
latent c_q (wq_b turns it into `heads` queries), keeps one LayerNorm'd key per token, rotates the first
qk_rope_head_dim dims of both in the rotate-half layout (MLA itself is interleaved), and sums the heads'
ReLU'd dot products weighted by a per-token, per-head weight. Each query then attends to its `topk`
best-scored tokens only. A prompt runs dense attention under that selection as a mask (as transformers
does); a decode step gathers the selected latents and attends to those alone, so the main attention
costs O(topk) per token while only the light indexer scan grows with the context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.config_deepseek import IndexerSettings
from llmcli.models.cache import LatentLayerCache, Span
from llmcli.models.rope import rotate_pairs

INDEXER_NORM_EPS = 1e-6  # transformers and the reference hard-code it
SCORE_BLOCK = 1 << 24  # float32 values of one block of index scores (queries x heads x keys): 64 MiB


class Indexer(nn.Module):
    def __init__(self, hidden: int, q_lora_rank: int, rope_dim: int, settings: IndexerSettings):
        super().__init__()
        self.heads, self.head_dim, self.rope, self.topk = settings.heads, settings.head_dim, rope_dim, settings.topk
        self.wq_b = nn.Linear(q_lora_rank, self.heads * self.head_dim, bias=False)
        self.wk = nn.Linear(hidden, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=INDEXER_NORM_EPS)
        self.weights_proj = nn.Linear(hidden, self.heads, bias=False)

    def keep_float32(self) -> None:
        """The head weights are computed in float32 (transformers keeps weights_proj in float32)."""
        weight = self.weights_proj.weight
        if weight.dtype != torch.float32:
            self.weights_proj.weight = nn.Parameter(weight.detach().float(), requires_grad=False)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x.split([self.rope, self.head_dim - self.rope], dim=-1)
        return torch.cat((rotate_pairs(rot, cos, sin, interleaved=False), rest), dim=-1)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden] (the attention input) -> one key per token [B, T, head_dim]."""
        return self._rotate(self.k_norm(self.wk(x)), per_token(cos), per_token(sin))

    def scores(self, x: torch.Tensor, c_q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               keys: torch.Tensor) -> torch.Tensor:
        """Index scores [B, T, S] (float32) of the T queries (x, and MLA's query latent c_q) against the
        S cached keys [B, S, head_dim]: sum over heads of w[t, h] * relu(q[t, h] . k[s] / sqrt(head_dim)).
        Computed in blocks of queries so that the [T, heads, S] products never exist whole."""
        b, t, _ = x.shape
        q = self.wq_b(c_q).view(b, t, self.heads, self.head_dim)
        q = self._rotate(q, per_token(cos).unsqueeze(-2), per_token(sin).unsqueeze(-2))  # one angle for all heads
        weights = F.linear(x.float(), self.weights_proj.weight.float()) * self.heads ** -0.5  # [B, T, heads]
        k = keys.float().transpose(1, 2)[:, None]  # [B, 1, head_dim, S]
        scale = self.head_dim ** -0.5
        block = max(1, SCORE_BLOCK // (self.heads * keys.shape[1]))
        out = []
        for i in range(0, t, block):
            products = torch.matmul(q[:, i:i + block].float(), k) * scale  # [B, block, heads, S]
            out.append(torch.matmul(weights[:, i:i + block, None], products.relu_()).squeeze(2))
        return torch.cat(out, dim=1)


def per_token(cos: torch.Tensor) -> torch.Tensor:
    """The model's cos or sin in the indexer's token-major layout: [T, d] as it is; per-row positions' [B, 1, T, d]
    (shaped for MLA's [B, H, T, .] heads, `rope.per_row`) -> [B, T, d]."""
    return cos[:, 0] if cos.dim() == 4 else cos


def select(scores: torch.Tensor, visible: torch.Tensor | None, topk: int) -> torch.Tensor:
    """Indices [B, T, min(topk, S)] of each query's best-scored keys. `visible` [T, S], or [B, T, S] where each
    row has its own positions (None: all), hides keys a query must not see; where fewer than topk are visible,
    hidden ones fill the rest (callers mask them, as transformers' causal mask does)."""
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores.topk(min(topk, scores.shape[-1]), dim=-1).indices


def selection_mask(indices: torch.Tensor, visible: torch.Tensor | None, total: int) -> torch.Tensor:
    """Boolean [B, T, total]: key s is attended by query t when selected and visible (as in `select`)."""
    b, t, _ = indices.shape
    chosen = torch.zeros(b, t, total, dtype=torch.bool, device=indices.device).scatter_(-1, indices, True)
    return chosen if visible is None else chosen & visible


def gathered_attention(q: torch.Tensor, latent: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor | None,
                       scale: float, rank: int) -> torch.Tensor:
    """One query per sequence over its selected cache rows only: q [B, H, rank + rope] (absorbed form),
    latent [B, L, rank + rope], indices [B, k] -> mixed latents [B, H, rank] (float32). `valid` [B, k]
    marks real selections (a static step may select rows past its position)."""
    rows = latent.gather(1, indices[..., None].expand(-1, -1, latent.shape[-1])).float()  # [B, k, row]
    scores = torch.matmul(q.float(), rows.transpose(1, 2)) * scale  # [B, H, k]
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None], float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), rows[..., :rank])


class IndexedLatentCache(LatentLayerCache):
    """An MLA layer's latent rows plus the indexer's keys: [max_len, B, head_dim] (post-norm, post-RoPE)."""

    def __init__(self, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int, index_dim: int, dtype, device):
        super().__init__(batch, max_len, kv_lora_rank, rope_dim, dtype, device)
        self.index_keys = torch.zeros(max_len, batch, index_dim, dtype=dtype, device=device)

    def prefix_view(self, length: int) -> IndexedLatentCache:
        view = super().prefix_view(length)
        view.index_keys = self.index_keys[:length]
        return view

    def rows_view(self, first: int, end: int, length: int | None = None) -> IndexedLatentCache:
        view = super().rows_view(first, end, length)
        view.index_keys = self.index_keys[:length, first:end]
        return view

    def update_index(self, span: Span, keys: torch.Tensor) -> torch.Tensor:
        """Store the span's indexer keys [B, T, head_dim]; return the keys scored against, [B, n, head_dim]."""
        if span.static:
            if span.positions.dim() == 2:  # per-row positions: row b writes at its own positions[b]
                rows = torch.arange(keys.shape[0], device=keys.device)
                self.index_keys[span.positions.T, rows] = keys.transpose(0, 1)
            else:
                self.index_keys.index_copy_(0, span.positions, keys.transpose(0, 1))
            return self.index_keys.transpose(0, 1)
        end = span.start + keys.shape[1]
        self.index_keys[span.start:end] = keys.transpose(0, 1)
        return self.index_keys[:end].transpose(0, 1)

    def tensors(self) -> list[torch.Tensor]:
        return [self.kv, self.index_keys]

    def bytes_per_token(self) -> int:
        return (self.kv.shape[-1] + self.index_keys.shape[-1]) * self.kv.element_size()
