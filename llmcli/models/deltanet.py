"""Gated DeltaNet: the linear-attention token mixer of Qwen3-Next and Qwen3.5 (three layers in four).

Each value head keeps a state S [dk, dv] (float32) instead of a growing key/value cache. Per token, after a
causal depthwise convolution (kernel Kc, SiLU) over the concatenated [q | k | v] channels:
    beta = sigmoid(b);  g = -exp(A_log) * softplus(a + dt_bias)  (a log-decay, <= 0)
    q, k L2-normalised per head (eps inside the root), q scaled by dk^-0.5;
    S <- e^g S;  u = beta (v - S^T k);  S <- S + k u^T;  o = S^T q
then o goes through a gated RMSNorm (plain weight, times SiLU(z)) and out_proj. With nv > nk heads, value
head j reads key head j // (nv / nk).

Two forms compute the same thing: the recurrent one above, one token at a time (decoding), and the chunked
one for prompts, which handles 64 tokens at a time with a few matrix products per chunk (the WY / UT form:
within a chunk the delta updates are a unit lower-triangular system solved once). Both start from and leave
the state in the cache, so a prompt may continue a conversation.

Module names follow Qwen3.5's flat projections (`in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`);
Qwen3-Next's per-key-head grouped `in_proj_qkvz` / `in_proj_ba` are regrouped into them once at load
(`regroup_qkvz`, `regroup_ba`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.config import ModelConfig
from llmcli.models.base import FusesProjections
from llmcli.models.hooks import DELTA_BETA, DELTA_DECAY, DELTA_GATE, DELTA_STATE
from llmcli.models.layers import fuse_linears

CHUNK = 64  # tokens per chunk of the prompt form (the reference's chunk size)
L2_EPS = 1e-6  # inside the root: x * rsqrt(sum(x^2) + eps), as the reference kernels do
FORMS = ("auto", "chunked", "recurrent")


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + L2_EPS)


def causal_conv(x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor) -> torch.Tensor:
    """Depthwise causal convolution of x [B, C, T] with weight [C, Kc], the Kc-1 columns before x taken from
    `conv_state` [B, C, Kc-1] (zeros at the start), which is updated in place; then SiLU. Returns [B, C, T]."""
    t, width = x.shape[-1], weight.shape[-1]
    padded = torch.cat((conv_state.to(x.dtype), x), dim=-1)
    if t == 1:  # a decode step: Kc products per channel summed in float32 (as a conv accumulates), no conv call
        out = (padded.float() * weight.float()).sum(-1, keepdim=True).to(x.dtype)
    else:
        out = F.conv1d(padded, weight[:, None, :], groups=x.shape[1])
    conv_state.copy_(padded[..., padded.shape[-1] - (width - 1):])
    return F.silu(out)


def recurrent_delta_rule(q, k, v, g, beta, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule one token at a time. q, k [B, H, T, dk], v [B, H, T, dv], g and beta [B, H, T],
    state [B, H, dk, dv]; all float32, q and k normalised and q scaled. Returns (o [B, H, T, dv], new state)."""
    outputs = []
    for t in range(q.shape[2]):
        state = state * g[:, :, t, None, None].exp()
        k_t = k[:, :, t]
        predicted = (state * k_t[..., None]).sum(-2)  # S^T k: [B, H, dv]
        update = (v[:, :, t] - predicted) * beta[:, :, t, None]
        state = state + k_t[..., None] * update[..., None, :]
        outputs.append((state * q[:, :, t, :, None]).sum(-2))
    return torch.stack(outputs, dim=2), state


def _chunks(x: torch.Tensor, pad: int, chunk: int) -> torch.Tensor:
    """[B, H, T, ...] zero-padded to a whole number of chunks -> [B, H, n, chunk, ...]."""
    if pad:
        x = F.pad(x, (0, 0, 0, pad) if x.dim() == 4 else (0, pad))
    return x.reshape(*x.shape[:2], -1, chunk, *x.shape[3:])


def chunked_delta_rule(q, k, v, g, beta, state: torch.Tensor, chunk: int = CHUNK
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule `chunk` tokens at a time; same arguments and result as `recurrent_delta_rule`.
    Zero padding (g = beta = k = v = 0) leaves the state untouched."""
    length = q.shape[2]
    pad = (-length) % chunk
    q, k, v, g, beta = (_chunks(x, pad, chunk) for x in (q, k, v, g, beta))
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    cum = g.cumsum(-1)  # log-decay from the chunk's start, through each token
    # decay[i, j] = e^(cum_i - cum_j): what is left at token i of what token j wrote (j <= i)
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~lower, float("-inf")).exp()
    k_beta = k * beta[..., None]
    system = (k_beta @ k.transpose(-1, -2)) * decay  # strictly-lower part: the updates' interactions
    # (I + strict_lower(system)) U = beta v  and  (...) W = beta k e^cum: each chunk's updates, solved at once
    new_values = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    state_keys = torch.linalg.solve_triangular(system, k_beta * cum.exp()[..., None], upper=False,
                                               unitriangular=True)
    within = (q @ k.transpose(-1, -2)) * decay
    q_decayed = q * cum.exp()[..., None]
    k_to_end = k * (cum[..., -1:] - cum).exp()[..., None]
    chunk_decay = cum[..., -1].exp()[..., None, None]
    out = torch.empty_like(new_values)
    for i in range(q.shape[2]):
        corrected = new_values[:, :, i] - state_keys[:, :, i] @ state  # what the old state does not predict
        out[:, :, i] = q_decayed[:, :, i] @ state + within[:, :, i] @ corrected
        state = state * chunk_decay[:, :, i] + k_to_end[:, :, i].transpose(-1, -2) @ corrected
    return out.reshape(*out.shape[:2], -1, out.shape[-1])[:, :, :length], state


class GatedRMSNorm(nn.Module):
    """RMSNorm over each head's dv values (plain weight, initialised to 1), times SiLU of the gate z: the
    norm in float32 cast to the model dtype, the gate applied in float32, as the reference does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        return (x * F.silu(gate.float())).to(dtype)


class GatedDeltaNet(FusesProjections, nn.Module):
    """One linear-attention layer (`linear_attn.*` in the checkpoints). Its cache entry is a
    `RecurrentLayerCache`: the conv's last Kc-1 input columns and the float32 state."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nk, self.nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        key_dim, value_dim = self.nk * self.dk, self.nv * self.dv
        self.sizes = [key_dim, key_dim, value_dim, value_dim, self.nv, self.nv]  # qkv | z | b | a
        channels = 2 * key_dim + value_dim
        self.in_proj_qkv = nn.Linear(cfg.hidden_size, channels, bias=False)
        self.in_proj_z = nn.Linear(cfg.hidden_size, value_dim, bias=False)
        self.in_proj_b = nn.Linear(cfg.hidden_size, self.nv, bias=False)
        self.in_proj_a = nn.Linear(cfg.hidden_size, self.nv, bias=False)
        self.conv1d = nn.Conv1d(channels, channels, cfg.linear_conv_kernel_dim, groups=channels, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.nv))
        self.A_log = nn.Parameter(torch.zeros(self.nv))
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(value_dim, cfg.hidden_size, bias=False)
        self.form = "auto"  # tests force "chunked" or "recurrent"; auto: recurrent for one token
        self.fused = False

    def fuse_projections(self) -> None:
        """After loading: the four input products become one (`in_proj`)."""
        self.fused = fuse_linears(self, ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"], "in_proj") is not None

    def _project(self, x: torch.Tensor):
        if self.fused:
            mixed, z, b, a = self.in_proj(x).split([sum(self.sizes[:3]), *self.sizes[3:]], dim=-1)
            return mixed, z, b, a
        return self.in_proj_qkv(x), self.in_proj_z(x), self.in_proj_b(x), self.in_proj_a(x)

    def _heads(self, mixed: torch.Tensor, b: torch.Tensor, a: torch.Tensor):
        """Conv output [B, T, C] and b, a [B, T, nv] -> float32 q, k, v [B, nv, T, d], g and beta [B, nv, T]."""
        batch, t, _ = mixed.shape
        q, k, v = mixed.split(self.sizes[:3], dim=-1)
        q = l2_normalise(q.reshape(batch, t, self.nk, self.dk).float()) * self.dk ** -0.5
        k = l2_normalise(k.reshape(batch, t, self.nk, self.dk).float())
        if self.nv != self.nk:  # value head j reads key head j // r
            q, k = (x.repeat_interleave(self.nv // self.nk, dim=2) for x in (q, k))
        v = v.reshape(batch, t, self.nv, self.dv).float()
        beta = b.sigmoid().float()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        return (*(x.transpose(1, 2) for x in (q, k, v, g, beta)),)

    def forward(self, x: torch.Tensor, layer_cache, index: int = 0, recorder=None) -> torch.Tensor:
        batch, t, _ = x.shape
        mixed, z, b, a = self._project(x)
        mixed = causal_conv(mixed.transpose(1, 2), self.conv1d.weight[:, 0], layer_cache.conv).transpose(1, 2)
        q, k, v, g, beta = self._heads(mixed, b, a)
        recurrent = self.form == "recurrent" or (self.form == "auto" and t == 1)
        rule = recurrent_delta_rule if recurrent else chunked_delta_rule
        out, state = rule(q, k, v, g, beta, layer_cache.state)
        layer_cache.state.copy_(state)
        gate = z.reshape(batch, t, self.nv, self.dv)
        out = self.norm(out.transpose(1, 2).to(x.dtype), gate)
        if recorder is not None:
            recorder.record(index, DELTA_STATE, state.flatten(2).norm(dim=-1))  # [B, nv]
            recorder.record(index, DELTA_DECAY, g.transpose(1, 2))  # [B, T, nv]
            recorder.record(index, DELTA_BETA, beta.transpose(1, 2))
            recorder.record(index, DELTA_GATE, F.silu(gate.float()).abs().mean(-1))  # [B, T, nv]
        return self.out_proj(out.reshape(batch, t, -1))


# -- Qwen3-Next's grouped projections ------------------------------------------------------------------


def regroup_qkvz(weight: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-Next's `in_proj_qkvz` [2Kd + 2Vd, H], one row block per key head h of [q_h | k_h | v of its r
    value heads | z of the same], -> the flat (`in_proj_qkv` [q all | k all | v all], `in_proj_z`)."""
    nk, dk, dv = cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    r = cfg.linear_num_value_heads // nk
    groups = weight.reshape(nk, 2 * dk + 2 * r * dv, weight.shape[-1])
    q, k, v, z = groups.split([dk, dk, r * dv, r * dv], dim=1)
    flat = [part.reshape(-1, weight.shape[-1]) for part in (q, k, v, z)]  # head-major within each part
    return torch.cat(flat[:3]), flat[3]


def regroup_ba(weight: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-Next's `in_proj_ba` [2nv, H], per key head [b of its r value heads | a of the same], -> (b, a)."""
    nk = cfg.linear_num_key_heads
    r = cfg.linear_num_value_heads // nk
    b, a = weight.reshape(nk, 2 * r, weight.shape[-1]).split([r, r], dim=1)
    return b.reshape(-1, weight.shape[-1]), a.reshape(-1, weight.shape[-1])
