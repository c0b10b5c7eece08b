"""The Qwen sparse MoE block: Qwen1.5/2-MoE, Qwen3-MoE, and the MLP of Qwen3-Next and Qwen3.5-MoE.

A softmax router picks num_experts_per_tok routed experts per token (their probabilities renormalised to sum
to one when norm_topk_prob says so); Qwen1.5/2-MoE, Qwen3-Next and Qwen3.5-MoE add one shared expert whose
output is scaled per token by sigmoid(shared_expert_gate . x). Qwen3-MoE has no shared expert.

The routed experts are `layers.Experts` (one SwiGLU per expert, named like the hub's per-expert tensors
`mlp.experts.{e}.gate_proj`), so backends stack them for decode kernels and quantise them as for DeepSeek.
The router and the shared gate are plain weights, not nn.Linear: backends leave them in the model's dtype (and may
hold the router's in their own layout, overriding `TopKRouter.logits`).
Rounding follows transformers: router logits in the model's dtype, softmax in float32, the chosen weights
cast back to the model's dtype.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.config import ModelConfig
from llmcli.errors import LlmcliError
from llmcli.models.hooks import ROUTED_OUT, ROUTER, SHARED_OUT, RouterChoice
from llmcli.models.layers import Experts, SwiGLU


class TopKRouter(nn.Module):
    """Softmax over the experts, top-k, optionally renormalised (`mlp.gate.weight` [E, hidden])."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.normalise = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, hidden] -> [N, experts] in x's dtype (a backend may hold the weight in another layout)."""
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> RouterChoice:
        """x [N, hidden] -> the choice for each of the N tokens (experts highest weight first)."""
        logits = self.logits(x)
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.normalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return RouterChoice(experts=experts, weights=weights.to(logits.dtype), scores=probs)


class SharedExpertGate(nn.Module):
    """sigmoid(w . x): how much of the shared expert's output each token takes (`shared_expert_gate.weight`
    [1, hidden]). A one-row product, kept out of the backends' linear swaps."""

    def __init__(self, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.linear(x, self.weight))


class SparseMoeBlock(nn.Module):
    """Router + routed experts (+ gated shared expert when cfg.shared_expert_intermediate_size > 0).
    Attribute names equal the hub's tensor names under `model.layers.{i}.mlp.`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = TopKRouter(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = SwiGLU(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = SharedExpertGate(cfg.hidden_size)
        else:
            self.shared_expert = self.shared_expert_gate = None

    def forward(self, x: torch.Tensor, index: int, recorder=None) -> torch.Tensor:
        """x [..., hidden] -> what the block adds to the residual stream; `index` names the layer to the
        recorder (router choice, routed and shared outputs)."""
        flat = x.reshape(-1, x.shape[-1])
        choice = self.gate(flat)
        routed = self.experts(flat, choice).view(x.shape)
        shared = None
        if self.shared_expert is not None:
            shared = self.shared_expert_gate(x) * self.shared_expert(x)
        if recorder is not None:
            recorder.record(index, ROUTER, choice)
            recorder.record(index, ROUTED_OUT, routed)
            if shared is not None:
                recorder.record(index, SHARED_OUT, shared)
        return routed if shared is None else routed + shared


# -- checkpoint names ------------------------------------------------------------------------------

_FUSED_EXPERTS = re.compile(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)")


def split_fused_experts(name: str, load) -> list[tuple[str, torch.Tensor]] | None:
    """Experts saved fused, as transformers holds them in memory (`mlp.experts.gate_up_proj` [E, 2I, H], rows
    0..I-1 the gate and I..2I-1 the up projection; `mlp.experts.down_proj` [E, H, I]), as per-expert tensors.
    None when `name` is not such a tensor (hub checkpoints store one tensor per expert)."""
    match = _FUSED_EXPERTS.fullmatch(name)
    if match is None:
        return None
    prefix, kind = match.groups()
    tensor = load()
    if tensor.dim() != 3:
        raise LlmcliError(f"{name} has shape {tuple(tensor.shape)}; fused experts are [experts, out, in]")
    if kind == "down_proj":
        return [(f"{prefix}.{e}.down_proj.weight", w) for e, w in enumerate(tensor)]
    if tensor.shape[1] % 2:
        raise LlmcliError(f"{name} has {tensor.shape[1]} rows per expert; gate|up needs an even number")
    pieces = []
    for e, w in enumerate(tensor):
        gate, up = w.chunk(2, dim=0)
        pieces += [(f"{prefix}.{e}.gate_proj.weight", gate), (f"{prefix}.{e}.up_proj.weight", up)]
    return pieces
