"""`trace --html` at DeepSeek-V3's shape: size of the report and the time a headless Chromium takes to open it.

Builds a 60-layer model with 256 routed experts (8 per token, 8 groups, 4 kept, 3 dense layers first) at
tiny width with random weights, traces N prompt tokens + 2 decode steps with every option on (logit lens
top 5, attention statistics), writes the report and opens it in Chromium (tests/headless.py) R times:
the time from navigation to the load event (scripts have run and drawn every heatmap) and the script's
own drawing time.

    python benchmarks/trace_report.py [--tokens 48] [--repeats 3] [--out /tmp/trace-60x256.html]
                                      [--save-json FILE | --from-json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from llmcli.config import config_from_dict
from llmcli.models.deepseek import DeepseekForCausalLM
from llmcli.trace import build_trace_json, run_trace
from llmcli.trace_html import trace_html
from tests.headless import Browser, find_browser

WIDE_MOE = {
    "model_type": "deepseek_v3", "vocab_size": 512, "hidden_size": 32, "intermediate_size": 48,
    "moe_intermediate_size": 8, "num_hidden_layers": 60, "num_attention_heads": 4, "num_key_value_heads": 4,
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
    "first_k_dense_replace": 3, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
    "max_position_embeddings": 4096, "rope_theta": 10000, "rms_norm_eps": 1e-6,
}


def wide_moe_model(seed: int = 0) -> DeepseekForCausalLM:
    """Random weights, norms at one; built on the meta device (46,000 linears' default init is slow)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = DeepseekForCausalLM(config_from_dict(WIDE_MOE)).eval()
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0, 0.1 if "e_score_correction_bias" in name else 0.2)
    model.init_buffers()
    return model


def cpu_seconds(root: int) -> float:
    """User + system CPU time of a process and all its descendants (Linux /proc): the browser's work,
    which unlike wall time does not grow with other load on the machine."""
    ticks, parents = 0, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    family, grew = {root}, True
    while grew:
        new = {pid for pid, (ppid, _) in parents.items() if ppid in family} - family
        family |= new
        grew = bool(new)
    ticks = sum(parents[pid][1] for pid in family if pid in parents)
    return ticks / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="/tmp/trace-60x256.html")
    parser.add_argument("--save-json", help="also write the trace JSON here")
    parser.add_argument("--from-json", help="build the report from this saved trace instead of tracing again")
    args = parser.parse_args()
    t0 = time.perf_counter()
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
    else:
        model = wide_moe_model()
        print(f"model built in {time.perf_counter() - t0:.1f} s", flush=True)
        ids = torch.randint(0, WIDE_MOE["vocab_size"], (args.tokens,), generator=torch.Generator().manual_seed(1))
        torch.set_num_threads(1)  # thousands of tiny expert products
        t0 = time.perf_counter()
        run = run_trace(model, ids.tolist(), generate=2, logit_lens=5, attention_stats=True)
        data = build_trace_json(run, model, None, "wide-moe-60x256", {"prompt": f"{args.tokens} random tokens"})
    t1 = time.perf_counter()
    if args.save_json:
        Path(args.save_json).write_text(json.dumps(data), encoding="utf-8")
    page = trace_html(data)
    t2 = time.perf_counter()
    Path(args.out).write_text(page, encoding="utf-8")
    size = len(page.encode())
    print(f"trace + JSON {t1 - t0:.2f} s, HTML built in {(t2 - t1) * 1e3:.0f} ms: {args.out}, "
          f"{size / 1e6:.2f} MB ({args.tokens + 2} tokens, 60 layers, 256 experts)")
    executable = find_browser()
    if executable is None:
        print("no Chromium found: open time not measured")
        return
    opens, draws, cpus = [], [], []
    for _ in range(args.repeats):
        with Browser(executable) as browser:  # a fresh browser each time: nothing cached
            before = cpu_seconds(browser.proc.pid)
            opens.append(browser.open(Path(args.out).resolve().as_uri()))
            cpus.append(cpu_seconds(browser.proc.pid) - before)
            draws.append(float(browser.evaluate("document.body.dataset.renderedMs")))
            errors = browser.errors()
    print(f"Chromium headless: load event after {min(opens):.2f} s (best of {args.repeats}; "
          f"all {', '.join(f'{t:.2f}' for t in opens)}), heatmaps drawn in {min(draws):.0f} ms, browser CPU time "
          f"for the open {min(cpus):.2f} s; console errors: {len(errors)}")


if __name__ == "__main__":
    main()
