"""Where many-row products leave llmcli's CPU kernels for a GEMM on the converted weight (backends/crossover.py): the
choice from measured ratios, the measurement itself on this CPU, its cache, and each product's converted path."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llmcli.backends import bf16_kernel, crossover, int8_kernel, int_dot
from llmcli.backends.int4 import INTEGER_PROMPT_ROWS, Int4Linear
from llmcli.backends.int8 import Int8Linear
from llmcli.backends.linear import NEVER, BlockedLinear
from llmcli.errors import LlmcliError
from llmcli.options import Options

LADDER = crossover.LADDER
kernels = pytest.mark.skipif(not int8_kernel.available()[0], reason="llmcli's CPU kernels cannot be built here")


def ratios(faster_from: int | None, noise: dict[int, float] | None = None) -> dict[int, float]:
    """Kernel time over converted time at each ladder count: 0.6 below `faster_from`, 1.4 from it (None: never)."""
    found = {rows: 1.4 if faster_from is not None and rows >= faster_from else 0.6 for rows in LADDER}
    return {**found, **(noise or {})}


def test_the_kernel_takes_the_rows_below_where_the_converted_weight_is_faster():
    assert crossover.kernel_rows_from(ratios(None)) == NEVER
    assert crossover.kernel_rows_from(ratios(512)) == 384
    assert crossover.kernel_rows_from(ratios(32)) == 16
    assert crossover.kernel_rows_from(ratios(16)) == 16  # the first count is the least the kernel keeps


def test_the_converted_weight_must_be_clearly_faster():
    """Within MARGIN the kernel keeps the rows: whole prompts favour it more than the sample does."""
    assert crossover.kernel_rows_from({rows: 1.0 + crossover.MARGIN for rows in LADDER}) == NEVER
    assert crossover.kernel_rows_from({rows: 1.0 + crossover.MARGIN + 0.01 for rows in LADDER}) == 16
    assert crossover.kernel_rows_from(ratios(512), margin=0.5) == NEVER  # 1.4 is not 1.5


def test_one_noisy_count_does_not_move_the_split():
    assert crossover.kernel_rows_from(ratios(None, {512: 1.3})) == NEVER  # one slow kernel run
    assert crossover.kernel_rows_from(ratios(None, {1024: 1.3})) == 768  # at the top, one count is all there is
    assert crossover.kernel_rows_from(ratios(256, {768: 0.9})) == 192  # one slow GEMM run above the split
    assert crossover.kernel_rows_from(ratios(256, {64: 1.2})) == 192  # one slow kernel run below it


def test_the_sample_is_one_layers_products_scaled_to_the_budget(monkeypatch):
    """The sample layer takes the first decoder layer's products of the kind, not its routed experts where others
    exist, in order; outputs scaled down together (to multiples of 64) where they pass BUDGET, inputs kept."""
    from torch import nn

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = BlockedLinear(nn.Linear(256, 384, dtype=torch.bfloat16))
            self.down = BlockedLinear(nn.Linear(1024, 256, dtype=torch.bfloat16))
            self.experts = nn.ModuleList([BlockedLinear(nn.Linear(256, 128, dtype=torch.bfloat16))])

    model = nn.Module()
    model.layers = nn.ModuleList([Layer(), Layer()])
    model.lm_head = BlockedLinear(nn.Linear(256, 512, dtype=torch.bfloat16))
    assert crossover.layer_shapes(model, "bf16") == [(384, 256), (256, 1024)]
    monkeypatch.setattr(crossover, "BUDGET", (384 * 256 + 256 * 1024) // 2)
    assert crossover.layer_shapes(model, "bf16") == [(192, 256), (128, 1024)]
    only_experts = nn.Module()
    only_experts.layers = nn.ModuleList([nn.Module()])
    only_experts.layers[0].experts = nn.ModuleList([BlockedLinear(nn.Linear(256, 128, dtype=torch.bfloat16))])
    assert crossover.layer_shapes(only_experts, "bf16") == [(128, 256)]


def test_a_bad_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LLMCLI_CROSSOVER", "sometimes")
    with pytest.raises(LlmcliError, match="LLMCLI_CROSSOVER must be one of measured, remeasure, cached, fixed"):
        Options.from_env()
    monkeypatch.setenv("LLMCLI_CROSSOVER", "cached")
    assert Options.from_env().crossover == "cached"


@kernels
def test_converted_products_are_torchs_gemm_on_the_stored_weight():
    """Beyond `kernel_rows` each product is F.linear on its weight as rows: bit for bit what torch gives."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 80).bfloat16()  # 80 outputs: the panels' padding is cut off
    x = torch.randn(5, 128).bfloat16()
    blocked = BlockedLinear(linear)
    kernel = blocked(x)
    blocked.kernel_rows = 4
    assert torch.equal(blocked(x), F.linear(x, linear.weight, linear.bias))
    assert (blocked(x).float() - kernel.float()).abs().max() < 0.05  # and near the kernel's sums
    wide = x.float()  # float32 rows (a head's float32 logits): float32 sums, as the kernel returns them
    assert torch.equal(blocked(wide), F.linear(wide, linear.weight.float(), linear.bias.float()))
    if not int_dot.runs_fast():
        pytest.skip(f"the integer kernels need AVX2 (built here: {int_dot.isa()})")
    int4 = Int4Linear(torch.nn.Linear(128, 64, bias=False).bfloat16(), integer=True)
    int4.kernel_rows = 4
    weight = int_dot.int4_unblock(int4.packed, int4.scales_and_mins, torch.bfloat16)
    assert torch.equal(int4(x), F.linear(x, weight))
    int8 = Int8Linear(torch.nn.Linear(128, 64, bias=False).bfloat16(), kernel=True, integer=True)
    int8.kernel_rows = 4
    assert torch.equal(int8(x), F.linear(x, int8.int8_weight(x.dtype)) * int8.scales)


@kernels
def test_measured_crossovers_apply_to_every_product_and_are_cached(tmp_path, monkeypatch):
    """A real measurement on a small sample and a short ladder: both paths timed at each count, the choice set on
    every product of the kind, cached per CPU; "cached" and "fixed" measure nothing; "remeasure" measures what an
    earlier process measured, not what this one did."""
    if not int_dot.runs_fast():
        pytest.skip(f"the integer kernels need AVX2 (built here: {int_dot.isa()})")
    monkeypatch.setattr(crossover, "LADDER", (16, 48))
    cache = tmp_path / "crossover.json"
    model = torch.nn.Sequential(Int4Linear(torch.nn.Linear(64, 64).bfloat16(), integer=True),
                                Int4Linear(torch.nn.Linear(64, 64).bfloat16(), integer=True))
    assert crossover.apply(model, torch.bfloat16, "cached", cache) == []
    assert all(layer.kernel_rows == INTEGER_PROMPT_ROWS for layer in model)  # no figure yet: the class's
    assert crossover.apply(model, torch.bfloat16, "fixed", cache) == [] and not cache.exists()

    def time_both(products, dtype, ladder=crossover.LADDER, repeats=crossover.REPEATS):
        measured.append(ladder)
        return timed(products, dtype, ladder, repeats)

    measured, timed = [], crossover.time_both
    monkeypatch.setattr(crossover, "time_both", time_both)
    notes = crossover.apply(model, torch.bfloat16, "measured", cache)
    assert measured == [(16, 48)] and len(notes) == 1 and "int4: the kernel" in notes[0]
    entry = json.loads(cache.read_text())[crossover.cache_key("int4", torch.bfloat16, [(64, 64), (64, 64)])]
    assert set(entry["ratios"]) == {"16", "48"} and all(v > 0 for v in entry["ratios"].values())
    assert entry["kernel_rows"] in (16, NEVER)
    assert all(layer.kernel_rows == entry["kernel_rows"] for layer in model)
    assert crossover.current(model) == {"int4": None if entry["kernel_rows"] == NEVER else 16}

    assert crossover.apply(model, torch.bfloat16, "measured", cache) == [] and len(measured) == 1  # cached
    assert crossover.apply(model, torch.bfloat16, "remeasure", cache) == [] and len(measured) == 1  # this process's
    monkeypatch.setattr(crossover, "PROCESS_START", entry["epoch"] + 1)  # as if measured by an earlier process
    assert len(crossover.apply(model, torch.bfloat16, "remeasure", cache)) == 1 and len(measured) == 2
    assert crossover.cached(torch.bfloat16, cache).keys() == {"int4"}


def test_figures_measured_on_a_busy_machine_are_measured_again_once_it_is_idle(tmp_path, monkeypatch):
    cache = tmp_path / "crossover.json"
    key = crossover.cache_key("int4", torch.bfloat16, [(64, 64)])
    cache.write_text(json.dumps({key: {"kernel_rows": 16, "busy": True, "epoch": 0}}))
    monkeypatch.setattr(crossover, "time_both", lambda layers, dtype: ratios(None))
    monkeypatch.setattr(crossover, "sample_layers", lambda module, kind, shapes: [])
    monkeypatch.setattr("llmcli.openmp.busy_cores", lambda: 0.0)
    found, measured = crossover.crossovers({"int4": (None, [(64, 64)])}, torch.bfloat16, cache_file=cache)
    assert measured == ["int4"] and found["int4"]["kernel_rows"] == NEVER and not found["int4"]["busy"]
    found, measured = crossover.crossovers({"int4": (None, [(64, 64)])}, torch.bfloat16, cache_file=cache)
    assert measured == [] and found["int4"]["kernel_rows"] == NEVER


@kernels
def test_a_run_measures_once_and_says_so(tmp_path, monkeypatch):
    """A bfloat16 load with the default mode measures the bf16 kernel's crossover on this CPU and notes it; the next
    load takes the cached figure silently."""
    if not bf16_kernel.available()[0]:
        pytest.skip("no build of the bfloat16 kernel runs here")
    from llmcli.demo import ensure_demo
    from llmcli.loader import load_model

    monkeypatch.setattr(crossover, "LADDER", (16, 48))
    monkeypatch.setattr(crossover, "cache_home", lambda: tmp_path)  # the kernels' home stays: no second build
    # an idle machine at both loads: a figure measured busy is measured again once the machine is idle, which
    # other work on a shared machine could otherwise trigger between the two loads
    monkeypatch.setattr("llmcli.openmp.busy_cores", lambda: 0.0)
    path = ensure_demo("demo-qwen")
    first = load_model("demo", path, device="cpu", dtype="bfloat16", crossover="measured")
    assert any("many-row products" in note and "bf16: the kernel" in note for note in first.notes), first.notes
    assert "bf16" in crossover.current(first.runner.model)
    second = load_model("demo", path, device="cpu", dtype="bfloat16", crossover="measured")
    assert not any("many-row products" in note for note in second.notes) and (tmp_path / crossover.CACHE_NAME).exists()
    assert crossover.current(second.runner.model) == crossover.current(first.runner.model)
