"""The costlier things `trace` can measure on request: the logit lens and attention statistics.

Both are fed by `TraceRecorder` (llmcli.trace) and reduce what they see at once, so memory stays
O(layers x tokens x K) and not O(layers x tokens x vocab) or O(layers x heads x tokens^2).

- Logit lens: each layer's output (resid_post) through the model's own final norm and head, as if the
  model stopped there: the top-K tokens and the probability of the token the whole model predicts at
  that position. Held per forward call until the final norm is recorded, when the model's prediction
  for every position is known.
- Attention statistics, per layer and head, from the probabilities the model hands over
  (`models.hooks.AttentionWeights`): entropy (nats), mass on the first token (the attention sink) and
  the mean attended distance (query position - key position, weighted by the probabilities).
"""

from __future__ import annotations

import torch

LENS_CHUNK = 64  # tokens per head product: bounds the [chunk, vocab] float32 temporary


class LogitLens:
    def __init__(self, norm, head, k: int):
        self.norm, self.head, self.k = norm, head, k
        self._pending: list[tuple[int, torch.Tensor]] = []  # this forward call's layer outputs
        self.top_ids: dict[int, list[torch.Tensor]] = {}  # per layer, per call: [T, K]
        self.top_probs: dict[int, list[torch.Tensor]] = {}
        self.target_probs: dict[int, list[torch.Tensor]] = {}  # [T]: p(the model's final prediction)
        self.targets: list[torch.Tensor] = []  # per call: [T] the model's greedy prediction

    def hold(self, layer: int, resid_post: torch.Tensor) -> None:
        # A copy: the model may reuse the buffer before the final norm comes.
        self._pending.append((layer, resid_post.detach().reshape(-1, resid_post.shape[-1]).clone()))

    def _log_probs(self, normed: torch.Tensor) -> torch.Tensor:
        return self.head(normed).float().log_softmax(dim=-1)

    def finish_call(self, final_normed: torch.Tensor) -> None:
        """The final norm's output of this call: the model's own prediction, then every held layer's."""
        final = final_normed.detach().reshape(-1, final_normed.shape[-1])
        targets = torch.cat([self._log_probs(c).argmax(-1) for c in final.split(LENS_CHUNK)])
        self.targets.append(targets)
        for layer, hidden in self._pending:
            hidden = hidden[-final.shape[0]:]  # a last-only call normed just its last position
            ids, probs, target = [], [], []
            for rows, want in zip(hidden.split(LENS_CHUNK), targets.split(LENS_CHUNK), strict=True):
                logp = self._log_probs(self.norm(rows))
                top = logp.topk(min(self.k, logp.shape[-1]), dim=-1)
                ids.append(top.indices)
                probs.append(top.values.exp())
                target.append(logp.gather(1, want[:, None])[:, 0].exp())
            self.top_ids.setdefault(layer, []).append(torch.cat(ids))
            self.top_probs.setdefault(layer, []).append(torch.cat(probs))
            self.target_probs.setdefault(layer, []).append(torch.cat(target))
        self._pending.clear()

    def layer_json(self, layer: int, token_strings, rounded) -> dict | None:
        if layer not in self.top_ids:
            return None
        ids = torch.cat(self.top_ids[layer]).cpu().tolist()
        return {
            "top_ids": ids,
            "top_tokens": [token_strings(row) for row in ids],
            "top_probs": [[rounded(p) for p in row] for row in torch.cat(self.top_probs[layer]).cpu().tolist()],
            "target_prob": [rounded(p) for p in torch.cat(self.target_probs[layer]).cpu().tolist()],
        }

    def summary_json(self, token_strings) -> dict:
        targets = torch.cat(self.targets).cpu().tolist() if self.targets else []
        return {"k": self.k, "target_ids": targets, "targets": token_strings(targets)}


class AttentionStats:
    def __init__(self):
        self._per_head: dict[int, list[torch.Tensor]] = {}  # per layer, per call: [3, H] sums over queries
        self._per_token: dict[int, list[torch.Tensor]] = {}  # per call: [3, T] means over heads
        self._queries: dict[int, int] = {}

    def add(self, layer: int, weights) -> None:
        p = weights.probs.detach().float()  # [B, H, T, total]
        t, total = p.shape[-2:]
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)  # [B, H, T]
        sink = p[..., 0]
        query = torch.arange(weights.query_start, weights.query_start + t, device=p.device)[:, None]
        distance = (p * (query - torch.arange(total, device=p.device)[None, :])).sum(-1)  # masked keys hold 0
        stats = torch.stack((entropy, sink, distance))  # [3, B, H, T]
        self._per_head.setdefault(layer, []).append(stats.sum(dim=(1, 3)))
        self._per_token.setdefault(layer, []).append(stats.mean(dim=2).transpose(0, 1).reshape(3, -1))
        self._queries[layer] = self._queries.get(layer, 0) + p.shape[0] * t

    def layer_json(self, layer: int, rounded) -> dict | None:
        if layer not in self._per_head:
            return None
        per_head = (torch.stack(self._per_head[layer]).sum(0) / self._queries[layer]).cpu().tolist()
        per_token = torch.cat(self._per_token[layer], dim=1).cpu().tolist()
        out = {}
        for name, head_values, token_values in zip(("entropy", "sink", "distance"), per_head, per_token,
                                                   strict=True):
            out[name] = [rounded(v) for v in head_values]
            out[f"{name}_per_token"] = [rounded(v) for v in token_values]
        return out
