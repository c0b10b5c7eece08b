"""Observe a model layer by layer: a recorder the model calls, a driver, a JSON builder and rich tables.

The model only calls `recorder.record(layer, name, value)` at named points; everything about
statistics and rendering lives here, so tracing cannot change a result (the logits with and
without a recorder are identical). Statistics are reduced as soon as a tensor is recorded, so the
model may reuse its buffers afterwards and memory stays O(tokens), not O(tokens x hidden).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from llmcli.backends.runner import as_runner
from llmcli.errors import LlmcliError
from llmcli.models.hooks import (
    ATTN_PROBS,
    FINAL_NORM,
    INDEXER,
    RESID_POST,
    RESIDUAL_POINTS,
    ROUTED_OUT,
    ROUTER,
    SHARED_OUT,
)
from llmcli.models.v4_hooks import V4_POINTS
from llmcli.trace_dsa import IndexerLog, indexer_summary
from llmcli.trace_dsv4 import V4Log, v4_summary
from llmcli.trace_hybrid import HYBRID_POINTS, MixerLog, mixer_summary
from llmcli.trace_stats import AttentionStats, LogitLens

HOOK_POINTS = RESIDUAL_POINTS  # the points every layer records, in order
DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. Attention is all you need."


# -- layer selection ------------------------------------------------------------------------------


def parse_layer_specs(specs: list[str]) -> list[tuple[int, int]]:
    """`--layer` values ("3", "1-4", "0,2", repeatable) -> inclusive ranges; syntax only."""
    ranges = []
    for spec in specs:
        for item in spec.split(","):
            item = item.strip()
            low, sep, high = item.partition("-")
            try:
                a = int(low)
                b = int(high) if sep else a
            except ValueError:
                raise LlmcliError(f"--layer: {item!r} is not a layer number or range (N, A-B, A,B)",
                                  exit_code=2) from None
            if a > b:
                raise LlmcliError(f"--layer: range {item!r} runs backwards", exit_code=2)
            ranges.append((a, b))
    return ranges


def select_layers(specs: list[str], num_layers: int, model_name: str = "the model") -> list[int] | None:
    """Sorted layer indices chosen by `--layer`, or None for all; out-of-range -> LlmcliError."""
    ranges = parse_layer_specs(specs)
    if not ranges:
        return None
    chosen = set()
    for a, b in ranges:
        if a < 0 or b >= num_layers:
            bad = a if a < 0 or a >= num_layers else b
            raise LlmcliError(
                f"--layer {bad} is out of range: {model_name} has {num_layers} layers (valid: 0-{num_layers - 1})",
                exit_code=2,
            )
        chosen.update(range(a, b + 1))
    return sorted(chosen)


# -- the recorder ---------------------------------------------------------------------------------


def token_rms(x: torch.Tensor) -> torch.Tensor:
    """RMS over the hidden dimension for every token: [..., hidden] -> [tokens] (float32)."""
    x = x.detach().reshape(-1, x.shape[-1]).float()
    return x.pow(2).mean(-1).sqrt()


def score_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) per token of the router probabilities, normalised to sum to one (sigmoid
    scores do not), so that uniform over E experts gives ln E and a one-hot choice gives 0."""
    p = scores.detach().float()
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


@dataclass
class RouterLog:
    experts: list[torch.Tensor] = field(default_factory=list)  # per forward call: [T, k]
    weights: list[torch.Tensor] = field(default_factory=list)
    groups: list[torch.Tensor] = field(default_factory=list)
    entropy: list[torch.Tensor] = field(default_factory=list)  # [T]
    num_experts: int = 0


class TraceRecorder:
    """Collects per-token RMS and max |x| at every recorded point, and MoE router choices.

    `layers`: indices to keep (None = all); other layers' records are ignored cheaply. Results stay
    on the model's device until `finish()`, so recording never forces a device sync. `lens` and
    `attention` (llmcli.trace_stats) add the logit lens and attention statistics."""

    def __init__(self, layers: list[int] | None = None, lens: LogitLens | None = None,
                 attention: AttentionStats | None = None):
        self.layers = None if layers is None else set(layers)
        self.lens, self.attention = lens, attention
        self.optional_points = (ATTN_PROBS,) if attention is not None else ()  # what the model computes extra
        self._rms: dict[tuple[int | None, str], list[torch.Tensor]] = {}
        self._max: dict[tuple[int | None, str], list[torch.Tensor]] = {}
        self._max_tok: dict[tuple[int | None, str], list[torch.Tensor]] = {}
        self.routers: dict[int, RouterLog] = {}
        self.indexers: dict[int, IndexerLog] = {}  # sparse attention layers (llmcli.trace_dsa)
        self.mixers: dict[int, MixerLog] = {}  # hybrid models' DeltaNet / gated attention records
        self.v4: dict[int, V4Log] = {}  # DeepSeek-V4's compressed attention and hyper-connections
        self.points: dict[int | None, list[str]] = {}  # recorded names per layer, in first-seen order

    def wants(self, layer: int | None) -> bool:
        return layer is None or self.layers is None or layer in self.layers

    def record(self, layer: int | None, name: str, value) -> None:
        if not self.wants(layer):
            return
        if name in HYBRID_POINTS:  # per-head values, not a residual-stream point
            self.mixers.setdefault(layer, MixerLog()).add(name, value)
            return
        if name in V4_POINTS:
            self.v4.setdefault(layer, V4Log()).add(name, value)
            return
        names = self.points.setdefault(layer, [])
        if name not in names:
            names.append(name)
        if name == ROUTER:
            log = self.routers.setdefault(layer, RouterLog())
            log.experts.append(value.experts.detach().reshape(-1, value.experts.shape[-1]).clone())
            log.weights.append(value.weights.detach().float().reshape(-1, value.weights.shape[-1]).clone())
            if value.groups is not None:
                log.groups.append(value.groups.detach().reshape(-1, value.groups.shape[-1]).clone())
            log.entropy.append(score_entropy(value.scores).reshape(-1))
            log.num_experts = int(value.scores.shape[-1])
            return
        if name == ATTN_PROBS:
            if self.attention is not None:
                self.attention.add(layer, value)
            return
        if name == INDEXER:
            self.indexers.setdefault(layer, IndexerLog()).add(value)
            return
        if not isinstance(value, torch.Tensor):
            return  # unknown non-tensor observations are not ours to interpret
        self._rms.setdefault((layer, name), []).append(token_rms(value))
        per_token_max = value.detach().reshape(-1, value.shape[-1]).abs().amax(-1).float()
        self._max_tok.setdefault((layer, name), []).append(per_token_max)
        self._max.setdefault((layer, name), []).append(per_token_max.amax())
        if self.lens is not None:
            if name == RESID_POST:
                self.lens.hold(layer, value)
            elif name == FINAL_NORM:
                self.lens.finish_call(value)

    # results (call after the forward passes) ----------------------------------------------------

    def rms_per_token(self, layer: int | None, name: str) -> list[float]:
        parts = self._rms.get((layer, name))
        return torch.cat(parts).cpu().tolist() if parts else []

    def max_abs(self, layer: int | None, name: str) -> float | None:
        parts = self._max.get((layer, name))
        return float(torch.stack(parts).max().cpu()) if parts else None

    def max_abs_per_token(self, layer: int | None, name: str) -> list[float]:
        parts = self._max_tok.get((layer, name))
        return torch.cat(parts).cpu().tolist() if parts else []

    def tensor_points(self, layer: int | None) -> list[str]:
        return [n for n in self.points.get(layer, []) if n not in (ROUTER, INDEXER, ATTN_PROBS)]


# -- running a trace ------------------------------------------------------------------------------


@dataclass
class DecodeStep:
    step: int  # 1-based
    position: int  # position of the token fed in
    token_id: int  # the token fed in (chosen greedily by the previous pass)
    next_token_id: int  # greedy choice after this step
    length: int  # tokens in the cache after the step
    attention: list[dict]  # per selected layer


@dataclass
class TraceRun:
    recorder: TraceRecorder
    layers: list[int]  # selected layer indices
    num_layers: int
    token_ids: list[int]  # every token that went through the model: prompt, then generated
    prompt_tokens: int
    next_token_id: int  # the greedy prediction after the last traced token
    attention: list[dict]  # per selected layer, after the prefill
    steps: list[DecodeStep] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" when a stop token was predicted before N steps


def json_safe(value):
    """attention_info values -> JSON-friendly (tuples, tensors, numpy-ish scalars)."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def attention_snapshot(model, cache, index: int) -> dict:
    """The model's (or runner's) attention facts for one layer, plus the span a new query can see now."""
    info = dict(model.attention_info(index, cache))
    for key in ("type", "window", "logn_scale", "ntk_alpha", "rope_base"):
        info.setdefault(key, None)
    window, length = info.get("window"), cache.length
    info.setdefault("span", min(window, length) if window else length)
    return json_safe(info)


def _argmax(logits: torch.Tensor) -> int:
    return int(logits[0, -1].float().argmax())


def run_trace(model, prompt_ids: list[int], layers: list[int] | None = None, generate: int = 0,
              stop_ids=(), logit_lens: int = 0, attention_stats: bool = False) -> TraceRun:
    """Prefill `prompt_ids` with a recorder, then `generate` greedy decode steps, also recorded.

    Decoding feeds each greedy choice back in; it ends early when a stop token is predicted. `model`: a
    model or its runner (a compiled step is never used: it records nothing). `logit_lens` K > 0 adds the
    top-K tokens after every layer; `attention_stats` the per-head attention statistics."""
    runner = as_runner(model)
    model = runner.model
    if not prompt_ids:
        raise LlmcliError("the prompt is empty")
    num_layers = int(model.config.num_layers)
    selected = list(range(num_layers)) if layers is None else list(layers)
    limit = model.context_limit
    total = len(prompt_ids) + generate
    if total > limit:
        raise LlmcliError(f"prompt ({len(prompt_ids)} tokens) + --generate {generate} exceeds the context "
                          f"of {limit} tokens")
    lens = LogitLens(model.model.norm, runner.head, logit_lens) if logit_lens > 0 else None
    recorder = TraceRecorder(layers, lens, AttentionStats() if attention_stats else None)
    device = runner.device
    cache = model.make_cache(1, total)
    stop_ids = set(stop_ids)
    with torch.inference_mode():
        logits = runner(torch.tensor([prompt_ids], device=device), cache, recorder=recorder)
        run = TraceRun(recorder, selected, num_layers, list(prompt_ids), len(prompt_ids), _argmax(logits),
                       [attention_snapshot(runner, cache, i) for i in selected])
        for step in range(1, generate + 1):
            token = run.next_token_id
            if token in stop_ids:
                run.finish_reason = "stop"
                break
            logits = runner(torch.tensor([[token]], device=device), cache, recorder=recorder)
            run.token_ids.append(token)
            run.next_token_id = _argmax(logits)
            run.steps.append(DecodeStep(step, cache.length - 1, token, run.next_token_id, cache.length,
                                        [attention_snapshot(runner, cache, i) for i in selected]))
    return run


# -- JSON ---------------------------------------------------------------------------------------


def _r(x: float | None) -> float | None:
    """float32 precision is all there is: 7 significant digits keep the JSON short and exact enough."""
    return None if x is None else float(f"{x:.7g}")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def router_summary(log: RouterLog, rec: TraceRecorder, layer: int) -> dict:
    experts = torch.cat(log.experts).cpu()
    weights = torch.cat(log.weights).cpu()
    entropy = torch.cat(log.entropy).cpu()
    load = torch.bincount(experts.reshape(-1), minlength=log.num_experts)
    shared = rec.rms_per_token(layer, SHARED_OUT)
    routed = rec.rms_per_token(layer, ROUTED_OUT)
    return {
        "num_experts": log.num_experts,
        "experts": experts.tolist(),
        "weights": [[_r(w) for w in row] for row in weights.tolist()],
        "groups": torch.cat(log.groups).cpu().tolist() if log.groups else None,
        "load": load.tolist(),
        "entropy": _r(float(entropy.mean())),
        "entropy_per_token": [_r(e) for e in entropy.tolist()],
        "max_entropy": _r(math.log(log.num_experts)) if log.num_experts else None,
        "shared_rms": _r(_mean(shared)),
        "routed_rms": _r(_mean(routed)),
    }


def layer_kind(model, index: int, rec: TraceRecorder) -> str:
    moe = index in rec.routers or model.config.is_moe_layer(index)
    return "moe" if moe else "dense"


def point_stats(rec: TraceRecorder, layer: int | None, names) -> tuple[dict, dict, dict, dict]:
    rms, max_abs, per_token, max_per_token = {}, {}, {}, {}
    for name in names:
        values = rec.rms_per_token(layer, name)
        rms[name] = _r(_mean(values))
        max_abs[name] = _r(rec.max_abs(layer, name))
        per_token[name] = [_r(v) for v in values]
        max_per_token[name] = [_r(v) for v in rec.max_abs_per_token(layer, name)]
    return rms, max_abs, per_token, max_per_token


def build_trace_json(run: TraceRun, model, tokenizer, model_name: str, settings: dict | None = None) -> dict:
    """Everything the tables show, as one JSON-ready dict (schema in the README / `trace --help`).
    `settings`: how the trace was run (prompt, dtype, options), copied into the result as is."""
    rec = run.recorder
    token_strings = tokenizer.token_strings if tokenizer is not None else (lambda ids: [str(i) for i in ids])
    layers = []
    for pos, index in enumerate(run.layers):
        names = list(HOOK_POINTS) + [n for n in rec.tensor_points(index) if n not in HOOK_POINTS]
        rms, max_abs, per_token, max_per_token = point_stats(rec, index, names)
        log = rec.routers.get(index)
        layers.append({
            "index": index,
            "kind": layer_kind(model, index, rec),
            "mixer": run.attention[pos].get("type"),  # hybrids: "linear" (Gated DeltaNet) or "full"
            "rms": rms,
            "max_abs": max_abs,
            "rms_per_token": per_token,
            "max_abs_per_token": max_per_token,
            "attention": run.attention[pos],
            "router": router_summary(log, rec, index) if log else None,
            "logit_lens": rec.lens.layer_json(index, token_strings, _r) if rec.lens else None,
            "attention_stats": rec.attention.layer_json(index, _r) if rec.attention else None,
            "indexer": indexer_summary(rec.indexers[index]) if index in rec.indexers else None,
            **mixer_summary(rec.mixers.get(index)),
            **v4_summary(rec.v4.get(index)),
        })
    final = rec.rms_per_token(None, FINAL_NORM)
    return {
        "model": model_name,
        "settings": dict(settings or {}),
        "logit_lens": rec.lens.summary_json(token_strings) if rec.lens else None,
        "num_layers": run.num_layers,
        "token_ids": run.token_ids,
        "tokens": token_strings(run.token_ids),
        "prompt_tokens": run.prompt_tokens,
        "generated_token_ids": run.token_ids[run.prompt_tokens:],
        "next_token_id": run.next_token_id,
        "next_token": token_strings([run.next_token_id])[0],
        "finish_reason": run.finish_reason,
        "layers": layers,
        "final_norm": {"rms": _r(_mean(final)), "max_abs": _r(rec.max_abs(None, FINAL_NORM)),
                       "rms_per_token": [_r(v) for v in final]},
        "decode_steps": [
            {"step": s.step, "position": s.position, "token_id": s.token_id,
             "token": token_strings([s.token_id])[0], "next_token_id": s.next_token_id,
             "next_token": token_strings([s.next_token_id])[0], "length": s.length,
             "attention": [{"layer": i, **a} for i, a in zip(run.layers, s.attention, strict=True)]}
            for s in run.steps
        ],
    }
