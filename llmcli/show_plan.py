"""`llmcli show MODEL --experts-from FILE.json [--plan-memory SIZE]`: the expert plan (llmcli.expert_plan)
from a saved `trace --corpus --json` result, checked against the model it is meant for.

The counts and the size of one expert come from the trace (the precision it ran at), so the plan is the one
`trace --plan-memory` printed; the model's config must have the same routed experts in the same layers."""

from __future__ import annotations

import json
from pathlib import Path

from llmcli import expert_plan
from llmcli.errors import LlmcliError


def read_trace(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LlmcliError(f"--experts-from: no such file: {path}", exit_code=2) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LlmcliError(f"--experts-from: {path} is not a JSON file ({exc})", exit_code=2) from None
    if not isinstance(data, dict) or "routing" not in data:
        raise LlmcliError(f"--experts-from: {path} is not a `trace --corpus --json` result", exit_code=2)
    return data


def check_model(data: dict, cfg, name: str) -> None:
    routing = data["routing"]
    if not cfg.n_routed_experts:
        raise LlmcliError(f"{name} is a dense model: it has no experts to plan")
    if routing is None:
        raise LlmcliError("the trace has no routing section (it was made with a dense model)")
    moe = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    traced = [layer["index"] for layer in routing["layers"]]
    if routing["num_experts"] != cfg.n_routed_experts or traced != moe:
        raise LlmcliError(f"the trace is of another model ({routing['num_experts']} experts in layers "
                          f"{traced[:3]}...; {name} has {cfg.n_routed_experts} in {moe[:3]}...)")


def ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    out, start = [], None
    for i, e in enumerate(ids):
        if start is None:
            start = e
        if i + 1 == len(ids) or ids[i + 1] != e + 1:
            out.append(str(start) if start == e else f"{start}-{e}")
            start = None
    return ",".join(out)


def show_plan(model: str | None, experts_from: str | None, plan_memory: str | None, as_json: bool) -> None:
    from rich.console import Console

    from llmcli import hub
    from llmcli.config import load_config
    from llmcli.workload_render import plan_lines

    if experts_from is None:
        raise LlmcliError("--plan-memory needs --experts-from FILE.json (or use it with trace --corpus)",
                          exit_code=2)
    budget = expert_plan.parse_size(plan_memory) if plan_memory is not None else None
    data = read_trace(experts_from)
    resolved = hub.resolve(model, weights=False)
    if resolved.path.is_dir():  # a GGUF file has no config.json to check against
        check_model(data, load_config(resolved.path), resolved.name)
    if budget is None:
        budget = (data.get("settings") or {}).get("plan_memory")
    planned = expert_plan.plan_from_trace(data, budget)
    if as_json:
        print(json.dumps({"model": resolved.name, "trace": experts_from, **planned}, indent=2))
        return
    console = Console(highlight=False)
    routing = data["routing"]
    console.print(f"[bold]{resolved.name}[/]: expert plan from {experts_from} ({routing['tokens']} tokens, "
                  f"{routing['prompts']} prompts traced on {data.get('model')})")
    for line in plan_lines(planned["plan"], planned["curve"]):
        console.print(line)
    if planned["plan"]:
        for layer in planned["plan"]["layers"]:
            console.print(f"  layer {layer['index']}: keep {ranges(layer['resident']) or 'none'}", style="dim")
    else:
        console.print("give --plan-memory SIZE for the experts to keep resident", style="dim")
