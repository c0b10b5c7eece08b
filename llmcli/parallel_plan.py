"""How a model splits over the ranks of a tensor/expert-parallel run, from its config alone (no torch: `show`
plans with it, loading checks it before reading any weight).

`--tp T`: attention heads, dense MLPs, shared experts and the vocabulary (embedding and head) are split over
T ranks. `--ep E`: the routed experts of MoE layers (DeepSeek, Qwen) are split into E groups of consecutive experts;
each group lives on world/E ranks, which split each of its experts' MLPs (so `--tp 2 --ep 2` on 2 ranks
gives each rank half the experts, whole). The world (the number of processes torchrun starts) is the larger
of T and E; T is 1 or the world. With T = 1 every rank runs the whole attention (replicated) and only the
MoE layers are shared out.

Kept whole on every rank: norms, DeepSeek's router (so every rank makes the same choices) and MLA's latent
projections. MLA's latent cache (c_kv and the rope key) is shared by all heads, so each rank keeps the full
cache even though it computes only its heads: a rank's cache per token is the single-process one. Qwen's
keys and values split by kv head; with fewer kv heads than ranks, each kv head is replicated on the ranks
whose query heads read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmcli.config import ModelConfig
from llmcli.config_deepseek import indexer_settings
from llmcli.errors import LlmcliError

FAMILIES = ("qwen", "qwen2", "qwen3", "llama", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "deepseek_v32")
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    ep: int = 1
    rank: int = 0

    @property
    def world(self) -> int:
        return max(self.tp, self.ep)

    @property
    def parallel(self) -> bool:
        return self.world > 1

    @property
    def expert_split(self) -> int:
        """Ranks that share each routed expert (each holds 1/expert_split of its MLP)."""
        return self.world // self.ep

    def experts(self, count: int) -> range:
        """The routed experts this rank holds."""
        per = count // self.ep
        group = self.rank // self.expert_split
        return range(group * per, (group + 1) * per)

    def vocab_rows(self, vocab: int) -> int:
        """Rows of the embedding and head on each rank: the vocabulary split over tp, the last rank padded."""
        return math.ceil(vocab / self.tp)

    def kv_heads(self, kv: int) -> int:
        return max(kv // self.tp, 1)


def check_layout(cfg: ModelConfig, tp: int, ep: int, gguf: bool = False) -> Layout:
    """The layout for --tp/--ep, or one clear error (before anything is loaded) when the model cannot split so."""
    if tp < 1 or ep < 1:
        raise LlmcliError("--tp and --ep must be at least 1", exit_code=2)
    layout = Layout(tp, ep)
    world = layout.world
    if tp not in (1, world) or world % ep:
        raise LlmcliError(f"--tp {tp} --ep {ep}: --tp must be 1 or the number of processes ({world}), and --ep "
                          "must divide it", exit_code=2)
    if gguf:
        raise LlmcliError("--tp/--ep load safetensors checkpoints only, not GGUF files", exit_code=2)
    if cfg.family not in FAMILIES:
        raise LlmcliError(f"--tp/--ep: {cfg.family} models cannot be split yet (supported: "
                          f"{', '.join(FAMILIES)})", exit_code=2)
    problems = []
    if tp > 1:
        checks = [("{} attention heads", cfg.num_heads), ("an MLP {} wide", cfg.intermediate_size)]
        problems += [f"{what.format(n)} over {tp} ranks" for what, n in checks if n % tp]
        kv = cfg.num_kv_heads
        if not cfg.family.startswith("deepseek") and kv % tp and tp % kv:
            problems.append(f"{kv} kv heads over {tp} ranks (one must divide the other)")
    if cfg.is_moe and world > 1:
        shared = _shared_width(cfg)
        if shared % world:
            problems.append(f"shared experts {shared} wide over {world} ranks")
        if cfg.n_routed_experts % ep:
            problems.append(f"{cfg.n_routed_experts} routed experts in {ep} groups")
        if cfg.moe_intermediate_size % layout.expert_split:
            problems.append(f"experts {cfg.moe_intermediate_size} wide over {layout.expert_split} ranks")
    elif ep > 1:
        problems.append("no routed experts to split (--ep is for MoE models)")
    if problems:
        raise LlmcliError(f"--tp {tp} --ep {ep} does not split this {cfg.family} model: {'; '.join(problems)}",
                          exit_code=2)
    return layout


def _shared_width(cfg: ModelConfig) -> int:
    """The shared experts' MLP width: DeepSeek's n_shared x moe_intermediate_size, or Qwen's one shared expert."""
    return cfg.shared_expert_intermediate_size or cfg.n_shared_experts * cfg.moe_intermediate_size


# -- planning (`llmcli show --tp`) ---------------------------------------------------------------------


def _attention_values(cfg: ModelConfig, layout: Layout) -> tuple[int, int]:
    """(values split over the ranks as this rank holds them, values every rank holds) of one attention."""
    h, tp = cfg.hidden_size, layout.tp
    if cfg.family.startswith("deepseek"):
        heads, rope = cfg.num_heads // tp, cfg.qk_rope_head_dim
        per_head_q = cfg.qk_nope_head_dim + rope
        kvl, ql = cfg.kv_lora_rank, cfg.q_lora_rank
        whole = h * (kvl + rope) + kvl + (h * ql + ql if ql else 0)  # latent projections and their norms
        if cfg.family == "deepseek_v32":  # the sparse attention indexer (weights_proj: rank_values' float32)
            ix = indexer_settings(cfg)
            whole += ql * ix.heads * ix.head_dim + h * ix.head_dim + 2 * ix.head_dim
        split = (ql or h) * heads * per_head_q + kvl * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        return split + heads * cfg.v_head_dim * h, whole
    q = cfg.num_heads // tp * cfg.head_dim
    kv = layout.kv_heads(cfg.num_kv_heads) * cfg.head_dim
    bias = (q + 2 * kv) if cfg.attention_bias else 0
    return h * (q + 2 * kv) + bias + q * h, (2 * cfg.head_dim if cfg.qk_norm else 0)


def rank_values(cfg: ModelConfig, layout: Layout) -> dict[str, int]:
    """Values (parameters) rank 0 holds, by part: 'split' (its share of what is divided) and 'whole' (what
    every rank holds), and 'router' (DeepSeek's router and V3.2's indexer head weights, kept in float32)."""
    h, v, tp = cfg.hidden_size, cfg.vocab_size, layout.tp
    tensor = layout.vocab_rows(v) * h * (1 if cfg.tie_word_embeddings else 2)  # split over tp (whole when 1)
    experts, whole, router = 0, h, 0  # experts: split over the world
    for i in range(cfg.num_layers):
        attn_split, attn_whole = _attention_values(cfg, layout)
        tensor += attn_split
        whole += attn_whole + 2 * h
        if cfg.family == "deepseek_v32":
            router += h * indexer_settings(cfg).heads
        if cfg.is_moe_layer(i):
            e, mi = cfg.n_routed_experts, cfg.moe_intermediate_size
            if cfg.family.startswith("deepseek"):  # a float32 router
                router += e * h + (e if cfg.topk_method == "noaux_tc" else 0)
            else:  # Qwen: the router and the shared expert's gate, in the model's dtype
                whole += e * h + (h if cfg.shared_expert_intermediate_size else 0)
            experts += e // layout.ep * 3 * h * (mi // layout.expert_split)
            experts += 3 * h * (_shared_width(cfg) // layout.world)
        else:
            tensor += 3 * h * (cfg.intermediate_size // tp)
    if tp == 1:
        return {"split": experts, "whole": whole + tensor, "router": router}
    return {"split": tensor + experts, "whole": whole, "router": router}


def cache_bytes_per_token(cfg: ModelConfig, layout: Layout, element: int) -> int:
    """A rank's KV cache per token: its kv heads' keys and values (Qwen), or MLA's whole latent (DeepSeek)."""
    if cfg.family.startswith("deepseek"):
        index = indexer_settings(cfg).head_dim if cfg.family == "deepseek_v32" else 0  # V3.2's cached index keys
        return cfg.num_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim + index) * element
    kv = layout.kv_heads(cfg.num_kv_heads) if layout.tp > 1 else cfg.num_kv_heads
    return cfg.num_layers * 2 * kv * cfg.head_dim * element


def plan(cfg: ModelConfig, tp: int, ep: int, dtype: str, memory: int | None = None) -> dict:
    """Per-rank weight and cache bytes of a --tp/--ep run in `dtype`, and whether it fits `memory` per rank."""
    layout = check_layout(cfg, tp, ep)
    element = ELEMENT_BYTES[dtype]
    values = rank_values(cfg, layout)
    weights = (values["split"] + values["whole"]) * element + values["router"] * 4
    cache = cache_bytes_per_token(cfg, layout, element)
    facts = {"tp": tp, "ep": ep, "ranks": layout.world, "dtype": dtype, "weight_bytes_per_rank": weights,
             "replicated_bytes_per_rank": values["whole"] * element + values["router"] * 4,
             "cache_bytes_per_token_per_rank": cache, "memory_per_rank": memory}
    if memory is not None:
        left = memory - weights
        facts["fits"] = left > 0
        facts["cache_tokens_that_fit"] = max(left, 0) // cache if cache else None
    return facts
