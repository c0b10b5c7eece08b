"""A model cut down to one rank's share (`llmcli.parallel_plan` says what is split), and the collectives that
join the shares back.

The model is built on the meta device from a config with the rank's head counts and MLP width, so the
model code runs unchanged on its slices; then, still on meta, the embedding becomes a vocabulary-parallel
one, the head keeps only the rank's vocabulary rows, and the routed experts only the rank's (`LocalExperts`).
Forward hooks add the communication where a block's partial sums meet, without renaming any parameter
(the checkpoint's names still load): one all-reduce after each attention and each MLP/MoE block (their
output projections are row-parallel, the inputs column-parallel), one after the embedding, and one
all-gather of the head's logits.

Why a vocabulary-parallel head and not a replicated one: the head is the largest matrix of small models
(Qwen2.5-0.5B: 136M of its 494M values) and a decode step reads all of it, so splitting it divides that
read by the world size; the price is one all-gather of vocab/world logits per rank per step (600 KB in
float32 for a 150k vocabulary), small beside the head's own bytes.
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.backends.comm_clock import all_gather, all_reduce
from llmcli.config import ModelConfig
from llmcli.errors import LlmcliError
from llmcli.models.base import CausalLM
from llmcli.models.hooks import RouterChoice
from llmcli.models.layers import SwiGLU
from llmcli.parallel_plan import Layout


def local_config(cfg: ModelConfig, layout: Layout) -> ModelConfig:
    """The config of one rank's share: its query heads, kv heads and dense MLP width."""
    if layout.tp == 1:
        return dataclasses.replace(cfg)
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // layout.tp,
                               num_kv_heads=layout.kv_heads(cfg.num_kv_heads),
                               intermediate_size=cfg.intermediate_size // layout.tp)


class VocabParallelEmbedding(nn.Module):
    """Rows start..start+rows of the embedding (the last rank's tail is zero padding); ids outside them give
    zeros here, and the all-reduce adds the one rank's row that holds each id."""

    def __init__(self, vocab: int, hidden: int, layout: Layout):
        super().__init__()
        self.rows = layout.vocab_rows(vocab)
        self.start = layout.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0)
        return all_reduce(out)


class LocalExperts(nn.ModuleDict):
    """The routed experts a rank holds (named by their global index, as in the checkpoint), each possibly a
    slice of its MLP. Returns this rank's part of the weighted sum over each token's chosen experts; the
    MoE block's all-reduce adds the other ranks' parts."""

    def __init__(self, owned: range, hidden: int, intermediate: int):
        super().__init__({str(e): SwiGLU(hidden, intermediate) for e in owned})
        self.first, self.count = owned.start, len(owned)

    def forward(self, x: torch.Tensor, choice: RouterChoice) -> torch.Tensor:
        local = choice.experts - self.first
        token, slot = ((local >= 0) & (local < self.count)).nonzero(as_tuple=True)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        if token.numel() == 0:
            return out.to(x.dtype)
        ids = local[token, slot]
        order = ids.argsort(stable=True)  # (token, slot) pairs grouped by expert
        token, slot, ids = token[order], slot[order], ids[order]
        inputs, outputs, begin = x[token], [], 0
        for expert, count in enumerate(torch.bincount(ids, minlength=self.count).tolist()):
            if count:
                outputs.append(self[str(self.first + expert)](inputs[begin: begin + count]))
                begin += count
        weighted = torch.cat(outputs).float() * choice.weights[token, slot, None]
        return out.index_add_(0, token, weighted).to(x.dtype)


def shard_model(model: CausalLM, cfg: ModelConfig, layout: Layout) -> CausalLM:
    """On the meta device: swap in the rank's embedding, head and experts (`cfg`: the whole model's config)."""
    hidden = cfg.hidden_size
    if layout.tp > 1:
        model.model.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, hidden, layout)
        model.lm_head = nn.Linear(hidden, layout.vocab_rows(cfg.vocab_size), bias=False)
    for layer in model.model.layers:
        if getattr(layer, "is_moe", False):
            moe = layer.mlp
            intermediate = cfg.moe_intermediate_size // layout.expert_split
            moe.experts = LocalExperts(layout.experts(cfg.n_routed_experts), hidden, intermediate)
            if getattr(moe, "shared_experts", None) is not None:  # DeepSeek
                moe.shared_experts = SwiGLU(hidden, cfg.n_shared_experts * cfg.moe_intermediate_size // layout.world)
            if getattr(moe, "shared_expert", None) is not None:  # Qwen MoE: its per-token gate stays whole
                moe.shared_expert = SwiGLU(hidden, cfg.shared_expert_intermediate_size // layout.world)
    return model


# -- communication -------------------------------------------------------------------------------------


def _all_reduce_output(module, args, output):
    return all_reduce(output)


def gather_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """The whole vocabulary's logits from every rank's slice (the last rank's padding cut off)."""
    return all_gather(logits, -1)[..., :vocab]


def attach_collectives(model: CausalLM, cfg: ModelConfig, layout: Layout) -> None:
    """All-reduce each block's partial sums (the head's gather: attach_head_gather)."""
    for layer in model.model.layers:
        moe = getattr(layer, "is_moe", False)
        if layout.tp > 1:
            layer.self_attn.register_forward_hook(_all_reduce_output)
        if moe or layout.tp > 1:
            layer.mlp.register_forward_hook(_all_reduce_output)


def attach_head_gather(model: CausalLM, cfg: ModelConfig, layout: Layout) -> None:
    """The head's vocabulary slices gathered into whole logits: a hook on the head itself, so a compiled decode
    step (which runs the model's forward, not its hooks) gathers too. After preparation: it may swap the head."""
    if layout.tp > 1:
        model.lm_head.register_forward_hook(lambda module, args, logits: gather_vocab(logits, cfg.vocab_size))


# -- which slice of each checkpoint tensor a rank reads ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Slice:
    """Along `dim`, the concatenation of `ranges` [start, stop), zero-padded to `length` rows."""

    dim: int
    ranges: tuple[tuple[int, int], ...]
    length: int


def _part(size: int, parts: int, index: int) -> tuple[int, int]:
    step = size // parts
    return index * step, (index + 1) * step


_VOCAB = re.compile(r"(embed_tokens|transformer\.wte|lm_head)\.weight$")
_HEADS = re.compile(r"\.(self_attn\.q_proj|q_b_proj|kv_b_proj)\.(weight|bias)$")
_KV = re.compile(r"\.self_attn\.[kv]_proj\.(weight|bias)$")
_OUT = re.compile(r"\.(self_attn\.o_proj|attn\.c_proj)\.(weight|bias)$")
_FUSED_QKV = re.compile(r"\.attn\.c_attn\.(weight|bias)$")
_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_SHARED = re.compile(r"\.mlp\.shared_experts?\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_EXPERTS = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")
_MLP = re.compile(r"\.mlp\.(gate_proj|up_proj|down_proj|w1|w2|c_proj)\.weight$")


def slicer(cfg: ModelConfig, layout: Layout):
    """`slice_of(name, shape)`: the Slice of a checkpoint tensor this rank reads, None for the whole tensor,
    or False when the rank holds none of it (another rank's expert)."""
    tp, rank = layout.tp, layout.rank

    def split(shape, dim: int, parts: int, index: int) -> Slice:
        return Slice(dim, (_part(shape[dim], parts, index),), shape[dim] // parts)

    def mlp(shape, kind: str, parts: int, index: int) -> Slice:
        return split(shape, 1 if kind in ("down_proj", "c_proj") else 0, parts, index)

    def slice_of(name: str, shape: tuple[int, ...]):
        if _FUSED_EXPERTS.search(name):
            raise LlmcliError(f"{name}: --tp/--ep read one tensor per expert (as the Hub ships them), not experts "
                              "saved fused")
        if (m := _EXPERT.search(name)) is not None:
            if int(m.group(1)) not in layout.experts(cfg.n_routed_experts):
                return False
            return mlp(shape, m.group(2), layout.expert_split, rank % layout.expert_split)
        if (m := _SHARED.search(name)) is not None:
            return mlp(shape, m.group(1), layout.world, rank)
        if tp == 1:
            return None
        if _VOCAB.search(name):
            rows = layout.vocab_rows(shape[0])
            return Slice(0, ((rank * rows, min((rank + 1) * rows, shape[0])),), rows)
        if _HEADS.search(name):
            return split(shape, 0, tp, rank)
        if _KV.search(name):
            parts = min(cfg.num_kv_heads, tp)
            return split(shape, 0, parts, rank * parts // tp)
        if (m := _OUT.search(name)) is not None:
            if m.group(2) == "bias":  # added once: by rank 0
                return Slice(0, ((0, shape[0]),) if rank == 0 else (), shape[0])
            return split(shape, 1, tp, rank)
        if _FUSED_QKV.search(name):  # original Qwen: rows Q | K | V, each split by heads
            third = shape[0] // 3
            ranges = tuple((t * third + a, t * third + b) for t in range(3) for a, b in [_part(third, tp, rank)])
            return Slice(0, ranges, 3 * (third // tp))
        if (m := _MLP.search(name)) is not None:
            return mlp(shape, m.group(1), tp, rank)
        return None

    return slice_of
