"""Eager CPU steps between the products, each as one of llmcli's fused ops (kernels/decode_ops.cpp): RMSNorm;
a decode step's attention (RoPE, cache write, softmax attention over the cache) for the Qwen families'
attention and DeepSeek's absorbed latent attention; DeepSeek's router; and an MLP on the integer kernels
(both products and silu(gate) * up, for routed experts also their weighted mix). silu is torch's everywhere (the
integer MLP's op calls it from C++): its vectorised exp beat a plain loop's (a 4864-wide step: 35 us to 62), and
it gives the model code's bits.

An eager decode step of the Qwen2.5-0.5B shape (int4, 2 cores) spent about a third of its time in torch ops on
a few thousand numbers each (dispatch and allocation, not arithmetic): 78 us per RMSNorm of one row, 345 us
per layer of attention besides its two products. `install` swaps these modules for subclasses that call the
fused op where it applies (CPU, not compiling; attention: one new token, plain RoPE, a contiguous cache) and
run the model's own code otherwise; a recorder that asks for attention probabilities gets them computed beside
the op, so that tracing does not change the logits. The ops round like the
torch code they replace, except that sums are added in another order (last-bit differences).
Where the model's own code must rotate the query and write the cache (partial RoPE, the hybrids' gated attention),
only the attention over the cache is an op (`attended_by_op`).
Where every product of a layer runs in llmcli's CPU kernels (the integer kernels, or bfloat16 panels), the whole
layer is one op (kernels/decode_layer.cpp: the same ops called from C++, bit for bit): the Python between the ops
was about a tenth of a step.
`Options.fused_decode` (LLMCLI_FUSED_DECODE=0) leaves the modules as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from llmcli.backends import cpu_kernels
from llmcli.backends.deltanet_op import FusedGatedDeltaNet
from llmcli.backends.experts import StackedExperts
from llmcli.backends.int4 import Int4Linear
from llmcli.backends.int8 import Int8Linear
from llmcli.backends.linear import FEW_ROWS, BlockedLinear
from llmcli.backends.router import PanelRouter, op_weight
from llmcli.models.cache import KVLayerCache, LatentLayerCache
from llmcli.models.deepseek import DecoderLayer as DeepseekLayer
from llmcli.models.deepseek import MLAttention, MoE, Router
from llmcli.models.deltanet import GatedDeltaNet
from llmcli.models.gated_attention import GatedAttention, ZeroCentredRMSNorm
from llmcli.models.hooks import ATTN_PROBS, AttentionWeights, RouterChoice, asks
from llmcli.models.layers import RMSNorm, SwiGLU, head_probs
from llmcli.models.qwen import Attention, DecoderLayer
from llmcli.models.qwen_moe import SharedExpertGate, SparseMoeBlock, TopKRouter
from llmcli.models.rope import rotate_pairs


def eager_cpu(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


class FusedRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if eager_cpu(x) and x.dtype == self.weight.dtype:
            return torch.ops.llmcli.rms_norm(x.contiguous(), self.weight, self.eps)
        return super().forward(x)


class FusedZeroCentredRMSNorm(ZeroCentredRMSNorm):
    """The hybrids' x_hat * (1 + w) as one op (six torch ops, about 40 us a decode row)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if eager_cpu(x) and x.dtype == self.weight.dtype:
            return torch.ops.llmcli.zero_centred_rms_norm(x.contiguous(), self.weight, self.eps)
        return super().forward(x)


ONE_QUERY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def attended_by_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                   positions: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor | None:
    """The models' eager one-query attention as one op, or None where it does not apply: q rotated, the cache
    written; the last `window` (None: all) of the keys of the views k and v (`one_query_attention_eager`), or with
    `positions` ([1] or [B, 1] int64, a static step) of each row's keys up to its position. The float32 products
    took 17 ms a layer of Qwen-7B's heads at 4,001 keys, the op 3.5 (widened once per kv head, keys shared out over
    the threads); a static step's multiply-and-sum over the whole cache 8.9 ms a layer for 4 rows of the 0.5B shape
    at 2,048, the op 0.3."""
    if not (eager_cpu(q) and q.dtype in ONE_QUERY_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and k.stride(-1) == 1 and v.stride(-1) == 1 and k.shape[2] > 0):
        return None
    if positions is not None and not one_position_a_row(positions):
        return None
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.llmcli.one_query_attention(q, k, v, scale, positions, window or 0)


def one_position_a_row(positions: torch.Tensor) -> bool:
    """A static step's positions the ops take as they are: int64 on the CPU, [1] or [B, 1] (one new token)."""
    return positions.dtype == torch.long and positions.device.type == "cpu" and positions.shape[-1] == 1


class OneQueryAttention(Attention):
    """Qwen attention whose eager one-token step runs the model's own projections, RoPE (partial, or wherever the
    fused op does not apply) and cache write, then `attended_by_op`."""

    def attend_one_query(self, q, k, v, mask, scale) -> torch.Tensor:
        out = attended_by_op(q, k, v, scale, window=self.window)  # one query's mask: this layer's window, if any
        return super().attend_one_query(q, k, v, mask, scale) if out is None else out

    def attend_static(self, q, k, v, mask, scale, positions) -> torch.Tensor:
        out = attended_by_op(q, k, v, scale, positions, self.window)
        return super().attend_static(q, k, v, mask, scale, positions) if out is None else out


class OneQueryGatedAttention(GatedAttention):
    """Qwen3-Next / Qwen3.5 gated attention, its eager one-token attention (and the server's static steps) as
    `attended_by_op`."""

    def attend_one_query(self, q, k, v, mask) -> torch.Tensor:
        out = attended_by_op(q, k, v, None) if mask is None else None
        return super().attend_one_query(q, k, v, mask) if out is None else out

    def attend_static(self, q, k, v, mask, positions) -> torch.Tensor:
        out = attended_by_op(q, k, v, None, positions)
        return super().attend_static(q, k, v, mask, positions) if out is None else out


class FusedDecodeAttention(OneQueryAttention):
    def forward(self, x, cos, sin, layer_cache, span, q_scale=None, recorder=None) -> torch.Tensor:
        if not self._fits(x, cos, layer_cache, span, q_scale, recorder):
            return super().forward(x, cos, sin, layer_cache, span, q_scale, recorder)
        b = x.shape[0]
        h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x).view(b, h + 2 * kv, d)
        if self.q_norm is not None:  # Qwen3: q and k normalised together, then each norm's weight
            qk = self.qk_norm_weight[:, 0] * self.q_norm.normalized(qkv[:, :h + kv])
            qkv = torch.cat((qk, qkv[:, h + kv:]), dim=1)
        scale = d ** -0.5 if q_scale is None else q_scale / d ** 0.5  # as the torch path computes it
        out = torch.ops.llmcli.decode_attention(qkv.contiguous(), cos.reshape(-1), sin.reshape(-1), layer_cache.k,
                                                layer_cache.v, span.start, h, self.window or 0, scale)
        if asks(recorder, ATTN_PROBS):  # beside the op, as the torch path records them beside its kernel
            q = self._rope(qkv[:, :h], cos, sin).unsqueeze(2)  # the op's rotation, bit for bit
            keys = layer_cache.k[:span.start + 1].permute(1, 2, 0, 3)
            probs = head_probs(q, keys, scale, span.start, self.window)
            recorder.record(self.index, ATTN_PROBS, AttentionWeights(probs, span.start))
        return self.o_proj(out.view(b, 1, h * d))

    def _fits(self, x, cos, layer_cache, span, q_scale, recorder) -> bool:
        """Per call (what `install` could not know): an eager CPU step of one token, RoPE in the model's dtype or
        in float32 (original Qwen), a contiguous cache of the model's dtype with room for the token."""
        return (eager_cpu(x) and x.shape[1] == 1 and not span.static and cos.dtype in (x.dtype, torch.float32)
                and (q_scale is None or isinstance(q_scale, float)) and isinstance(layer_cache, KVLayerCache)
                and layer_cache.k.dtype == x.dtype and layer_cache.k.is_contiguous()
                and layer_cache.v.is_contiguous() and span.start < layer_cache.k.shape[0])

    @staticmethod
    def takes(attention: Attention) -> bool:
        """Once, at install: q, k and v fused into one product, and RoPE over the whole head."""
        return attention.qkv_sizes is not None and attention.rotary_dim is None


class FusedMLAttention(MLAttention):
    """DeepSeek's absorbed one-token attention as one op after the two input products: kv_a's norm, RoPE, the
    cache write, q_nope W_UK, softmax over the latent cache and W_UV (about 20 torch ops and two batched products
    of one row per head, 1.3 ms of a DeepSeek-V3-shaped layer's step besides its products)."""

    def forward(self, x, cos, sin, layer_cache, span, absorbed: bool, recorder=None) -> torch.Tensor:
        if not (absorbed and self._fits(x, cos, layer_cache, span)):
            return super().forward(x, cos, sin, layer_cache, span, absorbed, recorder)
        b = x.shape[0]
        if self.in_sizes is not None:
            q, kv = self.in_proj(x).split(self.in_sizes, dim=-1)
        else:
            q, kv = (self.q_a_proj(x) if self.q_lora else self.q_proj(x)), self.kv_a_proj_with_mqa(x)
        if self.q_lora:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.view(b, self.num_heads, -1)
        norm = self.kv_a_layernorm
        out = torch.ops.llmcli.mla_decode(q, kv.contiguous(), norm.weight, norm.eps, cos.reshape(-1), sin.reshape(-1),
                                          layer_cache.kv, span.start, self.kv_b_proj.weight, self.v_dim,
                                          self.softmax_scale, self.interleaved)
        if asks(recorder, ATTN_PROBS):  # beside the op, from the rows it wrote: the torch path's rounding
            q_nope, q_pe = q[:, :, None].split([self.nope, self.rope], dim=-1)
            q_pe = rotate_pairs(q_pe, cos, sin, self.interleaved)
            probs = self.absorbed_probs(q_nope, q_pe, layer_cache.kv[:span.start + 1].transpose(0, 1), span.start)
            recorder.record(self.index, ATTN_PROBS, AttentionWeights(probs, span.start))
        return self.o_proj(out.view(b, 1, -1))

    def _absorbed_static(self, q_nope, q_pe, latent, positions, selected=None) -> torch.Tensor:
        """A static step in eager (the server's batch of rows at their own positions) as one op after the model's
        cache write: the torch form multiplies and sums over every cache row, masked (`mla_attend`: each row's
        keys only)."""
        weight = self.kv_b_proj.weight
        if (selected is None and eager_cpu(q_nope) and q_nope.dtype in ONE_QUERY_DTYPES and q_nope.shape[2] == 1
                and one_position_a_row(positions) and q_pe.dtype == q_nope.dtype
                and latent.dtype == q_nope.dtype
                and latent.stride(-1) == 1 and isinstance(weight, torch.Tensor) and weight.is_contiguous()
                and weight.dtype in (q_nope.dtype, torch.float32)):
            return torch.ops.llmcli.mla_attend(q_nope, q_pe, latent, weight, self.v_dim, self.softmax_scale,
                                               positions)
        return super()._absorbed_static(q_nope, q_pe, latent, positions, selected)

    def _fits(self, x, cos, layer_cache, span) -> bool:
        """An eager CPU step of one token, cos/sin of one position in the model's dtype, a contiguous latent
        cache of that dtype with room for the token, kv_b_proj a plain weight."""
        weight = self.kv_b_proj.weight
        return (eager_cpu(x) and x.shape[1] == 1 and not span.static and cos.dtype == x.dtype
                and cos.numel() == self.rope // 2 and type(layer_cache) is LatentLayerCache
                and layer_cache.kv.dtype == x.dtype and layer_cache.kv.is_contiguous()
                and span.start < layer_cache.kv.shape[0] and isinstance(weight, torch.Tensor)
                and weight.dtype in (x.dtype, torch.float32) and weight.is_contiguous()
                and self.kv_a_layernorm.weight.dtype == x.dtype)


ROUTING_METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}  # the op's method codes
FEW_TOKENS = 16  # the op picks experts in plain loops: for decode steps and small batches


class FusedRouter(Router):
    """A DeepSeek router for a few tokens as one op: torch's float32 logits and scores, then group and expert
    choice in plain loops (about 20 torch ops of a handful of numbers each, 470 us a layer on a
    DeepSeek-V3-shaped decode step)."""

    def forward(self, x: torch.Tensor) -> RouterChoice:
        if not (eager_cpu(x) and x.shape[0] <= FEW_TOKENS and self.method in ROUTING_METHODS
                and self.scoring in ("sigmoid", "softmax") and self.weight.dtype == torch.float32):
            return super().forward(x)
        bias = self.e_score_correction_bias if self.method == "noaux_tc" else None
        experts, weights, scores, groups = torch.ops.llmcli.route(
            x, self.weight, bias, self.top_k, ROUTING_METHODS[self.method], self.n_group or 1,
            self.topk_group or 1, self.scoring == "sigmoid", bool(self.normalise), float(self.scaling))
        return RouterChoice(experts=experts, weights=weights, scores=scores,
                            groups=None if self.method == "greedy" else groups)


def integer_weights(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(blocks, scales) of a product on the integer kernels, without a bias; None for any other product."""
    product = integer_product(linear)
    return None if product is None or product[2] is not None else product[:2]


class FusedSwiGLU(SwiGLU):
    """An MLP on the integer kernels as one op for a few rows: both products, silu(gate) * up between them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if eager_cpu(x) and x.numel() <= FEW_TOKENS * x.shape[-1]:
            return torch.ops.llmcli.int_swiglu(x, *integer_weights(self.gate_up_proj), *integer_weights(self.down_proj))
        return super().forward(x)

    @staticmethod
    def takes(mlp: SwiGLU) -> bool:
        """Both products on the integer kernels in one format family: int8 with a scale per row, or the low-bit
        layouts (the op runs each: a Q4_K_M's ffn_down in Q6_K takes int5 beside a 4-bit gate_up)."""
        gate_up, down = integer_weights(mlp.gate_up_proj), integer_weights(mlp.down_proj)
        return mlp.fused and gate_up is not None and down is not None and gate_up[0].dtype == down[0].dtype


class FusedStackedExperts(StackedExperts):
    """A decode step's routed experts on the integer kernels as one op: the k experts' gate_up products, SwiGLU,
    their down products and the weighted mix (about 10 torch ops besides the products, 370 us a layer of a
    DeepSeek-V3-shaped int8 step)."""

    def _stacked(self, x: torch.Tensor, choice: RouterChoice) -> torch.Tensor:
        if not eager_cpu(x):
            return super()._stacked(x, choice)
        return torch.ops.llmcli.int_swiglu(x, *self.stack("gate_up_proj"), *self.stack("down_proj"),
                                           choice.experts, choice.weights.float())

    @staticmethod
    def takes(experts: StackedExperts) -> bool:
        first = experts[0]
        return experts.kernel and all(integer_weights(getattr(first, name)) is not None
                                      for name in ("gate_up_proj", "down_proj"))


def integer_product(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(blocks, scales, bias) of a product on the integer kernels; None for any other product."""
    if isinstance(linear, Int8Linear) and linear.integer:
        return linear.weight, linear.scales, linear.bias
    if isinstance(linear, Int4Linear) and linear.integer:
        return linear.packed, linear.scales_and_mins, linear.bias
    return None


def layer_weights(layer: nn.Module, gather) -> tuple:
    """A layer op's arguments that are the layer's own tensors and sizes: gathered (`gather()`) at its first step
    and kept, since preparation swaps no module after installing the ops. Looking them up took ~20 us a layer,
    every step (Qwen2.5-0.5B shape: 0.5 ms of a 12 ms int4 step)."""
    weights = layer.__dict__.get("_op_weights")
    if weights is None:
        weights = layer._op_weights = gather()
    return weights


def hooked(*modules: nn.Module) -> bool:
    """Does any of the modules have forward hooks (tensor parallelism's all-reduce), which one op would skip?"""
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


class FusedQwenLayer(DecoderLayer):
    """A Qwen2/Qwen3 decoder layer (q/k/v fused, with or without bias, with or without q/k norms; a dense MLP or a
    Qwen MoE block) with every product in llmcli's CPU kernels (the integer kernels, or bfloat16 panels) as one op
    for one new token: its ops back to back from C++ (kernels/decode_layer.cpp), bit for bit the op-by-op path.
    Qwen2.5-0.5B shape, int4, 2 threads: about 2 ms of a 15 ms step was Python between the ops. With a recorder, or
    where the attention op does not apply, the layer runs its modules as before."""

    def forward(self, x, cos, sin, cache, span, recorder=None, q_scale=None) -> torch.Tensor:
        attn, layer_cache = self.self_attn, cache.layers[self.index]
        if (recorder is not None or x.dtype != self.input_layernorm.weight.dtype or x.shape[0] > FEW_ROWS
                or hooked(attn, self.mlp) or not attn._fits(x, cos, layer_cache, span, q_scale, recorder)):
            # FEW_ROWS: where the experts take their stacks
            return super().forward(x, cos, sin, cache, span, recorder, q_scale)
        d = attn.head_dim
        scale = d ** -0.5 if q_scale is None else q_scale / d ** 0.5  # as the attention module computes it
        first, last = layer_weights(self, self._weights)
        return torch.ops.llmcli.qwen_decode_layer(x, *first, cos.reshape(-1), sin.reshape(-1), layer_cache.k,
                                                  layer_cache.v, span.start, attn.num_heads, d, attn.window or 0,
                                                  scale, *last)

    def _weights(self) -> tuple[tuple, tuple]:
        """The op's arguments before the attention's (norm, q/k/v product, q/k norms) and after them (output
        product, norm, MLP, the products' widths)."""
        attn, norm1, norm2 = self.self_attn, self.input_layernorm, self.post_attention_layernorm
        qk_norm, qk_eps = (None, 0.0) if attn.q_norm is None else (attn.qk_norm_weight[:, 0], attn.q_norm.eps)
        (qkv_w, qkv_s, qkv_bias, qkv_n), (o_w, o_s, o_bias, o_n) = kernel_product(attn.qkv_proj), kernel_product(
            attn.o_proj)
        mlp, widths = self._mlp_arguments()
        return ((norm1.weight, norm1.eps, qkv_w, qkv_s, qkv_bias, qk_norm, qk_eps),
                (o_w, o_s, o_bias, norm2.weight, norm2.eps, *mlp, [qkv_n, o_n, *widths]))

    def _mlp_arguments(self) -> tuple[tuple, list[int]]:
        """The op's MLP arguments: gate_up and down with their scales (the dense MLP's or the shared expert's, else
        None), then the router (its weight or panels), [top_k, normalise, experts], the experts' stacks and the shared
        expert's gate (None without a router); and the widths of those gate_up, down, and the experts' gate_up and
        down."""
        mlp = self.mlp
        if not self.is_moe:
            widths = [mlp.gate_up_proj.out_features, mlp.down_proj.out_features, 0, 0]
            return (*mlp_products(mlp), None, [], None, None, None, None, None), widths
        shared, experts = mlp.shared_expert, mlp.experts
        widths = [0, 0] if shared is None else [shared.gate_up_proj.out_features, shared.down_proj.out_features]
        widths += [experts[0].gate_up_proj.out_features, experts[0].down_proj.out_features]
        dense = (None,) * 4 if shared is None else mlp_products(shared)
        gate = mlp.gate
        router, count = op_weight(gate)
        return (*dense, router, [gate.top_k, int(bool(gate.normalise)), count],
                *experts.stack("gate_up_proj"), *experts.stack("down_proj"),
                None if shared is None else mlp.shared_expert_gate.weight), widths

    @staticmethod
    def takes(layer: DecoderLayer) -> bool:
        """Once, at install: a layer whose attention the decode op takes and whose products all run in a CPU
        kernel: a dense MLP, or a MoE block with stacked experts (and a shared expert, if any)."""
        attn, mlp = layer.self_attn, layer.mlp
        if type(attn) is not Attention or not FusedDecodeAttention.takes(attn):
            return False
        if layer.is_moe:
            routers = (TopKRouter, PanelRouter)
            if type(mlp) is not SparseMoeBlock or type(mlp.gate) not in routers or not stacked_in_kernel(mlp.experts):
                return False
            if mlp.shared_expert is not None and (mlp_products(mlp.shared_expert) is None
                                                  or type(mlp.shared_expert_gate) is not SharedExpertGate):
                return False
        elif mlp_products(mlp) is None:
            return False
        products = [kernel_product(attn.qkv_proj), kernel_product(attn.o_proj)]
        dtype = layer.input_layernorm.weight.dtype  # what the op's biases must be in: the rows' dtype
        return all(p is not None and (p[2] is None or p[2].dtype == dtype) for p in products)


def stacked_in_kernel(experts: nn.Module) -> bool:
    """Stacked experts that the layer op runs: on the integer kernels, or in bfloat16 panels."""
    return type(experts) is StackedExperts and experts.kernel and (
        FusedStackedExperts.takes(experts) or experts.stack("gate_up_proj")[0].dtype == torch.bfloat16)


def kernel_product(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int] | None:
    """(weights, scales, bias, outputs) of a product in one of llmcli's CPU kernels: the integer kernels' blocks with
    their scales, or bfloat16 panels (no scales); None for any other product."""
    if type(linear) is BlockedLinear:
        return linear.weight, None, linear.bias, linear.out_features
    integer = integer_product(linear)
    return None if integer is None else (*integer, linear.out_features)


def mlp_products(mlp: nn.Module) -> tuple | None:
    """A fused SwiGLU's (gate_up, its scales, down, its scales), both on the integer kernels or both in bfloat16
    panels; None otherwise."""
    if not isinstance(mlp, SwiGLU) or not mlp.fused:  # SwiGLU, or FusedSwiGLU once installed
        return None
    gate_up, down = kernel_product(mlp.gate_up_proj), kernel_product(mlp.down_proj)
    if gate_up is None or down is None or gate_up[2] is not None or down[2] is not None:
        return None
    if gate_up[1] is not None and not FusedSwiGLU.takes(mlp):  # integer: the op takes them as one format
        return None
    return (gate_up[0], gate_up[1], down[0], down[1]) if (gate_up[1] is None) == (down[1] is None) else None


class FusedDeepseekLayer(DeepseekLayer):
    """A DeepSeek decoder layer (q_lora, q_a and kv_a fused) with every product in llmcli's CPU kernels (the integer
    kernels, or bfloat16 panels) as one op for one new token: the latent attention, then the router, routed and
    shared experts (or the dense MLP), back to back from C++ (kernels/decode_layer.cpp), bit for bit the op-by-op
    path. With a recorder, or where an op does not apply, the layer runs its modules as before."""

    def forward(self, x, cos, sin, cache, span, absorbed: bool, recorder=None) -> torch.Tensor:
        attn, layer_cache = self.self_attn, cache.layers[self.index]
        if (recorder is not None or not absorbed or x.dtype != self.input_layernorm.weight.dtype
                or x.shape[0] > FEW_ROWS or hooked(attn, self.mlp) or not attn._fits(x, cos, layer_cache, span)):
            # FEW_ROWS: where the experts take their stacks
            return super().forward(x, cos, sin, cache, span, absorbed, recorder)
        first, last = layer_weights(self, self._weights)
        return torch.ops.llmcli.deepseek_decode_layer(x, *first, cos.reshape(-1), sin.reshape(-1), layer_cache.kv,
                                                      span.start, *last)

    def _weights(self) -> tuple[tuple, tuple]:
        """The op's arguments before the latent cache's (norms, the input products, the heads) and after them
        (kv_b, the output product, norm, router, experts, MLP, the products' widths)."""
        attn, mlp, norm1, norm2 = self.self_attn, self.mlp, self.input_layernorm, self.post_attention_layernorm
        if self.is_moe:
            gate, experts, dense = mlp.gate, mlp.experts, mlp.shared_experts
            bias = gate.e_score_correction_bias if gate.method == "noaux_tc" else None
            routing = [gate.top_k, ROUTING_METHODS[gate.method], gate.n_group or 1, gate.topk_group or 1,
                       int(gate.scoring == "sigmoid"), int(bool(gate.normalise))]
            router = (gate.weight, bias, routing, float(gate.scaling), *experts.stack("gate_up_proj"),
                      *experts.stack("down_proj"))
            widths = [experts[0].gate_up_proj.out_features, experts[0].down_proj.out_features]
        else:
            dense, router, widths = mlp, (None, None, [], 1.0, None, None, None, None), [0, 0]
        (in_w, in_s, _, in_n), (q_b_w, q_b_s, _, q_b_n), (o_w, o_s, _, o_n) = (
            kernel_product(attn.in_proj), kernel_product(attn.q_b_proj), kernel_product(attn.o_proj))
        outputs = [in_n, q_b_n, o_n, dense.gate_up_proj.out_features, dense.down_proj.out_features, *widths]
        return ((norm1.weight, norm1.eps, in_w, in_s, attn.in_sizes[0], attn.q_a_layernorm.weight,
                 attn.q_a_layernorm.eps, q_b_w, q_b_s, attn.num_heads, attn.kv_a_layernorm.weight,
                 attn.kv_a_layernorm.eps),
                (attn.kv_b_proj.weight, attn.v_dim, attn.softmax_scale, attn.interleaved, o_w, o_s, norm2.weight,
                 norm2.eps, *router, *mlp_products(dense), outputs))

    @staticmethod
    def takes(layer: DeepseekLayer) -> bool:
        """Once, at install: q_lora with q_a and kv_a fused, every product in a CPU kernel without a bias, and for a
        MoE layer a router the route op takes, stacked experts in a kernel and shared experts."""
        attn, mlp = layer.self_attn, layer.mlp
        if type(attn) is not MLAttention or not attn.q_lora or attn.in_sizes is None:
            return False
        products = [kernel_product(getattr(attn, name)) for name in ("in_proj", "q_b_proj", "o_proj")]
        if not all(p is not None and p[2] is None for p in products):
            return False
        if mlp_products(mlp.shared_experts if type(mlp) is MoE else mlp) is None:
            return False
        if type(mlp) is not MoE:
            return True
        gate = mlp.gate
        return (type(gate) is Router and gate.method in ROUTING_METHODS and gate.scoring in ("sigmoid", "softmax")
                and gate.weight.dtype == torch.float32 and stacked_in_kernel(mlp.experts))


def fused_class(module: nn.Module) -> type | None:
    if type(module) is DecoderLayer and FusedQwenLayer.takes(module):
        return FusedQwenLayer
    if type(module) is DeepseekLayer and FusedDeepseekLayer.takes(module):
        return FusedDeepseekLayer
    if type(module) is RMSNorm:
        return FusedRMSNorm
    if type(module) is ZeroCentredRMSNorm:
        return FusedZeroCentredRMSNorm
    if type(module) is Attention:
        return FusedDecodeAttention if FusedDecodeAttention.takes(module) else OneQueryAttention
    if type(module) is GatedAttention:
        return OneQueryGatedAttention
    if type(module) is MLAttention:
        return FusedMLAttention
    if type(module) is Router:
        return FusedRouter
    if type(module) is SwiGLU and FusedSwiGLU.takes(module):
        return FusedSwiGLU
    if type(module) is StackedExperts and FusedStackedExperts.takes(module):
        return FusedStackedExperts
    if type(module) is GatedDeltaNet:
        return FusedGatedDeltaNet
    return None


def available(wait: bool = True) -> bool:
    """The fused ops are in llmcli's CPU kernel library, loaded (or built, with `wait`) here."""
    return (cpu_kernels.load_once() if wait else cpu_kernels.load_if_built())[0]


def install(model: nn.Module) -> None:
    """Give each RMSNorm, each Qwen attention module the op takes and each MLA module its fused subclass (the
    module keeps its parameters, buffers and hooks: only its class changes)."""
    for module in model.modules():
        fused = fused_class(module)
        if fused is not None:
            module.__class__ = fused
