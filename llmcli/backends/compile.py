"""`--compile`: the single-token decode step through torch.compile (inductor).

Decoding is one token at a time, and eager PyTorch pays a dispatch per small op (norms, RoPE, the
router) and a oneDNN call per product. The model's own forward, handed a static view of the cache,
has no Python number that changes from step to step (the position is a tensor; on CPU the cache is
read up to the next multiple of 256 positions, a dynamic length, with the rows past the position
masked), so inductor compiles it once into a handful of fused C++ loops. Products call llmcli's CPU
kernels where they run (bfloat16 panels, int8 blocks: the same weights and ops as eager); elsewhere
one-row products are written as multiply-and-sum so that they become streaming loops over the weights
(`linear.SummingLinear`). Prompts (prefill) stay eager.

Compiled artefacts are kept in torch's on-disk caches (under llmcli's cache directory unless
TORCHINDUCTOR_CACHE_DIR is set), so later runs with the same model shape reuse them.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Callable

import torch

from llmcli.backends.experts import StackedExperts
from llmcli.backends.linear import FEW_ROWS
from llmcli.errors import LlmcliError
from llmcli.options import Options
from llmcli.paths import inductor_cache


def inductor_options(options: Options, device: torch.device) -> dict:
    # Inductor inlines cheap producers into their consumers; for a one-row product that means recomputing
    # the input (e.g. the RMSNorm of the residual) for every weight row, which measured 19 GB/s against 29
    # when the input is computed once (benchmarks/compile_gemv.py). A low threshold makes it compute once.
    # CUDA: CUDA graphs replay the whole step without launching kernels one by one (0.5B shape on an
    # H200: 729 tok/s against 79 eager). torch.compile takes a mode or options, not both: the mode
    # "reduce-overhead" is the option triton.cudagraphs.
    return {"realize_opcount_threshold": options.realize_threshold, "triton.cudagraphs": device.type == "cuda"}


def use_persistent_cache() -> None:
    """Point inductor's caches at llmcli's cache directory (it defaults to a temporary directory)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache()))


def experts_in_kernel_blocks(model: torch.nn.Module) -> bool:
    stacks = [m for m in model.modules() if isinstance(m, StackedExperts)]
    return bool(stacks) and all(stack.kernel for stack in stacks)


class CompiledDecode:
    """The compiled one-token decode step, which the runner calls for single-token steps after a prefill."""

    BUCKET = 256  # cache positions: the attended part grows in steps of this many

    def __init__(self, model: torch.nn.Module, device: torch.device, options: Options | None = None):
        options = options or Options()
        use_persistent_cache()
        # Dynamo keeps one compiled entry per model structure under the same `forward` code and
        # gives up after recompile_limit (8): a process that loads several models (notebooks, tests)
        # needs more.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        self.model = model
        self.device = device
        # MoE: inductor's loop over experts gathered for several tokens measured 269 ms a step at batch 4
        # (DeepSeek-V3 shape; eager: 50 ms), so only single sequences are compiled there, unless the
        # experts are in a CPU kernel's blocks (bf16 or int8), which picks each row's expert itself.
        moe = model.config.is_moe
        self.max_batch = FEW_ROWS if not moe or experts_in_kernel_blocks(model) else 1
        derived = model.derived_tensors()  # built now: the step reads them, never builds them
        if device.type == "cuda":  # weights, like the parameters: CUDA graphs read them in place
            for tensor in derived:
                torch._dynamo.mark_static_address(tensor, guard=False)
        self.step = torch.compile(model.forward, fullgraph=True, options=inductor_options(options, device))
        self.compile_seconds: float | None = None
        # Steps that compiled (or loaded compiled code) and their time: generation stats leave them out.
        self.compiling_steps, self.compiling_seconds = 0, 0.0
        self.on_compiling: Callable[[], None] | None = None  # called once, before the first compile
        self.on_compiled: Callable[[float], None] | None = None  # told the first compile time, once
        self._compiled_shapes: set[tuple] = set()
        self._last_view: weakref.ref | None = None  # the previous step's prefix view (CPU) or cache (CUDA)

    def accepts(self, input_ids: torch.Tensor, cache, recorder) -> bool:
        """One new token for up to `max_batch` sequences after a prefill, and nobody observing (trace
        records intermediate values, which only the eager path hands out)."""
        batch, length = input_ids.shape
        return length == 1 and batch <= self.max_batch and cache.length > 0 and recorder is None

    def warm_up(self, batch: int = 1) -> None:
        """Compile now (a one-token prompt, then one step on a tiny cache) instead of at the first
        decode step of the first reply; the compiled step serves every cache length afterwards. Not on
        CUDA, where the step reads the whole static cache: its size is only known at the first step."""
        if self.device.type == "cuda":
            return
        with torch.inference_mode():  # generate, chat and bench make their tensors in inference mode too
            ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
            cache = self.model.make_cache(batch, 2)
            self.model(ids, cache.span(1, self.device).positions, cache)
            self(ids, cache.span(1, self.device).positions, cache)

    def _attended_part(self, cache):
        """CPU: the cache cut to the next multiple of BUCKET past the new token, its length marked
        dynamic, so one compiled step serves every length and reads ~what is in use (an 8K chat cache
        read whole doubled a 0.5B model's step)."""
        length = min(cache.max_len, (cache.length // self.BUCKET + 1) * self.BUCKET)
        view = cache.static_view(length)
        if self._last_view is None or self._last_view() is not view:  # a new view (the cache keeps it)
            for tensor in view.sequence_tensors():  # sequence-major: the length is dim 0
                torch._dynamo.mark_dynamic(tensor, 0)
            self._last_view = weakref.ref(view)  # weak: the cache's memory goes with the cache
        return view

    def _static_cache(self, cache):
        """CUDA: the step reads the whole static cache, and CUDA graphs replay fixed addresses, so its tensors
        are marked static (written in place by the graph). Unguarded: a new cache (a new generation) makes
        the graphs re-record, not dynamo recompile."""
        view = cache.static_view()  # the cache's own tensors
        if self._last_view is None or self._last_view() is not view:
            for tensor in view.tensors():
                torch._dynamo.mark_static_address(tensor, guard=False)
            self._last_view = weakref.ref(view)
        return view

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """The model's forward, compiled: the runner has checked the token fits and made its positions."""
        shape = tuple(input_ids.shape)
        first = shape not in self._compiled_shapes
        cuda = self.device.type == "cuda"
        if cuda:
            view = self._static_cache(cache)
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are done with
        else:
            view = self._attended_part(cache)
        if first and self.compile_seconds is None and self.on_compiling is not None:
            self.on_compiling()
        began = time.perf_counter()
        try:
            logits = self.step(input_ids, positions, view)
        except Exception as exc:  # inductor errors are pages long (e.g. no C++ compiler): one line
            if not first:
                raise
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise LlmcliError(f"--compile failed ({type(exc).__name__}: {message}); run without --compile") from exc
        cache.advance(1)
        if cuda:  # the graph's output buffer is overwritten by the next replay; callers may keep logits
            logits = logits.clone()
        if first:  # includes compiling (or loading the compiled code from the cache)
            self._compiled_shapes.add(shape)
            self.compiling_steps += 1
            self.compiling_seconds += time.perf_counter() - began
            if self.compile_seconds is None:
                self.compile_seconds = time.perf_counter() - began
                if self.on_compiled is not None:
                    self.on_compiled(self.compile_seconds)
        return logits
