"""Runs over several processes started by torchrun: the process group, loading one rank's share of the model,
and the runner that keeps the ranks in step.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address; `init_process_group` reads them. The
backend is gloo on CPU, NCCL on CUDA (each rank on GPU LOCAL_RANK). Every collective waits at most
`Options.dist_timeout` seconds; a rank that raises exits non-zero, and torchrun then stops the others.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from llmcli import memory
from llmcli.backends.comm_clock import CLOCK
from llmcli.backends.prepare import Preparation
from llmcli.backends.rank_recorder import RankRecorder
from llmcli.backends.runner import Runner
from llmcli.backends.sharded_load import sharded_tensors
from llmcli.backends.tensor_parallel import attach_collectives, attach_head_gather, local_config, shard_model, slicer
from llmcli.config import ModelConfig
from llmcli.errors import LlmcliError
from llmcli.options import Options
from llmcli.parallel_plan import ELEMENT_BYTES, Layout, plan
from llmcli.weights import Checkpoint, load_weights, materialise


def launched_world() -> int | None:
    """The number of processes torchrun started, or None outside torchrun."""
    world = os.environ.get("WORLD_SIZE")
    return int(world) if world else None


def launched_rank() -> int:
    """This process's rank in a torchrun launch (0 outside one)."""
    return int(os.environ.get("RANK", "0"))


def start(layout: Layout, options: Options, device: torch.device) -> tuple[Layout, torch.device]:
    """Join the process group; returns this rank's layout and device."""
    world = launched_world()
    flags = f"--tp {layout.tp} --ep {layout.ep}"
    if world is None:
        raise LlmcliError(f"{flags} needs {layout.world} processes: start it with `torchrun --nproc-per-node "
                          f"{layout.world} -m llmcli ...`", exit_code=2)
    if world != layout.world:
        raise LlmcliError(f"{flags} needs {layout.world} processes; torchrun started {world}", exit_code=2)
    if options.quantize in ("int4", "int5"):
        raise LlmcliError(f"{flags} does not run with --quantize {options.quantize} yet", exit_code=2)
    if device.type not in ("cpu", "cuda"):
        raise LlmcliError(f"{flags} runs on CPU (gloo) or CUDA (NCCL), not {device.type}", exit_code=2)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=options.dist_timeout))
        atexit.register(_leave)
    return Layout(layout.tp, layout.ep, dist.get_rank()), device


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class ParallelRunner(Runner):
    """A runner whose ranks decode the same sequence: every rank continues with rank 0's token. What it tells
    a driver (logits, recorded values, attention facts) is about the whole model, as one process would say."""

    def __init__(self, model, layout: Layout, whole_config: ModelConfig, compiled=None):
        super().__init__(model, compiled)
        self.layout, self.whole_config = layout, whole_config

    @property
    def rank(self) -> int:
        return self.layout.rank

    def shared_token(self, token: int) -> int:
        chosen = torch.tensor([token], dtype=torch.long, device=self.device)
        with self._peers_alive():
            dist.broadcast(chosen, src=0)
        return int(chosen.item())

    def shared_text(self, text: str | None) -> str | None:
        """Only rank 0 reads input (a prompt on stdin, chat lines); every rank gets its text (None: the end)."""
        box = [text]
        with self._peers_alive():
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def __call__(self, input_ids: torch.Tensor, cache, recorder=None, last_only: bool = False) -> torch.Tensor:
        if recorder is not None:
            recorder = RankRecorder(recorder, self.layout)
        with self._peers_alive():
            return super().__call__(input_ids, cache, recorder, last_only)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The whole vocabulary's logits: each rank's slice of the head, gathered."""
        return self.model.lm_head(x)  # gathered by its hook (attach_head_gather)

    def attention_info(self, index: int, cache=None) -> dict:
        """The model's facts with the whole model's head counts (and cache bytes), not this rank's share."""
        local, self.model.config = self.model.config, self.whole_config
        try:
            return self.model.attention_info(index, cache)
        finally:
            self.model.config = local

    def comm_seconds(self) -> float:
        return CLOCK.seconds()

    def barrier(self) -> None:
        with self._peers_alive():
            dist.barrier()

    def gathered(self, value) -> list:
        """Every rank's `value` (any picklable object), in rank order, on every rank."""
        out = [None] * self.layout.world
        with self._peers_alive():
            dist.all_gather_object(out, value)
        return out

    @contextlib.contextmanager
    def _peers_alive(self):
        """A collective that fails because another rank died (or timed out) is one clear line, not gloo's."""
        try:
            yield
        except (dist.DistError, RuntimeError) as exc:
            text = str(exc)
            if not isinstance(exc, dist.DistError) and not any(w in text for w in ("gloo", "NCCL", "timed out")):
                raise
            detail = text.split(". ")[0].split("] ")[-1].strip()
            raise LlmcliError(f"rank {self.rank}: another rank of this parallel run stopped or did not answer "
                              f"({detail})") from exc


def check_rank_memory(cfg: ModelConfig, layout: Layout, dtype: torch.dtype, device: torch.device) -> None:
    """Before reading weights: refuse a share that will not fit (on CPU, the ranks of this machine together;
    the weights as `llmcli show --tp` plans them, plus llmcli.memory's reserve per rank)."""
    name = str(dtype).removeprefix("torch.")
    if name not in ELEMENT_BYTES:
        return
    share = plan(cfg, layout.tp, layout.ep, name)["weight_bytes_per_rank"] + memory.RESERVE_BYTES
    if device.type == "cuda":
        needed, available, where = share, torch.cuda.mem_get_info(device)[0], f"GPU memory on {device}"
    else:
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", layout.world))
        needed, available, where = share * ranks, memory.available_bytes(), f"memory for {ranks} ranks"
    if available is not None and needed > available:
        raise LlmcliError(f"this share of the model needs {memory.gib(needed)} GiB of {where}, "
                          f"{memory.gib(available, up=False)} GiB available (--force to try anyway)")


def build_parallel(model_class, cfg: ModelConfig, model_dir: Path, dtype: torch.dtype, device: torch.device,
                   options: Options, layout: Layout) -> tuple[ParallelRunner, list[str]]:
    """This rank's share of the model, read slice by slice from the checkpoint and prepared for `options`."""
    local = local_config(cfg, layout)
    model = materialise(lambda: shard_model(model_class(local), cfg, layout), dtype, device)
    attach_collectives(model, cfg, layout)
    # Ranks share the CPU: timing products on each at once would measure the contention, so only a cached figure.
    crossover = "fixed" if options.crossover == "fixed" else "cached"
    preparation = Preparation(model, options.replace(crossover=crossover))
    with Checkpoint(model_dir) as ckpt:
        tensors = sharded_tensors(ckpt, slicer(cfg, layout), dtype, cfg.fp8_block_size)
        notes = load_weights(model, model_dir, loaded=preparation.loaded, tensors=tensors)
    preparation.finish()
    notes += preparation.notes
    attach_head_gather(model, cfg, layout)
    return ParallelRunner(model, layout, cfg, preparation.runner().compiled), notes
