"""DeepSeek-V4's manifold-constrained hyper-connections (mHC) and the float32 norms around them.

The residual is `n` streams X [B, T, n, H] instead of one. Before each block (attention, MoE) a tiny
projection of all streams gives `pre` (how to collapse them into the block's input), `post` (how to spread
the block's output back over the streams) and `comb`, an n x n mixing of the old streams, pushed towards a
doubly stochastic matrix by Sinkhorn iterations so that the residual's norm cannot grow layer after layer:
X' = post * block(sum_j pre_j X_j) + comb^T X. After the last layer `HyperHead` collapses the streams.
All of it runs in float32 (transformers keeps these weights in float32 too).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class FloatRMSNorm(nn.Module):
    """V4's RMSNorm: the weight (kept float32) multiplies the float32 normalised value before the cast back,
    unlike the Llama-style norm that casts first."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * h).to(x.dtype)


def unweighted_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, the factor computed in float32 and applied in x's dtype."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def sinkhorn(comb: torch.Tensor, iterations: int, eps: float) -> torch.Tensor:
    """Alternate column and row normalisation of [.., n, n] (columns first, and last)."""
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iterations - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


class Mixing(NamedTuple):
    """One hyper-connection's weights for each token: pre, post [B, T, n] and comb [B, T, n, n] (float32)."""

    pre: torch.Tensor
    post: torch.Tensor
    comb: torch.Tensor


class HyperConnection(nn.Module):
    """The mHC before one block: `fn` [(2+n)n, n*H], `base` [(2+n)n], `scale` [3] (pre, post, comb)."""

    def __init__(self, hidden: int, streams: int, iterations: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.n, self.iterations, self.hc_eps, self.norm_eps = streams, iterations, hc_eps, norm_eps
        size = (2 + streams) * streams
        self.fn = nn.Parameter(torch.empty(size, streams * hidden))
        self.base = nn.Parameter(torch.empty(size))
        self.scale = nn.Parameter(torch.empty(3))

    def mixing(self, streams: torch.Tensor) -> Mixing:
        n = self.n
        flat = unweighted_rms(streams.flatten(2).float(), self.norm_eps)
        pre_w, post_w, comb_w = F.linear(flat, self.fn.float()).split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([n, n, n * n])
        s_pre, s_post, s_comb = self.scale.float().unbind(0)
        pre = torch.sigmoid(pre_w * s_pre + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * s_post + post_b)
        comb = torch.softmax(comb_w.unflatten(-1, (n, n)) * s_comb + comb_b.view(n, n), dim=-1) + self.hc_eps
        return Mixing(pre, post, sinkhorn(comb, self.iterations, self.hc_eps))

    def collapse(self, streams: torch.Tensor, mix: Mixing) -> torch.Tensor:
        """The block's input: sum_j pre_j X_j, in the streams' dtype."""
        return (mix.pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)

    @staticmethod
    def expand(streams: torch.Tensor, out: torch.Tensor, mix: Mixing) -> torch.Tensor:
        """X'_k = post_k * out + sum_j comb[j, k] X_j (comb applied transposed)."""
        dtype = streams.dtype
        return mix.post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(
            mix.comb.to(dtype).transpose(-1, -2), streams)


class HyperHead(nn.Module):
    """The final collapse of the streams: sigmoid weights from `hc_fn` [n, n*H], `hc_base` [n], `hc_scale` [1]."""

    def __init__(self, hidden: int, streams: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.hc_eps, self.norm_eps = hc_eps, norm_eps
        self.hc_fn = nn.Parameter(torch.empty(streams, streams * hidden))
        self.hc_base = nn.Parameter(torch.empty(streams))
        self.hc_scale = nn.Parameter(torch.empty(1))

    def weights(self, streams: torch.Tensor) -> torch.Tensor:
        flat = unweighted_rms(streams.flatten(2).float(), self.norm_eps)
        mixes = F.linear(flat, self.hc_fn.float())
        return torch.sigmoid(mixes * self.hc_scale.float() + self.hc_base.float()) + self.hc_eps

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        return (self.weights(streams).unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)
