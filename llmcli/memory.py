"""How much memory a model takes once loaded, from config.json and the safetensors headers alone, and how much
the machine has free. Loading compares the two before reading any weight; `show` prints both. No torch here:
`show` must stay torch-free.

The figure is what loading leaves in memory plus what it briefly holds on top, and a little for running:
  weights   every tensor generation loads, in the run dtype (FP8 is dequantised to it), `--quantize int8`
            linears as 1 byte a value plus a scale per row, DeepSeek's MoE router in float32; not FP8 scales
            (consumed), DeepSeek-V3's multi-token-prediction layer (skipped), a tied head (the embedding's)
  loading   what loading holds for a moment: each decoder layer (each MoE expert apart) is fused, reordered
            for oneDNN or quantised once it is in, its new copy next to its source; and a tensor whose file
            dtype is not the run dtype passes through a read buffer (FP8: float32 temporaries)
  cache     the KV cache of CACHE_TOKENS tokens (it grows as it fills: `show` gives the bytes per token)
  reserve   RESERVE_BYTES: the tokenizer (~60 MiB for a 150k-token vocabulary), int8 quantisation's
            float32 chunks (64 MiB), a prompt's activations and the allocator's slack
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from llmcli.backends.int8_size import int4_size, int8_size, quantizable
from llmcli.config import ModelConfig
from llmcli.config_deepseek import indexer_settings
from llmcli.config_deepseek_v4 import v4_cache_bytes
from llmcli.errors import LlmcliError
from llmcli.formats.safetensors import DTYPE_BYTES, TensorInfo
from llmcli.hybrid_facts import SKIPPED_PREFIXES, cache_facts, is_hybrid

GIB = 2**30
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Qwen3.5's vision-language wrappers keep the decoder under model.language_model.
LAYER_RE = re.compile(r"^(?:(?:model\.)?(?:language_model\.)?layers|transformer\.h)\.(\d+)\.")  # V4 hub: layers.N
# loading prepares each expert apart
EXPERT_RE = re.compile(r"^model\.(?:language_model\.)?layers\.\d+\.mlp\.experts\.\d+\.")
SCALE_SUFFIX = "_scale_inv"  # FP8 block scales: consumed by dequantisation
NOT_PARAMETERS = (".rotary_emb.inv_freq", ".attn.masked_bias", ".attn.bias")  # buffers in old checkpoints
# DeepSeek routes in float32; V3.2's sparse attention weighs its indexer heads in float32 too.
FLOAT32_ROUTER = (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias", ".indexer.weights_proj.weight")
FP8_DEQUANT_BYTES = 13  # per value: the FP8 read, then its float32 copy, expanded scales and product
CACHE_TOKENS = 2048  # generate's default run (prompt + 256 tokens) and a chat's first turns fit in it
RESERVE_BYTES = 256 * 2**20
NO_LIMIT = 2**60  # cgroup v1 writes "no limit" as a number near 2**63


@dataclass(frozen=True)
class Estimate:
    """Bytes a model needs, by part (see the module's docstring)."""

    dtype: str  # the run dtype, or "int8" with --quantize int8
    weights: int
    loading: int
    cache: int
    reserve: int = RESERVE_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.loading + self.cache + self.reserve

    def parts(self) -> str:
        return (f"{gib(self.weights)} GiB of {self.dtype} weights + {gib(self.total - self.weights)} GiB "
                f"to load them and run {CACHE_TOKENS} tokens")


def gib(n: int, up: bool = True) -> str:
    """Tenths of a GiB, rounded up for what is needed and down for what is free, so that a refusal never
    reads "needs 0.3 GiB, 0.3 GiB available"."""
    tenths = n * 10 / GIB
    return f"{(math.ceil(tenths) if up else math.floor(tenths)) / 10:.1f}"


# -- what the model needs ----------------------------------------------------------------------------


def layer_of(name: str) -> int | None:
    match = LAYER_RE.match(name)
    return int(match.group(1)) if match else None


def loaded_tensors(cfg: ModelConfig, tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """The checkpoint tensors that loading turns into parameters (see the module's docstring for what it skips)."""
    kept = {}
    for name, t in block_quantised(tensors).items():
        layer = layer_of(name)
        if name.endswith((SCALE_SUFFIX, *NOT_PARAMETERS)) or (layer is not None and layer >= cfg.num_layers):
            continue
        if (is_hybrid(cfg) or cfg.family == "deepseek_v4") and name.startswith(SKIPPED_PREFIXES):  # vision, MTP
            continue
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue  # loading skips a tied head saved alongside the embedding
        kept[name] = t
    return kept


def block_quantised(tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """DeepSeek-V4's reference naming: block scales `<stem>.scale` beside `<stem>.weight` are no parameters,
    and an int8 weight with such a scale holds FP4 values two a byte (unpacked while loading)."""
    out = {}
    for name, t in tensors.items():
        if name.endswith(".scale") and name[:-6] + ".weight" in tensors:
            continue
        if t.dtype in ("I8", "U8") and name.endswith(".weight") and name[:-7] + ".scale" in tensors:
            t = replace(t, shape=(*t.shape[:-1], 2 * t.shape[-1]))
        out[name] = t
    return out


def kv_values_per_token(cfg: ModelConfig) -> int:
    """Values each token adds to the cache in one layer. MLA caches the compressed latent c_kv and the shared
    rotary key instead of per-head keys and values."""
    if cfg.family == "deepseek_v32":  # sparse attention also caches the indexer's key (one per token)
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim + indexer_settings(cfg).head_dim
    if cfg.family.startswith("deepseek"):
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return 2 * cfg.num_kv_heads * cfg.head_dim


def _cache_bytes(cfg: ModelConfig, element: int) -> int:
    if cfg.family == "deepseek_v4":  # compressed entries and fixed windows (llmcli.config_deepseek_v4)
        return v4_cache_bytes(cfg, element, min(cfg.max_position_embeddings, CACHE_TOKENS))
    if is_hybrid(cfg):  # keys and values of the full-attention layers, plus the DeltaNet layers' fixed state
        facts = cache_facts(cfg, element)
        return facts["bytes_per_token"] * min(cfg.max_position_embeddings, CACHE_TOKENS) + \
            facts["state_bytes_per_sequence"]
    return kv_values_per_token(cfg) * element * cfg.num_layers * min(cfg.max_position_embeddings, CACHE_TOKENS)


def weight_bytes(cfg: ModelConfig, tensors: dict[str, TensorInfo], dtype: str, quantize: str | None = None,
                 six_bit_head: bool = True) -> int:
    """Bytes of the loaded weights: `tensors` as `loaded_tensors` gives them, in `dtype` or with int8, int5 or int4
    linears (an int4 or int5 run's head in 6 bits with `six_bit_head`, as where the integer kernels run, else
    int8)."""
    element = ELEMENT_BYTES[dtype]
    if quantize in ("int8", "int5", "int4"):
        tied = (cfg.vocab_size, cfg.hidden_size) if cfg.tie_word_embeddings else None
        shapes = {name: t.shape for name, t in tensors.items()}
        held = int8_size(shapes, element, tied) if quantize == "int8" else \
            int4_size(shapes, element, tied, six_bit_head, bits=5 if quantize == "int5" else 4)
    else:
        held = sum(t.numel for t in tensors.values()) * element
    if not cfg.family.startswith("deepseek"):  # Qwen MoE routes in the model's dtype, as transformers does
        return held
    router = sum(t.numel for name, t in tensors.items() if name.endswith(FLOAT32_ROUTER))
    return held + router * (4 - element)


def _unit(name: str) -> str:
    match = EXPERT_RE.match(name) or LAYER_RE.match(name)
    return match.group(0) if match else name


def _loading_bytes(tensors: dict[str, TensorInfo], element: int) -> int:
    """What loading holds besides the model's own place for it: the largest unit's prepared copy (fused, reordered
    for oneDNN or quantised once the unit is in, next to its source) and the largest read buffer (a file dtype
    other than the run dtype; FP8: dequantisation's float32 temporaries). Embeddings and norms stay in place."""
    copies: dict[str, int] = {}
    read = 0
    for name, t in tensors.items():
        if quantizable(name, t.shape):
            copies[_unit(name)] = copies.get(_unit(name), 0) + t.numel * element
        disk = DTYPE_BYTES.get(t.dtype, element)
        per_value = FP8_DEQUANT_BYTES if t.dtype.startswith("F8_") else disk if disk != element else 0
        read = max(read, t.numel * per_value)
    return max(copies.values(), default=0) + read


def for_checkpoint(cfg: ModelConfig, tensors: dict[str, TensorInfo], dtype: str,
                   quantize: str | None = None) -> Estimate:
    """What loading the checkpoint whose headers are `tensors` needs, in `dtype` (float32, bfloat16, float16)."""
    element = ELEMENT_BYTES[dtype]
    kept = loaded_tensors(cfg, tensors)
    return Estimate(quantize or dtype, weight_bytes(cfg, kept, dtype, quantize),
                    _loading_bytes(kept, element), _cache_bytes(cfg, element))


def for_config(cfg: ModelConfig, parameters: int, largest_unit: int, dtype: str) -> Estimate:
    """The same from the config alone (weights not downloaded): `parameters` in `dtype`, `largest_unit` values in
    the largest part loading prepares at once (a layer's linears, or an untied head)."""
    element = ELEMENT_BYTES[dtype]
    return Estimate(dtype, parameters * element, largest_unit * element, _cache_bytes(cfg, element))


# -- what the machine has ----------------------------------------------------------------------------


def available_bytes(proc: Path = Path("/proc"), cgroup_fs: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process can still take without swapping, or None where unknown. Linux: MemAvailable, lowered
    to the room left under the cgroup's memory limit (in a container MemAvailable is the host's); macOS:
    free, speculative and inactive pages, as psutil counts them."""
    found = [n for n in (_meminfo_available(proc / "meminfo"), _cgroup_room(proc / "self/cgroup", cgroup_fs))
             if n is not None]
    if not found and sys.platform == "darwin":
        found = [n for n in [vm_stat_available()] if n is not None]
    return min(found) if found else None


def _meminfo_available(meminfo: Path) -> int | None:
    try:
        match = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo.read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _stat_value(path: Path, key: str) -> int:
    try:
        match = re.search(rf"^{key} (\d+)$", path.read_text(), re.M)
    except OSError:
        return 0
    return int(match.group(1)) if match else 0


def _cgroup_room(proc_cgroup: Path, cgroup_fs: Path) -> int | None:
    """The room left under the tightest memory limit of this process's cgroup and those above it (cgroup v2
    memory.max, v1 memory.limit_in_bytes). File cache the kernel can drop (inactive_file) counts as room."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and not controllers:
            base, limit, usage, inactive = cgroup_fs, "memory.max", "memory.current", "inactive_file"
        elif "memory" in controllers.split(","):
            base, limit, usage, inactive = (cgroup_fs / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
                                            "total_inactive_file")
        else:
            continue
        directory = base / path.strip("/")
        for level in [directory, *directory.parents]:  # in a cgroup namespace the mount shows only our part
            cap, used = _read_int(level / limit), _read_int(level / usage)
            if cap is not None and used is not None and cap < NO_LIMIT:
                rooms.append(max(cap - used + _stat_value(level / "memory.stat", inactive), 0))
            if level == base:
                break
    return min(rooms) if rooms else None


def vm_stat_available() -> int | None:
    try:
        out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_vm_stat(out)


def parse_vm_stat(text: str) -> int | None:
    page = re.search(r"page size of (\d+) bytes", text)
    counts = [re.search(rf"^Pages {kind}:\s+(\d+)\.", text, re.M) for kind in ("free", "speculative", "inactive")]
    if page is None or None in counts:
        return None
    return int(page.group(1)) * sum(int(m.group(1)) for m in counts)


# -- the check ---------------------------------------------------------------------------------------


def require(needed: Estimate, available: int | None, where: str = "memory", instead: Estimate | None = None) -> None:
    """Refuse, in one line, a model that needs more than `available` (None: unknown, so no check). `instead` is an
    estimate worth suggesting (int8) when it would fit."""
    if available is None or needed.total <= available:
        return
    hint = ""
    if instead is not None and instead.total <= available:
        hint = f"--quantize int8 needs {gib(instead.total)} GiB; "
    raise LlmcliError(f"the model needs {gib(needed.total)} GiB of {where}, {gib(available, up=False)} GiB available: "
                      f"{needed.parts()} ({hint}--force to try anyway)")


def summary(needed: Estimate, available: int | None) -> str:
    """`show`'s line: the same figure loading checks."""
    room = f"{gib(available, up=False)} GiB available" if available is not None else "available memory unknown"
    return f"needs {gib(needed.total)} GiB in {needed.dtype}, {room}"

