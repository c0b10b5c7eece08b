"""DeepSeek V2 / V3 / R1: Multi-head Latent Attention (MLA) and DeepSeekMoE.

Module attribute names equal the checkpoint tensor names, so loading needs no renaming; only the
multi-token-prediction layer (`model.layers.{num_layers}`) is skipped.

MLA keeps one latent per token: c_kv (kv_lora_rank values, normalised) and one rope key k_pe shared by
all heads. The cache stores just those two, side by side in one row of kv_lora_rank + qk_rope_head_dim
values (`LatentLayerCache`). A prompt is run in the expanded form (kv_b_proj turns the latents into
per-head keys and values); a decode step runs in the absorbed form directly on the cache: kv_b_proj's key
half is folded into the query and its value half applied after the attention, so nothing per-head is
ever stored.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.config import ModelConfig
from llmcli.config_deepseek import indexer_settings, rope_interleaved
from llmcli.models.base import CausalLM, FusesProjections
from llmcli.models.cache import Cache, LatentLayerCache, Span
from llmcli.models.dsa import IndexedLatentCache, Indexer, gathered_attention, select, selection_mask
from llmcli.models.hooks import (
    ATTN_PROBS,
    INDEXER,
    ROUTED_OUT,
    ROUTER,
    SHARED_OUT,
    AttentionWeights,
    IndexerChoice,
    RouterChoice,
    asks,
    record_residuals,
)
from llmcli.models.layers import Experts, RMSNorm, SwiGLU, attention_probs, causal_mask, fuse_linears
from llmcli.models.rope import pair_cos_sin, rope_inv_freq, rotate_pairs, yarn_softmax_scale

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use the fixed default, not rms_norm_eps
FORMS = ("auto", "expanded", "absorbed")
SPARSE_MODES = ("sparse", "masked", "dense")
_LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.")


class MLAttention(FusesProjections, nn.Module):
    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.index = index  # the layer's, for what is recorded
        self.num_heads = cfg.num_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        self.interleaved = rope_interleaved(cfg)
        q_dim = cfg.num_heads * (self.nope + self.rope)
        self.q_lora = cfg.q_lora_rank is not None
        if not self.q_lora:
            self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, q_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.rank + self.rope, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.rank, cfg.num_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * self.v_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.softmax_scale = yarn_softmax_scale(self.nope + self.rope, cfg.rope_scaling)
        self._absorbed_weights: tuple | None = None
        self.in_sizes: list[int] | None = None

    def fuse_projections(self) -> None:
        """After loading: the two products of the layer input (q_a or q, and kv_a) become one."""
        first = "q_a_proj" if self.q_lora else "q_proj"
        self.in_sizes = fuse_linears(self, [first, "kv_a_proj_with_mqa"], "in_proj")

    def forward(self, x, cos, sin, layer_cache: LatentLayerCache, span: Span, absorbed: bool,
                recorder=None) -> torch.Tensor:
        q_nope, q_pe, _, latent = self.project(x, cos, sin, layer_cache, span)
        if asks(recorder, ATTN_PROBS) and not span.static:  # beside the attention below, which stays as it is
            probs = self.absorbed_probs(q_nope, q_pe, latent, span.start)
            recorder.record(self.index, ATTN_PROBS, AttentionWeights(probs, span.start))
        return self.output(self.attend(q_nope, q_pe, latent, span, absorbed))

    def absorbed_probs(self, q_nope, q_pe, latent, start: int) -> torch.Tensor:
        """Attention probabilities [B, H, T, total] from the absorbed scores (q_nope W_UK) . c_kv + q_pe . k_pe
        on the latent cache (equal to the expanded form's), in float32, for a recorder that asks."""
        w_uk, _ = self.absorbed_weights()
        q_latent = torch.einsum("bhtn,hnr->bhtr", q_nope.float(), w_uk.float())
        q = torch.cat((q_latent, q_pe.float()), dim=-1)
        scores = torch.matmul(q, latent.float()[:, None].transpose(-1, -2)) * self.softmax_scale
        return attention_probs(scores, start)

    def attend(self, q_nope, q_pe, latent, span: Span, absorbed: bool, allowed=None, selected=None) -> torch.Tensor:
        """Attention in the form the call asks for -> [B, H, T, v_dim]. `allowed` [B, T, total] replaces the
        causal mask; `selected` (indices, valid) [B, k] limits a static step to those cache rows."""
        if span.static:
            return self._absorbed_static(q_nope, q_pe, latent, span.positions, selected)
        if absorbed:
            return self._absorbed(q_nope, q_pe, latent, span.start, allowed)
        return self._expanded(q_nope, q_pe, latent, span.start, allowed)

    def project(self, x, cos, sin, layer_cache: LatentLayerCache, span: Span):
        """Queries (q_nope, rotated q_pe: [B, H, T, .]), the query latent c_q (None without q_lora) and the
        cache rows attended to, after storing this span's latents."""
        b, t, _ = x.shape
        if self.in_sizes is not None:
            q, kv = self.in_proj(x).split(self.in_sizes, dim=-1)
        else:
            q, kv = (self.q_a_proj(x) if self.q_lora else self.q_proj(x)), self.kv_a_proj_with_mqa(x)
        c_q = None
        if self.q_lora:
            c_q = self.q_a_layernorm(q)
            q = self.q_b_proj(c_q)
        q_nope, q_pe = q.view(b, t, self.num_heads, -1).transpose(1, 2).split([self.nope, self.rope], dim=-1)
        c_kv, k_pe = kv.split([self.rank, self.rope], dim=-1)
        # q_pe and the one k_pe head rotate in one pass (a decode step's ops are mostly fixed costs)
        pe = rotate_pairs(torch.cat((q_pe, k_pe[:, None]), dim=1), cos, sin, self.interleaved)
        q_pe, k_pe = pe[:, :self.num_heads], pe[:, self.num_heads]
        return q_nope, q_pe, c_q, layer_cache.update(span, self.kv_a_layernorm(c_kv), k_pe)

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """[B, H, T, v_dim] -> the layer's output [B, T, hidden]."""
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _expanded(self, q_nope, q_pe, latent, start: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Per-head keys and values from the latents through kv_b_proj, then ordinary attention. `allowed`
        [B, T, total] replaces the causal mask (sparse attention's selection)."""
        b, h, t, _ = q_nope.shape
        total = latent.shape[1]
        c_kv, k_pe = latent.split([self.rank, self.rope], dim=-1)
        kv = self.kv_b_proj(c_kv).view(b, total, h, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, None].expand(b, h, total, self.rope)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        if allowed is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=self.softmax_scale)
        mask = None if t == 1 or start == 0 else causal_mask(start, t, total, q.device)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=start == 0 and t > 1, scale=self.softmax_scale
        )

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head into W_UK [H, nope, rank] and W_UV^T [H, rank, v_dim], contiguous so
        that the per-step batched products read them once instead of copying strided views every step.
        On CPU in float32: torch's bfloat16 bmm of one row per head fell back to plain loops on a CPU without
        AVX512-BF16 (430 us a call, a fifth of a DeepSeek-V3-shaped int4 decode step); the copy is twice
        kv_b_proj's bytes in bfloat16, well under 1% of a DeepSeek model. Rebuilt whenever kv_b_proj's weight
        is replaced or changed in place."""
        weight = self.kv_b_proj.weight
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if self._absorbed_weights is None or self._absorbed_weights[0] != key:
            w = weight.detach().view(self.num_heads, self.nope + self.v_dim, self.rank)
            if w.device.type == "cpu":
                w = w.float()
            w_uk = w[:, : self.nope].contiguous()
            w_uv_t = w[:, self.nope:].transpose(1, 2).contiguous()
            self._absorbed_weights = (key, w_uk, w_uv_t)
        return self._absorbed_weights[1], self._absorbed_weights[2]

    def _absorbed(self, q_nope, q_pe, latent, start: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """score = (q_nope W_UK) . c_kv + q_pe . k_pe; output = (p . c_kv) W_UV, on the latent cache itself.
        All heads share the one latent, so heads fold into the query axis of a single-head attention.
        `allowed` [B, T, total] replaces the causal mask (sparse attention's selection)."""
        b, h, t, _ = q_nope.shape
        total = latent.shape[1]
        q = self.absorbed_query(q_nope, q_pe)  # [B, 1, H*T, rank + rope]
        if t == 1 and allowed is None:  # a decode step: two small float32 products beat SDPA's math path
            cached = latent.float()
            scores = torch.matmul(q[:, 0].float(), cached.transpose(1, 2)) * self.softmax_scale  # [B, H, total]
            out = torch.matmul(scores.softmax(dim=-1), cached[..., : self.rank])[:, None].to(q.dtype)
        else:
            if allowed is None:
                mask = causal_mask(start, t, total, q.device).repeat(h, 1)
            else:  # heads fold into the query axis: each head sees its query's selection
                mask = allowed[:, None].expand(b, h, t, total).reshape(b, 1, h * t, total)
            out = F.scaled_dot_product_attention(
                q, latent[:, None], latent[:, None, :, : self.rank], attn_mask=mask, scale=self.softmax_scale
            )  # [B, 1, H*T, rank]
        return self.absorbed_output(out.view(b, h, t, self.rank))

    def absorbed_query(self, q_nope, q_pe) -> torch.Tensor:
        """[q_nope W_UK | q_pe] with heads folded into the query axis: [B, 1, H*T, rank + rope]."""
        b, h, t, _ = q_nope.shape
        w_uk, _ = self.absorbed_weights()
        rows = q_nope.transpose(0, 1).reshape(h, b * t, self.nope).to(w_uk.dtype)
        q_latent = torch.bmm(rows, w_uk).to(q_pe.dtype).view(h, b, t, self.rank).transpose(0, 1)  # [B, H, T, rank]
        return torch.cat((q_latent, q_pe), dim=-1).reshape(b, 1, h * t, self.rank + self.rope)

    def absorbed_output(self, mixed: torch.Tensor) -> torch.Tensor:
        """Mixed latents [B, H, T, rank] through W_UV -> [B, H, T, v_dim]."""
        b, h, t, _ = mixed.shape
        _, w_uv_t = self.absorbed_weights()
        out = torch.bmm(mixed.transpose(0, 1).reshape(h, b * t, self.rank).to(w_uv_t.dtype), w_uv_t)
        return out.to(mixed.dtype).view(h, b, t, self.v_dim).transpose(0, 1)

    def _absorbed_static(self, q_nope, q_pe, latent, positions, selected=None) -> torch.Tensor:
        """The absorbed form for a compiled decode step: one query per sequence over all the cache rows it
        is handed, those after its position masked (or, with `selected`, over those rows only). The per-head
        products are multiply-and-sum, which inductor streams (its bmm path is slow for one row). The
        weights were built before compiling (`DeepseekForCausalLM.derived_tensors`)."""
        _, w_uk, w_uv_t = self._absorbed_weights
        dtype = q_nope.dtype
        q_latent = (q_nope.float().unsqueeze(-1) * w_uk.float()[:, None]).sum(-2).to(dtype)  # [B, H, 1, rank]
        q = torch.cat((q_latent, q_pe), dim=-1)[:, :, 0].float()  # [B, H, rank + rope]
        if selected is not None:
            mixed = gathered_attention(q, latent, *selected, self.softmax_scale, self.rank).to(dtype)
        else:
            cached = latent.float()
            scores = torch.matmul(q, cached.transpose(1, 2)) * self.softmax_scale  # [B, H, max_len]
            hidden = torch.arange(latent.shape[1], device=latent.device) > positions[..., None]  # [1 or B, 1, L]
            probs = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1)
            mixed = torch.matmul(probs, cached[..., : self.rank]).to(dtype)  # [B, H, rank]
        out = (mixed.float().unsqueeze(-1) * w_uv_t.float()).sum(-2).to(dtype)  # [B, H, v_dim]
        return out[:, :, None]


class IndexedMLAttention(MLAttention):
    """MLA with DeepSeek Sparse Attention (V3.2, `llmcli.models.dsa`): the indexer picks the keys each
    query attends to. `mode`: "sparse" (decode steps attend to the gathered selection only), "masked"
    (dense attention under the selection mask, as transformers runs it) or "dense" (the indexer ignored:
    V3's MLA on the same weights, for comparisons)."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__(cfg)
        self.index = index
        self.indexer = Indexer(cfg.hidden_size, cfg.q_lora_rank, self.rope, indexer_settings(cfg))
        self.mode = "sparse"

    def forward(self, x, cos, sin, layer_cache, span: Span, absorbed: bool, recorder=None) -> torch.Tensor:
        q_nope, q_pe, c_q, latent = self.project(x, cos, sin, layer_cache, span)
        keys = layer_cache.update_index(span, self.indexer.keys(x, cos, sin))
        t, total = x.shape[1], latent.shape[1]
        if recorder is None and (self.mode == "dense" or (
                self.mode == "sparse" and not span.static and total <= self.indexer.topk)):
            # No more keys than the indexer keeps: every visible key is selected, plain MLA (no scoring).
            return self.output(self.attend(q_nope, q_pe, latent, span, absorbed))
        visible = self._visible(span, t, total)
        scores = self.indexer.scores(x, c_q, cos, sin, keys)  # [B, T, total]
        indices = select(scores, visible, self.indexer.topk)
        if recorder is not None:
            self._record(recorder, q_nope, q_pe, latent, visible, indices, scores)
        if self.mode == "dense":
            return self.output(self.attend(q_nope, q_pe, latent, span, absorbed))
        if span.static:  # rows past the position may fill the selection of an early position: mask them
            valid = indices[:, 0] <= span.positions[..., :1]  # [B, k]: the first query's, [1] or per row [B, 1]
            return self.output(self.attend(q_nope, q_pe, latent, span, absorbed, selected=(indices[:, 0], valid)))
        if self.mode == "sparse" and absorbed and t == 1 and total > self.indexer.topk:
            q = self.absorbed_query(q_nope, q_pe)[:, 0]  # [B, H, rank + rope]
            mixed = gathered_attention(q, latent, indices[:, 0], None, self.softmax_scale, self.rank)
            return self.output(self.absorbed_output(mixed[:, :, None].to(q.dtype)))
        allowed = selection_mask(indices, visible, total)
        return self.output(self.attend(q_nope, q_pe, latent, span, absorbed, allowed=allowed))

    @staticmethod
    def _visible(span: Span, t: int, total: int) -> torch.Tensor | None:
        """[T, total] keys each query may see, [B, T, total] where each row has its own positions (None: all of
        them, a decode step over its cache)."""
        device = span.positions.device
        if span.static:
            return torch.arange(total, device=device) <= span.positions[..., None]
        return None if t == 1 else causal_mask(span.start, t, total, device)

    def _record(self, recorder, q_nope, q_pe, latent, visible, indices, scores) -> None:
        """For trace: the selection, the index scores and dense MLA's own attention weights (head mean)."""
        b, h, t, _ = q_nope.shape
        q = self.absorbed_query(q_nope, q_pe).view(b, h, t, -1).float()
        logits = torch.matmul(q, latent.float()[:, None].transpose(-1, -2)) * self.softmax_scale
        if visible is not None:
            logits = logits.masked_fill(~visible.unsqueeze(-3), float("-inf"))  # the same for every head
            scores = scores.masked_fill(~visible, float("-inf"))
        valid = torch.ones_like(indices, dtype=torch.bool) if visible is None else visible.expand(
            b, -1, -1).gather(-1, indices)
        recorder.record(self.index, INDEXER, IndexerChoice(indices, valid, scores, logits.softmax(-1).mean(1)))


class Router(nn.Module):
    """Chooses num_experts_per_tok experts per token. Scores (softmax or sigmoid) come from float32
    logits; noaux_tc adds e_score_correction_bias for choosing only, the weights use unbiased scores."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.method, self.scoring = cfg.num_experts_per_tok, cfg.topk_method, cfg.scoring_func
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.normalise, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if self.method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts))

    def keep_float32(self) -> None:
        """Routing is decided in float32 (a bf16 bias would blur close choices); the weights are tiny."""
        for name, param in list(self._parameters.items()):
            if param is not None and param.dtype != torch.float32:
                setattr(self, name, nn.Parameter(param.detach().float(), requires_grad=False))

    def forward(self, x: torch.Tensor) -> RouterChoice:
        """x [N, hidden] -> choice for each of the N tokens."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias if self.method == "noaux_tc" else scores
        groups = None
        if self.method != "greedy":
            grouped = choice.view(x.shape[0], self.n_group, -1)
            if self.method == "noaux_tc":
                group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_score = grouped.amax(dim=-1)
            groups = group_score.topk(self.topk_group, dim=-1).indices
            kept = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, groups, True)
            choice = choice.masked_fill(~kept.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
        experts = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
        if self.normalise and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights, order = (weights * self.scaling).sort(dim=-1, descending=True)
        return RouterChoice(experts=experts.gather(1, order), weights=weights, scores=scores, groups=groups)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)

    def forward(self, x: torch.Tensor, index: int, recorder=None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        choice = self.gate(flat)
        routed = self.experts(flat, choice).view(x.shape)
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        if recorder is not None:
            recorder.record(index, ROUTER, choice)
            recorder.record(index, ROUTED_OUT, routed)
            if shared is not None:
                recorder.record(index, SHARED_OUT, shared)
        return routed if shared is None else routed + shared


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = IndexedMLAttention(cfg, index) if cfg.family == "deepseek_v32" else MLAttention(cfg, index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(index)
        self.mlp = MoE(cfg) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, cache, span: Span, absorbed: bool, recorder=None) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), cos, sin, cache.layers[self.index], span, absorbed, recorder)
        mid = x + attn
        h = self.post_attention_layernorm(mid)
        mlp = self.mlp(h, self.index, recorder) if self.is_moe else self.mlp(h)
        out = mid + mlp
        record_residuals(recorder, self.index, x, attn, mid, mlp, out)
        return out


class DeepseekBody(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DeepseekBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # "auto": expanded for prompts, absorbed for single-token steps; tests force one form.
        self.attention_form = "auto"
        self._skipped_mtp = 0
        self.init_buffers()

    def init_buffers(self, device=None) -> None:
        cfg = self.config
        inv_freq, self.rope_scale = rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        for layer in self.model.layers:
            if layer.is_moe:
                layer.mlp.gate.keep_float32()
            if isinstance(layer.self_attn, IndexedMLAttention):
                layer.self_attn.indexer.keep_float32()
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def keeps_weight(self, module_name: str) -> bool:
        """The absorbed decode form reads kv_b_proj's weight directly, so it stays a plain tensor; so does the
        sparse attention indexer's float32 head weighting."""
        return module_name.endswith(("kv_b_proj", "indexer.weights_proj"))

    def checkpoint_tensors(self, name: str, load):
        """Skip the multi-token-prediction layers (model.layers.{num_layers} and up): generation never
        uses them. Everything else loads under its own name."""
        match = _LAYER_INDEX.match(name)
        if match and int(match.group(1)) >= self.config.num_layers:
            self._skipped_mtp += 1
            return None
        return [(name, load())]

    def load_notes(self) -> list[str]:
        if not self._skipped_mtp:
            return []
        return [f"skipped {self._skipped_mtp} multi-token-prediction tensors "
                f"(model.layers.{self.config.num_layers}.*): not used for generation"]

    def make_cache(self, batch: int, max_len: int, dtype=None, device=None) -> Cache:
        cfg = self.config
        dtype = dtype or self.model.embed_tokens.weight.dtype
        device = device or self.model.embed_tokens.weight.device
        if cfg.family == "deepseek_v32":  # the indexer's keys beside the latents
            dim = indexer_settings(cfg).head_dim
            layers = [IndexedLatentCache(batch, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dim, dtype, device)
                      for _ in range(cfg.num_layers)]
        else:
            layers = [LatentLayerCache(batch, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype, device)
                      for _ in range(cfg.num_layers)]
        return Cache(layers, max_len)

    def set_sparse_mode(self, mode: str) -> None:
        """How V3.2's sparse attention layers run (`IndexedMLAttention.mode`): sparse, masked or dense."""
        if mode not in SPARSE_MODES:
            raise ValueError(f"sparse mode must be one of {SPARSE_MODES}, got {mode!r}")
        for layer in self.model.layers:
            if isinstance(layer.self_attn, IndexedMLAttention):
                layer.self_attn.mode = mode

    def derived_tensors(self) -> list[torch.Tensor]:
        """The absorbed form's per-head split of every kv_b_proj."""
        return [w for layer in self.model.layers for w in layer.self_attn.absorbed_weights()]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache, recorder=None,
                last_only: bool = False) -> torch.Tensor:
        if self.attention_form not in FORMS:
            raise ValueError(f"attention_form must be one of {FORMS}, got {self.attention_form!r}")
        t = input_ids.shape[1]
        span = self.span(positions, cache)
        absorbed = self.attention_form == "absorbed" or (
            self.attention_form == "auto" and t == 1 and not span.static and span.start > 0)
        x = self.model.embed_tokens(input_ids)
        cos, sin = pair_cos_sin(positions, self.inv_freq, self.rope_scale, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, span, absorbed, recorder)
        return self.logits(x, t, cache, recorder, last_only)

    def attention_info(self, index: int, cache: Cache | None = None) -> dict:
        cfg = self.config
        attn = self.model.layers[index].self_attn
        element = (cache.layers[index].kv.element_size() if cache is not None
                   else self.model.embed_tokens.weight.element_size())
        info = {
            "type": "mla",
            "window": None,
            "heads": cfg.num_heads,
            "kv_heads": 1,  # one latent shared by every head
            "head_dim": cfg.qk_nope_head_dim + cfg.qk_rope_head_dim,
            "rope_base": cfg.rope_theta,
            "yarn_factor": cfg.rope_scaling.factor if cfg.rope_scaling.type == "yarn" else None,
            "rope_scale": self.rope_scale,
            "logn_scale": None,
            "ntk_alpha": None,
            "cache_bytes_per_token": (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * element,
            "kv_lora_rank": cfg.kv_lora_rank,
            "q_lora_rank": cfg.q_lora_rank,
            "qk_rope_head_dim": cfg.qk_rope_head_dim,
            "v_head_dim": cfg.v_head_dim,
            "softmax_scale": attn.softmax_scale,
            "rope_interleaved": attn.interleaved,
        }
        if isinstance(attn, IndexedMLAttention):  # sparse attention: the indexer's keys are cached too
            indexer = attn.indexer
            info.update(type="mla+dsa", index_topk=indexer.topk, index_heads=indexer.heads,
                        index_head_dim=indexer.head_dim, sparse_mode=attn.mode,
                        cache_bytes_per_token=(cfg.kv_lora_rank + cfg.qk_rope_head_dim + indexer.head_dim) * element)
            if cache is not None:
                info["attended"] = min(indexer.topk, cache.length)
        return info
