"""Building blocks shared by the decoders: RMSNorm, SwiGLU, routed experts, attention masks and kernels.

Nothing here reads files or prints: modules take tensors (and a cache span) and return tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.models.base import FusesProjections
from llmcli.models.cache import Span
from llmcli.models.hooks import RouterChoice


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * self.normalized(x)

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """x normalised in float32 like the reference implementations, cast back; the weight then scales it
        in the input dtype. The factor is computed in place on its fresh [.., 1] tensor: a decode step runs
        ~60 norms of one row, each a handful of small ops."""
        h = x.float()
        factor = h.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        return (h * factor).to(x.dtype)


def fuse_linears(parent: nn.Module, names: list[str], fused_name: str) -> list[int] | None:
    """Replace the nn.Linear children `names` of `parent`, which all read the same input, by one
    linear `fused_name` whose output is their concatenation. Decoding is a string of one-row
    products, each bound by streaming its weight: one larger product streams better than several
    small ones and saves calls. Children of other types join if their types share a classmethod
    `joined(parts)` saying how (the joined module or None: weights a file stores already quantised).
    Returns the output sizes to split by (None if nothing was fused)."""
    parts = [getattr(parent, name, None) for name in names]
    kinds = {type(p) for p in parts}
    if kinds == {nn.Linear}:
        joined = _joined_linear
    else:  # one `joined` for all parts' types (a class and its subclasses share it)
        functions = {getattr(getattr(kind, "joined", None), "__func__", None) for kind in kinds}
        joined = type(parts[0]).joined if len(functions) == 1 and None not in functions else None
    fused = joined(parts) if joined is not None else None
    if fused is None:
        return None
    for name in names:
        delattr(parent, name)
    setattr(parent, fused_name, fused)
    return [p.out_features for p in parts]


def _joined_linear(parts: list[nn.Linear]) -> nn.Linear:
    weight = torch.cat([p.weight.detach() for p in parts])
    fused = nn.Linear(parts[0].in_features, weight.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    fused.bias = joined_bias(parts, weight.dtype, weight.device)
    return fused


def joined_bias(parts: list[nn.Module], dtype: torch.dtype, device: torch.device) -> nn.Parameter | None:
    """The parts' biases end to end, zeros for a part without one; None when no part has one."""
    if all(p.bias is None for p in parts):
        return None
    return nn.Parameter(torch.cat([p.bias.detach() if p.bias is not None else
                                   torch.zeros(p.out_features, dtype=dtype, device=device) for p in parts]),
                        requires_grad=False)


class SwiGLU(FusesProjections, nn.Module):
    """down(silu(gate(x)) * up(x)); attribute names follow the Llama-style checkpoints."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.fused = False

    def fuse_projections(self) -> None:
        """After loading: gate and up become one product (`gate_up_proj`)."""
        self.fused = fuse_linears(self, ["gate_proj", "up_proj"], "gate_up_proj") is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.ModuleList):
    """A MoE layer's routed experts (SwiGLUs named 0..E-1 like the checkpoint's). Each expert that got
    tokens runs once on all of them; outputs are weighted and summed per token. Backends may swap in a
    module with the same interface that stacks the experts' weights."""

    def __init__(self, count: int, hidden: int, intermediate: int):
        super().__init__(SwiGLU(hidden, intermediate) for _ in range(count))

    def forward(self, x: torch.Tensor, choice: RouterChoice) -> torch.Tensor:
        """x [N, hidden] through each row's chosen experts -> [N, hidden]."""
        if x.shape[0] == 1:  # one token (decode): no grouping needed, just its k experts
            outputs = torch.cat([self[e](x) for e in choice.experts[0].tolist()])
            return (outputs.float() * choice.weights[0, :, None]).sum(0, keepdim=True).to(x.dtype)
        k = choice.experts.shape[1]
        ids = choice.experts.reshape(-1)
        order = ids.argsort(stable=True)  # (token, slot) pairs grouped by expert
        token = order // k
        counts = torch.bincount(ids, minlength=len(self)).tolist()
        inputs = x[token]
        outputs, begin = [], 0
        for expert, count in enumerate(counts):
            if count:
                outputs.append(self[expert](inputs[begin: begin + count]))
                begin += count
        weighted = torch.cat(outputs).float() * choice.weights.reshape(-1)[order, None]
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        return out.index_add_(0, token, weighted).to(x.dtype)


# -- masks ---------------------------------------------------------------------------------------


def attention_mask(span: Span, length: int, total: int, window: int | None, device: torch.device
                   ) -> tuple[torch.Tensor | None, bool]:
    """Mask for the span's `length` queries over keys 0..total-1: key j is visible to query i when
    i - window < j <= i. Returns (boolean mask [length, total] or None, is_causal) so that the common
    cases use scaled_dot_product_attention's fast paths. A static span (a compiled step reading the
    whole cache) always gets a mask, built from its positions."""
    if span.static:
        query = span.positions[..., None]  # [T, 1], or [B, T, 1] for per-row positions
    else:
        unwindowed = window is None or window >= total
        if unwindowed and length == 1:
            return None, False  # a single new query sees every cached key
        if unwindowed and span.start == 0:
            return None, True
        query = torch.arange(span.start, span.start + length, device=device)[:, None]
    key = torch.arange(total, device=device)[None, :]
    allowed = key <= query
    if window is not None:
        allowed &= key > query - window
    return (allowed[:, None] if allowed.dim() == 3 else allowed), False  # per-row: [B, 1, T, total]


def causal_mask(start: int, length: int, total: int, device) -> torch.Tensor:
    """[length, total] boolean: query at position start+i sees keys 0..start+i."""
    query = torch.arange(start, start + length, device=device)[:, None]
    return torch.arange(total, device=device)[None, :] <= query


def attention_probs(scores: torch.Tensor, start: int, window: int | None = None) -> torch.Tensor:
    """softmax over keys of `scores` [B, H, T, total] (float32) for queries at start..start+T-1, with the
    causal and window mask: the distribution the attention kernels use internally, made explicit."""
    t, total = scores.shape[-2:]
    query = torch.arange(start, start + t, device=scores.device)[:, None]
    key = torch.arange(total, device=scores.device)[None, :]
    allowed = key <= query
    if window is not None:
        allowed &= key > query - window
    return scores.float().masked_fill(~allowed, float("-inf")).softmax(dim=-1)


def head_probs(q: torch.Tensor, k: torch.Tensor, scale: float | None, start: int, window: int | None
               ) -> torch.Tensor:
    """Attention probabilities [B, H, T, total] of q [B, H, T, D] over k [B, KV, total, D] (H a multiple
    of KV), for a recorder that asks for them."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return attention_probs(torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale, start, window)


# -- attention of one query ------------------------------------------------------------------------


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                        scale: float | None) -> torch.Tensor:
    """Attention of one query per head (q [B, H, 1, D]) over a whole static cache (k, v [B, KV, L, D],
    H a multiple of KV) where `allowed` [1, L] (or [B, 1, 1, L] per row) marks the visible keys. Written
    as products and sums in float32 so that a compiled step fuses it into a few loops: SDPA's CPU kernel
    costs ~200 us per call for a single query."""
    b, h, _, d = q.shape
    kv_heads = k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    q = q.float().view(b, kv_heads, h // kv_heads, 1, d)
    scores = (q * k.float()[:, :, None]).sum(-1) * scale  # [B, KV, G, L]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    out = (probs[..., None] * v.float()[:, :, None]).sum(-2)  # [B, KV, G, D]
    return out.view(b, h, 1, -1).to(v.dtype)


def one_query_attention_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
                              scale: float | None) -> torch.Tensor:
    """`one_query_attention` for eager CPU decode steps, as two float32 batched products over the KV heads
    (no [.., L, D] temporary; `allowed` None means every key); the result [B, H, 1, D] is contiguous. SDPA's
    CPU kernel took 150 us a call for one query (3.6 ms of a 45 ms step of the 0.5B shape); torch.matmul on
    4-d tensors adds reshapes that bmm on 3-d views does without."""
    b, h, _, d = q.shape
    kv_heads = k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    q = q.float().reshape(b * kv_heads, h // kv_heads, d)
    scores = torch.bmm(q, k.float().reshape(b * kv_heads, -1, d).transpose(1, 2)).mul_(scale)  # [B*KV, G, L]
    if allowed is not None:
        scores.masked_fill_(~allowed, float("-inf"))
    out = torch.bmm(scores.softmax(dim=-1), v.float().reshape(b * kv_heads, -1, d))  # [B*KV, G, D]
    return out.to(v.dtype).view(b, h, 1, d)
