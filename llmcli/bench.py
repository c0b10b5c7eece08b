"""Benchmark runner: prefill/decode speed, time to first token, memory and bandwidth use.

Workloads follow llama-bench / mlx_lm.benchmark: random prompt tokens, greedy decoding with EOS
ignored (every run decodes exactly `gen_tokens` tokens), warm-up runs, then `repeat` timed runs
reported as mean ± sample std. Backends (llmcli, optionally transformers on the same weights) run
the identical token ids and alternate run by run, so drift on a shared machine hits both alike.
The loop talks to the model and its cache directly (the generic `Generation` is batch 1).
"""

from __future__ import annotations

import gc
import inspect
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from llmcli import machine
from llmcli.backends.linear import label_of
from llmcli.backends.runner import Runner, as_runner
from llmcli.cache_reads import mean_step_cache_bytes
from llmcli.errors import LlmcliError
from llmcli.generate import synchronize
from llmcli.models.hooks import ROUTER

# -- statistics ----------------------------------------------------------------------------------


@dataclass
class Stat:
    mean: float
    std: float  # sample standard deviation (n - 1); 0 for a single run

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        if not values:
            return cls(0.0, 0.0)
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)

    def as_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std}


@dataclass
class Workload:
    prompt_tokens: int
    gen_tokens: int
    batch: int = 1

    @property
    def decode_steps(self) -> int:
        return self.gen_tokens - 1  # the first token comes from the prefill


@dataclass
class RunTiming:
    prefill_s: float  # start (cache allocation included) -> first token ready = TTFT
    decode_s: float  # the remaining gen_tokens - 1 forward passes
    token_ids: list[list[int]] = field(default_factory=list, repr=False)  # [batch][gen_tokens] greedy ids
    # Under --tp/--ep: seconds of each phase this rank spent inside collectives (llmcli.backends.comm_clock).
    prefill_comm_s: float | None = None
    decode_comm_s: float | None = None

    @property
    def generated_tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)


def prompt_ids(workload: Workload, vocab_size: int, seed: int) -> torch.Tensor:
    """The same random ids for every backend; seeded by the prompt length so -p lists are stable."""
    gen = torch.Generator().manual_seed(seed * 100_003 + workload.prompt_tokens)
    return torch.randint(0, vocab_size, (workload.batch, workload.prompt_tokens), generator=gen)


# -- bytes read per decode step ------------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> int:
    try:
        return t.data_ptr()
    except RuntimeError:  # opaque layouts (oneDNN-prepacked weights) have no data pointer; never tied
        return id(t)


def weight_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint tensors by name: parameters and persistent buffers (transformers keeps DeepSeek's
    e_score_correction_bias as a buffer, llmcli keeps prepacked CPU weights as buffers), tied ones once."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def parameter_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes, count) of the weights (`weight_tensors`)."""
    tensors = weight_tensors(model).values()
    return sum(t.numel() * t.element_size() for t in tensors), sum(t.numel() for t in tensors)


def decode_weight_bytes(model: nn.Module, batch: int = 1, active_experts: float | None = None) -> int:
    """Weight bytes one decode step reads: every parameter, except that the input embedding reads
    only `batch` rows (unless it doubles as the LM head: a tied head not quantised to its own int8
    copy) and MoE layers read only the active routed experts (top-k for one sequence;
    `active_experts` = distinct experts per layer for a batch)."""
    cfg = model.config
    total, _ = parameter_bytes(model)
    read_by_others = {_storage_key(t) for m in model.modules() if not isinstance(m, nn.Embedding)
                      for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]}
    for module in model.modules():
        if isinstance(module, nn.Embedding) and _storage_key(module.weight) not in read_by_others:
            w = module.weight
            total -= w.numel() * w.element_size()
            total += min(batch, w.shape[0]) * w[0].numel() * w.element_size()
    if cfg.is_moe:
        moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
        experts = [t for name, t in weight_tensors(model).items() if ".experts." in name]
        if experts:  # per expert, whatever the storage (one module per expert or stacked)
            per_expert = sum(p.numel() * p.element_size() for p in experts) / (cfg.n_routed_experts * moe_layers)
        else:
            size = next(m.weight.element_size() for m in model.modules() if isinstance(m, nn.Embedding))
            per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * size
        if active_experts is None:
            active_experts = min(cfg.n_routed_experts, batch * cfg.num_experts_per_tok)
        total -= round((cfg.n_routed_experts - active_experts) * per_expert * moe_layers)
    return int(total)


class ExpertCounter:
    """Recorder that counts distinct routed experts per MoE layer per decode step (batch > 1)."""

    def __init__(self):
        self.counts: list[int] = []
        self.decoding = False

    def record(self, layer, name, value) -> None:
        if self.decoding and name == ROUTER:
            self.counts.append(int(value.experts.unique().numel()))

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.counts) if self.counts else None


# -- backends ------------------------------------------------------------------------------------


class LlmcliBackend:
    name = "llmcli"

    def __init__(self, model: Runner | nn.Module, device: torch.device):
        from llmcli.show import count_config

        self.runner, self.device = as_runner(model), device
        self.model = self.runner.model
        self.weights_bytes, _ = parameter_bytes(self.model)
        # the model's own count: stored elements are not parameters once quantised (int4 packs two a byte, a tied
        # head quantised is a second copy of the embedding)
        self.parameters = count_config(self.model.config).total

    def run(self, ids: torch.Tensor, gen_tokens: int, recorder=None) -> RunTiming:
        model, device = self.runner, self.device
        batch, length = ids.shape
        ids = ids.to(device)
        with torch.inference_mode():
            synchronize(device)
            model.barrier()  # ranks start together: one rank's late start is not the others' communication
            c0 = model.comm_seconds()
            t0 = time.perf_counter()
            cache = model.make_cache(batch, length + gen_tokens)
            logits = model(ids, cache, recorder=recorder, last_only=True)
            # picked in float32 as generate picks (torch's argmax over 152K bfloat16 logits took 0.86 ms, float32 0.26)
            token = logits[:, -1].float().argmax(-1, keepdim=True)
            synchronize(device)
            t1 = time.perf_counter()
            c1 = model.comm_seconds()
            tokens = [token]  # kept on the device: no host sync inside the timed loop
            if recorder is not None:
                recorder.decoding = True
            for _ in range(gen_tokens - 1):
                logits = model(token, cache, recorder=recorder)
                token = logits[:, -1].float().argmax(-1, keepdim=True)
                tokens.append(token)
            synchronize(device)
            t2 = time.perf_counter()
            c2 = model.comm_seconds()
            if recorder is not None:
                recorder.decoding = False
        timing = RunTiming(t1 - t0, t2 - t1, torch.cat(tokens, 1).tolist())
        if c0 is not None:
            timing.prefill_comm_s, timing.decode_comm_s = c1 - c0, c2 - c1
        return timing

    def close(self) -> None:
        pass


class TransformersBackend:
    """The same checkpoint in transformers (default attention, its default dynamic cache); same loop."""

    name = "transformers"

    def __init__(self, path: Path, device: torch.device, dtype: torch.dtype, family: str):
        try:
            import transformers
        except ImportError as exc:
            raise LlmcliError(
                "--compare transformers needs the transformers package (pip install transformers)"
            ) from exc
        if family == "qwen":
            raise LlmcliError(
                "--compare transformers: original Qwen has no built-in transformers implementation "
                "(it needs trust_remote_code, which llmcli never enables)"
            )
        self.version = transformers.__version__
        from transformers.utils import logging as hf_logging

        bar_was_on, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
        hf_logging.disable_progress_bar()  # bench owns the terminal
        hf_logging.set_verbosity_error()
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        except Exception as exc:  # transformers raises many types; the message is what matters
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LlmcliError(f"--compare transformers: transformers could not load {path}: {first}") from exc
        finally:
            hf_logging.set_verbosity(verbosity)
            if bar_was_on:
                hf_logging.enable_progress_bar()
        self.model = model.to(device).eval()
        self.device = device
        self.attn_implementation = getattr(model.config, "_attn_implementation", None)
        self.weights_bytes, self.parameters = parameter_bytes(self.model)
        # transformers 5.x renamed `past_key_values` to `cache`; use whichever forward takes.
        accepted = inspect.signature(self.model.forward).parameters
        self.cache_kw = "cache" if "cache" in accepted else "past_key_values"

    def _cache_of(self, out):
        cache = getattr(out, "cache", None)
        return cache if cache is not None else out.past_key_values

    def run(self, ids: torch.Tensor, gen_tokens: int, recorder=None) -> RunTiming:
        model, device = self.model, self.device
        ids = ids.to(device)
        with torch.inference_mode():
            synchronize(device)
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].float().argmax(-1, keepdim=True)
            synchronize(device)
            t1 = time.perf_counter()
            tokens = [token]
            for _ in range(gen_tokens - 1):
                out = model(input_ids=token, use_cache=True, **{self.cache_kw: self._cache_of(out)})
                token = out.logits[:, -1].float().argmax(-1, keepdim=True)
                tokens.append(token)
            synchronize(device)
            t2 = time.perf_counter()
        return RunTiming(t1 - t0, t2 - t1, torch.cat(tokens, 1).tolist())

    def close(self) -> None:
        self.model = None  # free the second copy of the weights before anything else runs
        gc.collect()


# -- runner --------------------------------------------------------------------------------------


@dataclass
class BenchRow:
    backend: str
    workload: Workload
    runs: list[RunTiming]
    weights_bytes: int
    decode_bytes_per_step: int  # weights
    bandwidth_bytes_per_s: float
    peak_memory_bytes: int
    run_memory_bytes: int | None
    peak_memory_method: str
    active_experts: float | None = None
    decode_cache_bytes_per_step: float = 0.0  # the batch's sequences' caches, mean over the run's steps
    ratio: dict | None = None  # llmcli / transformers, on llmcli rows when compared
    ranks: dict | None = None  # --tp/--ep: every rank's figures (`gather_ranks`)

    @property
    def prefill_tokens_per_s(self) -> Stat:
        w = self.workload
        return Stat.of([w.batch * w.prompt_tokens / r.prefill_s for r in self.runs])

    @property
    def decode_tokens_per_s(self) -> Stat:
        w = self.workload
        if w.decode_steps == 0:
            return Stat(0.0, 0.0)
        return Stat.of([w.batch * w.decode_steps / r.decode_s for r in self.runs])

    @property
    def ttft_s(self) -> Stat:
        return Stat.of([r.prefill_s for r in self.runs])

    @property
    def comm_per_decode_step_s(self) -> Stat | None:
        """This rank's seconds in collectives per decode step (None: one process)."""
        steps = self.workload.decode_steps
        if not self.runs or self.runs[0].decode_comm_s is None or steps == 0:
            return None
        return Stat.of([r.decode_comm_s / steps for r in self.runs])

    @property
    def comm_per_prefill_s(self) -> Stat | None:
        if not self.runs or self.runs[0].prefill_comm_s is None:
            return None
        return Stat.of([r.prefill_comm_s for r in self.runs])

    def communication(self) -> dict:
        """Time in collectives (rank 0's, and each rank's per decode step) and each rank's peak memory."""
        decode, prefill = self.comm_per_decode_step_s, self.comm_per_prefill_s
        decode_s = statistics.fmean(r.decode_s for r in self.runs)
        prefill_s = statistics.fmean(r.prefill_s for r in self.runs)
        return {
            "comm_s_per_decode_step": decode.as_dict() if decode else None,
            "comm_s_per_prefill": prefill.as_dict(),
            "comm_fraction_of_decode": decode.mean * self.workload.decode_steps / decode_s if decode else None,
            "comm_fraction_of_prefill": prefill.mean / prefill_s if prefill_s else None,
            **(self.ranks or {}),
        }

    @property
    def decode_read_bytes_per_step(self) -> float:
        """What a decode step reads: the weights and the caches."""
        return self.decode_bytes_per_step + self.decode_cache_bytes_per_step

    @property
    def bandwidth_fraction(self) -> float | None:
        """Bytes read per second while decoding (weights and cache), as a fraction of the measured bandwidth."""
        w = self.workload
        if w.decode_steps == 0 or not self.bandwidth_bytes_per_s:
            return None
        steps_per_s = self.decode_tokens_per_s.mean / w.batch
        return self.decode_read_bytes_per_step * steps_per_s / self.bandwidth_bytes_per_s

    def as_dict(self) -> dict:
        w = self.workload
        out = {
            "backend": self.backend,
            "prompt_tokens": w.prompt_tokens,
            "gen_tokens": w.gen_tokens,
            "batch": w.batch,
            "decode_steps": w.decode_steps,
            "prefill_tokens_per_s": self.prefill_tokens_per_s.as_dict(),
            "decode_tokens_per_s": self.decode_tokens_per_s.as_dict(),
            "ttft_s": self.ttft_s.as_dict(),
            "peak_memory_bytes": self.peak_memory_bytes,
            "run_memory_bytes": self.run_memory_bytes,
            "peak_memory_method": self.peak_memory_method,
            "weights_bytes": self.weights_bytes,
            "decode_weight_bytes_per_token": self.decode_bytes_per_step / w.batch,
            "decode_cache_bytes_per_token": self.decode_cache_bytes_per_step / w.batch,
            "bandwidth_fraction": self.bandwidth_fraction,
            "runs": [{"prefill_s": r.prefill_s, "decode_s": r.decode_s,
                      "generated_tokens": r.generated_tokens} for r in self.runs],
        }
        if self.runs and self.runs[0].prefill_comm_s is not None:
            out["communication"] = self.communication()
            for run, timing in zip(out["runs"], self.runs, strict=True):
                run.update(prefill_comm_s=timing.prefill_comm_s, decode_comm_s=timing.decode_comm_s)
        if self.active_experts is not None:
            out["active_experts_per_moe_layer"] = self.active_experts
        if self.ratio is not None:
            out["ratio_vs_transformers"] = self.ratio
        return out


@dataclass
class BenchSettings:
    workloads: list[Workload]
    repeat: int = 5
    warmup: int = 1
    seed: int = 0


def validate(settings: BenchSettings, model: nn.Module) -> None:
    if settings.repeat < 1:
        raise LlmcliError("--repeat must be >= 1", exit_code=2)
    if settings.warmup < 0:
        raise LlmcliError("--warmup must be >= 0", exit_code=2)
    limit = model.context_limit
    for w in settings.workloads:
        if w.prompt_tokens < 1 or w.gen_tokens < 1 or w.batch < 1:
            raise LlmcliError("prompt length, generated tokens and batch must all be >= 1", exit_code=2)
        if w.prompt_tokens + w.gen_tokens > limit:
            raise LlmcliError(
                f"{w.prompt_tokens} prompt + {w.gen_tokens} generated tokens exceed the context ({limit} tokens)",
                exit_code=2,
            )


def run_bench(llmcli: LlmcliBackend, settings: BenchSettings, bandwidth: float,
              reference: TransformersBackend | None = None,
              progress: Callable[[str], None] | None = None) -> list[BenchRow]:
    """Rows in display order: per workload, llmcli then (if given) the reference backend."""
    model, device = llmcli.model, llmcli.device
    validate(settings, model)
    backends = [b for b in (llmcli, reference) if b is not None]
    memory = machine.PeakMemory(device)
    rows: list[BenchRow] = []
    for w in settings.workloads:
        ids = prompt_ids(w, model.config.vocab_size, settings.seed)
        label = f"pp{w.prompt_tokens} tg{w.gen_tokens} b{w.batch}"
        counter = ExpertCounter() if model.config.is_moe and w.batch > 1 else None
        compiled = llmcli.runner.compiled
        if compiled is not None and counter is not None and w.batch <= compiled.max_batch:
            compiled.warm_up(w.batch)  # the counting warm-up run is eager (recorders see eager steps only)
        for i in range(settings.warmup):
            for b in backends:
                if progress:
                    progress(f"{label}: {b.name} warm-up {i + 1}/{settings.warmup}")
                b.run(ids, w.gen_tokens, recorder=counter if b is llmcli and i == 0 else None)
        active = None
        if model.config.is_moe:  # one sequence: exactly top-k; a batch: as counted, else an upper bound
            cfg = model.config
            active = counter.mean if counter is not None else None
            if active is None:
                active = float(min(cfg.n_routed_experts, w.batch * cfg.num_experts_per_tok))
        step_bytes = decode_weight_bytes(model, w.batch, active)
        cache_bytes = w.batch * mean_step_cache_bytes(model, w.prompt_tokens, w.decode_steps)
        timings: dict[str, list[RunTiming]] = {b.name: [] for b in backends}
        peaks: dict[str, list[tuple[int, int | None]]] = {b.name: [] for b in backends}
        for i in range(settings.repeat):
            for b in backends:  # alternate backends run by run: drift hits both alike
                if progress:
                    progress(f"{label}: {b.name} run {i + 1}/{settings.repeat}")
                memory.start()
                timings[b.name].append(b.run(ids, w.gen_tokens))
                peaks[b.name].append(memory.stop())
        for b in backends:
            added = [a for _, a in peaks[b.name] if a is not None]
            rows.append(BenchRow(
                backend=b.name, workload=w, runs=timings[b.name], weights_bytes=b.weights_bytes,
                decode_bytes_per_step=step_bytes, bandwidth_bytes_per_s=bandwidth,
                peak_memory_bytes=max(p for p, _ in peaks[b.name]),
                run_memory_bytes=max(added) if added else None, peak_memory_method=memory.method,
                active_experts=active, decode_cache_bytes_per_step=cache_bytes,
            ))
        if reference is not None:
            mine, theirs = rows[-2], rows[-1]
            mine.ratio = {
                "prefill": _ratio(mine.prefill_tokens_per_s.mean, theirs.prefill_tokens_per_s.mean),
                "decode": _ratio(mine.decode_tokens_per_s.mean, theirs.decode_tokens_per_s.mean),
            }
    return rows


def gather_ranks(runner: Runner, rows: list[BenchRow]) -> None:
    """Under --tp/--ep (every rank runs the same rows): each row gets every rank's peak memory and time in
    collectives per decode step and per prompt, gathered to all ranks."""
    mine = [(row.peak_memory_bytes, getattr(row.comm_per_decode_step_s, "mean", None), row.comm_per_prefill_s.mean)
            for row in rows]
    every = runner.gathered(mine)
    for i, row in enumerate(rows):
        row.ranks = {"peak_memory_bytes_per_rank": [rank[i][0] for rank in every],
                     "comm_s_per_decode_step_per_rank": [rank[i][1] for rank in every],
                     "comm_s_per_prefill_per_rank": [rank[i][2] for rank in every]}


def _ratio(a: float, b: float) -> float | None:
    return a / b if a and b else None


# -- environment and output ----------------------------------------------------------------------


def environment(device: torch.device, dtype: torch.dtype, bandwidth: float, bandwidth_source: str,
                reference: TransformersBackend | None = None) -> dict:
    from llmcli import __version__

    env = {
        "llmcli": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "device_name": machine.device_name(device),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),  # passive on a busy machine (llmcli.openmp)
        "dtype": str(dtype).replace("torch.", ""),
        "memory_bandwidth_bytes_per_s": bandwidth,
        "memory_bandwidth_source": bandwidth_source,
    }
    if device.type == "cpu":  # weights on 4 KiB pages decode up to 1.3x slower (README: huge pages)
        env["huge_pages"] = machine.huge_pages()[0]
    if hasattr(os, "getloadavg"):
        env["load_average_1m"] = round(os.getloadavg()[0], 2)  # a loaded machine gives noisy numbers
    if reference is not None:
        env["transformers"] = reference.version
        env["transformers_attn_implementation"] = reference.attn_implementation
    return env


def product_paths(model: Runner | nn.Module) -> dict[str, int]:
    """How the model's linear layers run their products (each module's label), with the number of layers
    each: what the decode and prefill figures depend on most (e.g. {"bf16 kernel": 169, "F.linear": 1})."""
    counts: dict[str, int] = {}
    for module in as_runner(model).model.modules():
        path = label_of(module)
        if path is not None:
            counts[path] = counts.get(path, 0) + 1
    return counts


@dataclass
class BenchReport:
    model: str
    path: str
    device: str
    dtype: str
    env: dict
    settings: BenchSettings
    weights_bytes: int
    parameters: int
    rows: list[BenchRow] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "path": self.path,
            "device": self.device,
            "dtype": self.dtype,
            "env": self.env,
            "settings": {"repeat": self.settings.repeat, "warmup": self.settings.warmup, "seed": self.settings.seed},
            "weights_bytes": self.weights_bytes,
            "parameters": self.parameters,
            "results": [row.as_dict() for row in self.rows],
        }


CSV_COLUMNS = [
    "model", "device", "dtype", "backend", "batch", "prompt_tokens", "gen_tokens",
    "prefill_tokens_per_s_mean", "prefill_tokens_per_s_std", "decode_tokens_per_s_mean", "decode_tokens_per_s_std",
    "ttft_s_mean", "ttft_s_std", "peak_memory_bytes", "run_memory_bytes", "weights_bytes",
    "decode_weight_bytes_per_token", "decode_cache_bytes_per_token", "bandwidth_fraction",
    "prefill_ratio_vs_transformers", "decode_ratio_vs_transformers",
]


def csv_rows(report: BenchReport) -> list[dict]:
    out = []
    for row in report.rows:
        d = row.as_dict()
        flat = {"model": report.model, "device": report.device, "dtype": report.dtype}
        for key in CSV_COLUMNS[3:]:
            stat, _, part = key.rpartition("_")
            if isinstance(d.get(stat), dict) and part in ("mean", "std"):
                flat[key] = d[stat][part]
            elif key.endswith("_ratio_vs_transformers"):
                flat[key] = (d.get("ratio_vs_transformers") or {}).get(key.split("_")[0])
            else:
                flat[key] = d.get(key)
        out.append(flat)
    return out
