"""The contract every model family implements, with defaults, so that nothing outside `models/` probes
a model's attributes.

A model is pure tensor code: `forward(input_ids, positions, cache, recorder=None, last_only=False)`
takes token ids [B, T], their positions [T] (a tensor, always: the same call serves an eager prompt and
a compiled decode step) and a cache, and returns logits. Its linear layers are plain `nn.Linear` (or
whatever module a backend swapped in after loading: a layer just calls the module it holds).
"""

from __future__ import annotations

import torch
from torch import nn

from llmcli.config import ModelConfig
from llmcli.errors import LlmcliError
from llmcli.models.cache import Cache, Span
from llmcli.models.hooks import FINAL_NORM


class FusesProjections:
    """A module whose linear children read the same input and may become one product after loading."""

    projections_fused = False

    def fuse_projections(self) -> None:
        raise NotImplementedError


class CausalLM(nn.Module):
    """Base of every family's model: the contract, with defaults where families agree."""

    config: ModelConfig
    model: nn.Module  # the decoder body: embed_tokens, layers, norm (checkpoint names: model.*)
    lm_head: nn.Module

    # -- running -------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache, recorder=None,
                last_only: bool = False) -> torch.Tensor:
        """input_ids [B, T] at `positions` [T] continue the sequence in `cache` (a `Cache`, or a cache's
        `StaticView` in a compiled step); returns logits [B, T or 1, vocab] and advances the cache."""
        raise NotImplementedError

    def make_cache(self, batch: int, max_len: int, dtype=None, device=None) -> Cache:
        raise NotImplementedError

    def logits(self, x: torch.Tensor, count: int, cache, recorder, last_only: bool) -> torch.Tensor:
        """After the decoder layers: the cache now holds the call's `count` tokens; then the final norm
        (recorded) and the head, for the last position only with `last_only`."""
        cache.advance(count)
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        if recorder is not None:
            recorder.record(None, FINAL_NORM, x)
        return self.lm_head(x)

    @staticmethod
    def span(positions: torch.Tensor, cache) -> Span:
        """The span of a call: a static view is read whole (no Python start), a cache from its length."""
        return Span(positions, None if cache.static else cache.length)

    @property
    def context_limit(self) -> int:
        """The longest sequence the model supports."""
        return int(self.config.max_position_embeddings)

    def reuses_cache(self, cache: Cache, total_length: int) -> bool:
        """May a conversation that has grown to `total_length` tokens keep what `cache` holds?"""
        return True

    def derived_tensors(self) -> list[torch.Tensor]:
        """Tensors computed from the weights that a decode step reads besides the parameters (built now).
        A compiled step must find them ready; on CUDA its graphs read them in place, like the weights."""
        return []

    # -- loading ---------------------------------------------------------------------------------

    def init_buffers(self, device=None) -> None:
        """(Re)compute the non-checkpoint tensors, e.g. after materialising from the meta device."""

    def checkpoint_tensors(self, name: str, load) -> list[tuple[str, torch.Tensor]] | None:
        """Map one checkpoint tensor to (parameter name, tensor) pairs, or None to skip it. `load()` reads it
        (straight into the parameter of the same name where there is one)."""
        return [(name, load())]

    def tied_parameters(self) -> set[str]:
        """Parameters that share another's tensor and are not read from the checkpoint."""
        return {"lm_head.weight"} if self.config.tie_word_embeddings else set()

    def load_notes(self) -> list[str]:
        """What loading left out or changed, for the user."""
        return []

    def keeps_weight(self, module_name: str) -> bool:
        """Linears whose weight the model reads directly (not only by calling them): backends leave them
        as plain nn.Linear in the loaded dtype."""
        return False

    # -- options and facts -----------------------------------------------------------------------

    def set_attention_options(self, use_logn_attn: bool | None = None, use_dynamic_ntk: bool | None = None,
                              windows: list[int | None] | None = None) -> None:
        """Original Qwen's LogN / dynamic NTK switches and per-layer sliding windows, where a family has them."""
        if use_logn_attn is not None or use_dynamic_ntk is not None or windows is not None:
            raise LlmcliError(f"--window (sliding attention windows) is not supported for {self.config.family} "
                              "models", exit_code=2)

    def attention_info(self, index: int, cache: Cache | None = None) -> dict:
        """Facts about layer `index`'s attention for `trace` (no computation involved)."""
        raise NotImplementedError
