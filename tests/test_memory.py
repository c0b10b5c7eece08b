"""llmcli.memory: the bytes a model needs once loaded (checked before loading, printed by `show`) and the memory
the machine has free.

Oracles: the loaded model's own parameter bytes, the peak resident memory of a real load measured by the kernel
(VmHWM), a checkpoint larger than this machine (a sparse file), and /proc and cgroup trees written here.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmcli import memory
from llmcli.bench import parameter_bytes
from llmcli.config import config_from_dict, load_config
from llmcli.demo import ensure_demo
from llmcli.errors import LlmcliError
from llmcli.formats.safetensors import read_checkpoint
from llmcli.loader import load_model

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def gib(n: int, up: bool = True) -> str:
    """As messages print sizes: tenths of a GiB, what is needed rounded up, what is free rounded down."""
    return f"{(math.ceil if up else math.floor)(n * 10 / 2**30) / 10:.1f}"


def estimate(path: Path, dtype: str, quantize: str | None = None) -> memory.Estimate:
    return memory.for_checkpoint(load_config(path), read_checkpoint(path), dtype, quantize)


def fp8_with_mtp(tmp_path: Path) -> Path:
    """demo-deepseek as DeepSeek-V3 ships: decoder linears in FP8 with 128x128 block scales, plus a
    multi-token-prediction layer that loading skips."""
    source = ensure_demo("demo-deepseek")
    target = tmp_path / "fp8"
    shutil.copytree(source, target)
    tensors = {}
    for name, t in load_file(source / "model.safetensors").items():
        if t.dim() == 2 and name.startswith("model.layers.") and not name.endswith("mlp.gate.weight"):
            tensors[name] = t.to(torch.float8_e4m3fn)
            tensors[name + "_scale_inv"] = torch.ones(math.ceil(t.shape[0] / 128), math.ceil(t.shape[1] / 128))
        else:
            tensors[name] = t
    raw = json.loads((source / "config.json").read_text())
    mtp = raw["num_hidden_layers"]
    tensors[f"model.layers.{mtp}.eh_proj.weight"] = torch.zeros(128, 256, dtype=torch.float8_e4m3fn)
    tensors[f"model.layers.{mtp}.eh_proj.weight_scale_inv"] = torch.ones(1, 2)
    tensors[f"model.layers.{mtp}.enorm.weight"] = torch.ones(128)
    save_file(tensors, target / "model.safetensors")
    raw["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (target / "config.json").write_text(json.dumps(raw))
    return target


# -- the weights term is exact -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["demo-qwen", "demo-deepseek", "fp8"])
@pytest.mark.parametrize(("dtype", "quantize"), [("float32", None), ("bfloat16", None), ("bfloat16", "int8"),
                                               ("bfloat16", "int4")])
def test_estimated_weights_are_what_loading_holds(name, dtype, quantize, tmp_path, monkeypatch):
    """Tied head once (demo-qwen), float32 router (DeepSeek), FP8 dequantised with scales and the MTP layer
    dropped, int8 values with a scale per row, int4 with a scale and zero per group: the estimate equals the
    loaded model's own parameter bytes. (The bfloat16 kernel's panels pad outputs to multiples of 64, at most
    63 rows per linear: a layout detail the header-only estimate leaves out, so the kernel is off here.)"""
    monkeypatch.setenv("LLMCLI_BF16_KERNEL", "0")
    path = fp8_with_mtp(tmp_path) if name == "fp8" else ensure_demo(name)
    loaded = load_model(name, path, device="cpu", dtype=dtype, quantize=quantize)
    assert estimate(path, dtype, quantize).weights == parameter_bytes(loaded.model)[0]


def test_show_reports_the_figure_loading_checks(run_cli, tmp_path):
    path = fp8_with_mtp(tmp_path)
    code, out, err = run_cli("show", str(path), "--json")
    assert code == 0, err
    facts = json.loads(out)["memory"]
    needed, int8 = estimate(path, "bfloat16"), estimate(path, "bfloat16", "int8")  # FP8 runs in bfloat16
    assert (facts["dtype"], facts["needs_bytes"], facts["int8_needs_bytes"]) == ("bfloat16", needed.total, int8.total)
    assert facts["weights_bytes"] == json.loads(out)["weight_bytes"]["bfloat16"] == needed.weights
    assert facts["summary"].startswith(f"needs {gib(needed.total)} GiB in bfloat16, ")
    assert facts["available_bytes"] > 0 and facts["summary"].endswith(" GiB available")


def test_show_estimates_from_the_config_without_weights(run_cli, tmp_path):
    """No weights on disk: the same shapes, from the config (its layer count includes norms and biases: close)."""
    source = ensure_demo("demo-qwen")
    target = tmp_path / "config-only"
    target.mkdir()
    for item in source.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, target / item.name)
    code, out, err = run_cli("show", str(target), "--json")
    assert code == 0, err
    facts = json.loads(out)
    on_disk = estimate(source, facts["run_dtype"])
    assert facts["memory"]["needs_bytes"] == pytest.approx(on_disk.total, rel=1e-3)
    assert facts["memory"]["int8_needs_bytes"] is None


@pytest.mark.parametrize(("config", "margin"), [("QWEN25_7B", 0.10), ("DEEPSEEK_V3", 0.01)])
def test_the_margin_is_small_for_real_models(run_cli, tmp_path, config, margin):
    """From a real config alone: the weights at their published size in bfloat16, and what is added for loading,
    the cache and the tokenizer (Qwen2.5-7B: the 1 GiB untied head's reorder) a small part of it."""
    from tests import test_show

    (tmp_path / "config.json").write_text(json.dumps(getattr(test_show, config)))
    code, out, err = run_cli("show", str(tmp_path), "--json")
    assert code == 0, err
    facts = json.loads(out)
    assert facts["memory"]["weights_bytes"] == 2 * facts["params_total"]
    assert 0 < facts["memory"]["needs_bytes"] - facts["memory"]["weights_bytes"] < margin * 2 * facts["params_total"]


# -- the check -------------------------------------------------------------------------------------


def bytes_read() -> int:
    """Bytes this process has read through read() and friends (rchar)."""
    return next(int(line.split()[1]) for line in open("/proc/self/io") if line.startswith("rchar"))


@linux_only
def test_refuses_before_reading_weights_and_force_loads_anyway(monkeypatch):
    path = ensure_demo("demo-deepseek")
    needed = estimate(path, "float32")
    monkeypatch.setattr(memory, "available_bytes", lambda: needed.total - 1)
    load_model("warm", path, device="cpu", check_memory=False)  # imports and caches are not part of the count
    before = bytes_read()
    with pytest.raises(LlmcliError) as refused:
        load_model("demo-deepseek", path, device="cpu")
    read = bytes_read() - before
    message = str(refused.value)
    assert "\n" not in message and message.endswith("--force to try anyway)")
    assert f"needs {gib(needed.total)} GiB of memory, {gib(needed.total - 1, up=False)} GiB available" in message
    assert read < (path / "model.safetensors").stat().st_size / 10  # the headers, not the weights
    assert load_model("demo-deepseek", path, device="cpu", check_memory=False).model is not None


def test_refusal_suggests_int8_when_that_would_fit(monkeypatch, run_cli):
    path = ensure_demo("demo-qwen")
    full, int8 = estimate(path, "float32"), estimate(path, "float32", "int8")
    monkeypatch.setattr(memory, "available_bytes", lambda: (full.total + int8.total) // 2)
    code, out, err = run_cli("generate", str(path), "-p", "hi", "-n", "2")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and f"--quantize int8 needs {gib(int8.total)} GiB" in err
    code, out, err = run_cli("generate", str(path), "-p", "hi", "-n", "2", "--quantize", "int8")
    assert code == 0, err


def sparse_checkpoint(directory: Path, nbytes: int) -> Path:
    """A one-layer Qwen2 whose bfloat16 embedding takes `nbytes`: a valid safetensors header, then a hole
    (a sparse file takes no disk). Loading it for real would read all of it."""
    hidden = 1024
    vocab = math.ceil(nbytes / (2 * hidden))
    directory.mkdir()
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "BF16", "shape": [vocab, hidden],
                                                       "data_offsets": [0, vocab * hidden * 2]}}).encode()
    with open(directory / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + vocab * hidden * 2)
    (directory / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2816,
        "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 8, "torch_dtype": "bfloat16"}))
    return directory


@linux_only
def test_a_model_larger_than_this_machine_stops_at_once(tmp_path):
    """No patching: the real available memory, a checkpoint twice that size, a real `llmcli generate` process."""
    available = memory.available_bytes()
    try:
        path = sparse_checkpoint(tmp_path / "huge", 2 * available)
    except OSError as exc:
        pytest.skip(f"no sparse file of {2 * available} bytes here: {exc}")
    run = subprocess.run([sys.executable, "-m", "llmcli", "generate", str(path), "-p", "hi", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
    needs = f"needs {gib(estimate(path, 'bfloat16').total)} GiB of memory"
    assert needs in run.stderr and "GiB available" in run.stderr and "--force" in run.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_model_larger_than_the_gpu_stops_at_once(tmp_path):
    free, _ = torch.cuda.mem_get_info()
    try:
        path = sparse_checkpoint(tmp_path / "huge", 2 * free)
    except OSError as exc:
        pytest.skip(f"no sparse file of {2 * free} bytes here: {exc}")
    with pytest.raises(LlmcliError, match=r"GiB of GPU memory on cuda, [\d.]+ GiB available"):
        load_model("huge", path, device="cuda")


# -- the estimate against a measured load ------------------------------------------------------------

QWEN2 = dict(model_type="qwen2", vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=32768,
             torch_dtype="bfloat16")

PEAK_CHILD = r"""
import json, sys, torch
from pathlib import Path
from llmcli import memory
from llmcli.bench import parameter_bytes
from llmcli.config import load_config
from llmcli.formats.safetensors import read_checkpoint
from llmcli.loader import load_model
import llmcli.models.qwen, llmcli.tokenizer, llmcli.weights, llmcli.backends.int8  # imports: not the load's
with torch.device("meta"):
    torch.nn.Linear(2, 2), torch.nn.Embedding(2, 2)

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

path, dtype, quantize = Path(sys.argv[1]), sys.argv[2], sys.argv[3] or None
need = memory.for_checkpoint(load_config(path), read_checkpoint(path), dtype, quantize)
open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS
base = status("VmRSS")
loaded = load_model("t", path, device="cpu", dtype=dtype, quantize=quantize, int8_kernel=False)
load_peak = status("VmHWM") - base
with torch.inference_mode():  # a 64-token prompt and 8 tokens more
    cache = loaded.runner.make_cache(1, 72)
    loaded.runner(torch.arange(64).reshape(1, -1), cache, last_only=True)  # as generate runs it
    for _ in range(8):
        loaded.runner(torch.tensor([[5]]), cache, last_only=True)
weights = parameter_bytes(loaded.model)[0]
print(json.dumps({"load_peak": load_peak, "run_peak": status("VmHWM") - base, "weights": weights,
                  "estimate": need.total, "estimate_weights": need.weights}))
"""


@pytest.fixture(scope="module")
def qwen2_checkpoint(tmp_path_factory) -> Path:
    """A random Qwen2-shaped checkpoint, 110 MB of bfloat16 (an untied 32000-token head)."""
    from llmcli.demo import build_demo_tokenizer, write_tokenizer
    from llmcli.models.qwen import QwenForCausalLM

    directory = tmp_path_factory.mktemp("qwen2-110mb")
    with torch.device("meta"):
        model = QwenForCausalLM(config_from_dict(QWEN2))
    gen = torch.Generator().manual_seed(0)
    save_file({name: (torch.randn(p.shape, generator=gen) * 0.02).bfloat16()
               for name, p in model.state_dict().items()}, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(QWEN2))
    write_tokenizer(directory, build_demo_tokenizer())
    return directory


@linux_only
@pytest.mark.parametrize(("dtype", "quantize"), [("bfloat16", ""), ("float32", ""), ("bfloat16", "int8")])
def test_estimate_covers_the_measured_peak(qwen2_checkpoint, dtype, quantize):
    """Loading in a fresh process and running a short prompt never rises above the estimate, which is the
    weights plus a margin: the exact weights term and the measured peak are checked, the ratio printed."""
    out = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(qwen2_checkpoint), dtype, quantize],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    r = json.loads(out.strip().splitlines()[-1])
    print(f"{dtype} {quantize or '-'}: estimate {r['estimate'] / 2**20:.0f} MiB, weights {r['weights'] / 2**20:.0f} "
          f"MiB, peak while loading {r['load_peak'] / 2**20:.0f} MiB, with a prompt {r['run_peak'] / 2**20:.0f} MiB "
          f"({r['run_peak'] / r['estimate']:.2f} of the estimate)")
    assert r["estimate_weights"] == r["weights"]
    assert r["weights"] < r["load_peak"] <= r["run_peak"] <= r["estimate"], r


# -- what the machine has ----------------------------------------------------------------------------


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


MEMINFO = "MemTotal:       24683780 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n"


def test_available_is_memavailable_without_a_cgroup_limit(tmp_path):
    write(tmp_path / "proc/meminfo", MEMINFO)
    write(tmp_path / "proc/self/cgroup", "0::/user.slice\n")
    write(tmp_path / "cgroup/user.slice/memory.max", "max\n")
    write(tmp_path / "cgroup/user.slice/memory.current", "123\n")
    assert memory.available_bytes(tmp_path / "proc", tmp_path / "cgroup") == 20000000 * 1024


def test_a_cgroup_v2_limit_above_us_lowers_it(tmp_path):
    """A container limited to 4 GiB on a host with 19 GiB available: the container's room counts, and file
    cache it can drop (inactive_file) is room."""
    write(tmp_path / "proc/meminfo", MEMINFO)
    write(tmp_path / "proc/self/cgroup", "0::/system.slice/job.scope\n")
    write(tmp_path / "cgroup/system.slice/job.scope/memory.max", "max\n")
    write(tmp_path / "cgroup/system.slice/job.scope/memory.current", "5\n")
    write(tmp_path / "cgroup/system.slice/memory.max", f"{4 * 2**30}\n")
    write(tmp_path / "cgroup/system.slice/memory.current", f"{3 * 2**30}\n")
    write(tmp_path / "cgroup/system.slice/memory.stat", f"anon 1\ninactive_file {2**29}\nactive_file 7\n")
    assert memory.available_bytes(tmp_path / "proc", tmp_path / "cgroup") == 2**30 + 2**29


def test_a_cgroup_v1_limit_lowers_it(tmp_path):
    write(tmp_path / "proc/meminfo", MEMINFO)
    write(tmp_path / "proc/self/cgroup", "5:cpu,cpuacct:/\n4:memory:/docker/abc\n0::/\n")
    write(tmp_path / "cgroup/memory/docker/abc/memory.limit_in_bytes", f"{2**31}\n")
    write(tmp_path / "cgroup/memory/docker/abc/memory.usage_in_bytes", f"{2**30}\n")
    write(tmp_path / "cgroup/memory/docker/abc/memory.stat", "cache 9\ntotal_inactive_file 1024\n")
    write(tmp_path / "cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n")  # v1's "no limit"
    write(tmp_path / "cgroup/memory/memory.usage_in_bytes", "1\n")
    assert memory.available_bytes(tmp_path / "proc", tmp_path / "cgroup") == 2**30 + 1024


def test_unknown_without_proc(tmp_path):
    if sys.platform == "darwin":
        pytest.skip("macOS falls back to vm_stat")
    assert memory.available_bytes(tmp_path / "none", tmp_path / "none") is None


def test_vm_stat_counts_free_speculative_and_inactive_pages():
    sample = ("Mach Virtual Memory Statistics: (page size of 16384 bytes)\n"
              "Pages free:                                3000.\nPages active:                       500000.\n"
              "Pages inactive:                           20000.\nPages speculative:                    1000.\n"
              "Pages wired down:                        90000.\n")
    assert memory.parse_vm_stat(sample) == 16384 * (3000 + 20000 + 1000)
    assert memory.parse_vm_stat("no such output") is None


@linux_only
def test_this_machine_has_a_figure():
    total = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    assert 0 < memory.available_bytes() <= total


@pytest.mark.parametrize("tied", [False, True])
def test_an_untied_head_is_quantised_as_soon_as_it_is_loaded(tied):
    """A checkpoint that stores lm_head first (DeepSeek's safetensors) kept it in bfloat16 through the whole load: an
    untied head is now quantised the moment its weight is in. A tied one waits for the end (its values come with the
    embedding's, which keeps them)."""
    from llmcli.backends.int8 import Int8Linear
    from llmcli.backends.prepare import Preparation
    from llmcli.config_fields import ModelConfig
    from llmcli.models.qwen import QwenForCausalLM
    from llmcli.options import Options

    cfg = ModelConfig(family="qwen2", vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=64, tie_word_embeddings=tied, layer_windows=[None])
    model = QwenForCausalLM(cfg).bfloat16()
    expected = model.lm_head.weight.detach().clone()
    preparation = Preparation(model, Options.from_env(device="cpu", quantize="int8"))
    preparation.loaded("lm_head.weight")
    assert type(model.lm_head) is (torch.nn.Linear if tied else Int8Linear)
    preparation.finish()
    assert isinstance(model.lm_head, Int8Linear)
    restored = model.lm_head.int8_weight(torch.float32) * model.lm_head.scales.float()[:, None]
    assert (restored - expected.float()).abs().max() <= expected.float().abs().max() / 127
