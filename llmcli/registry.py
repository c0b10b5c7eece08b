"""Known model aliases and the facts `list` shows about them."""

from __future__ import annotations

from dataclasses import dataclass

from llmcli import bundled


@dataclass(frozen=True)
class Alias:
    name: str
    repo: str  # Hugging Face repo id; "" for built-in demo models
    family: str
    params_b: float  # total parameters, billions
    note: str = ""


def _entries() -> list[Alias]:
    out = [
        Alias("demo-qwen", "", "qwen2", 0.0, "built-in tiny random Qwen2 (no download)"),
        Alias("demo-deepseek", "", "deepseek_v3", 0.0, "built-in tiny random DeepSeek-V3 (no download)"),
        Alias(bundled.ALIAS, "", "llama", 0.135, f"SmolLM2-135M-Instruct Q4_1 GGUF, offline ({bundled.INSTALL})"),
    ]
    for size, params in (("1.8b", 1.8), ("7b", 7.7), ("14b", 14.2)):
        up = size.upper()
        out.append(Alias(f"qwen-{size}", f"Qwen/Qwen-{up}-Chat", "qwen", params, "original Qwen chat"))
        out.append(Alias(f"qwen-{size}-base", f"Qwen/Qwen-{up}", "qwen", params, "original Qwen base"))
    for size, params in (("0.5b", 0.49), ("1.5b", 1.54), ("3b", 3.09), ("7b", 7.62), ("14b", 14.8),
                         ("32b", 32.8), ("72b", 72.7)):
        out.append(Alias(f"qwen2.5-{size}-instruct", f"Qwen/Qwen2.5-{size.upper()}-Instruct", "qwen2", params))
    for size, params in (("0.6b", 0.6), ("1.7b", 1.7), ("4b", 4.0), ("8b", 8.2), ("14b", 14.8), ("32b", 32.8)):
        out.append(Alias(f"qwen3-{size}", f"Qwen/Qwen3-{size.upper()}", "qwen3", params, "reasoning (think/no-think)"))
    out += _qwen_moe_entries()
    for size, params in (("1.5b", 1.78), ("7b", 7.62), ("14b", 14.8), ("32b", 32.8)):
        out.append(Alias(f"deepseek-r1-distill-qwen-{size}", f"deepseek-ai/DeepSeek-R1-Distill-Qwen-{size.upper()}",
                         "qwen2", params, "reasoning"))
    out += [
        Alias("deepseek-v2-lite", "deepseek-ai/DeepSeek-V2-Lite", "deepseek_v2", 15.7, "MoE, 2.4B active"),
        Alias("deepseek-v2-lite-chat", "deepseek-ai/DeepSeek-V2-Lite-Chat", "deepseek_v2", 15.7, "MoE, 2.4B active"),
        Alias("deepseek-v3", "deepseek-ai/DeepSeek-V3", "deepseek_v3", 671.0, "671B MoE, FP8: about 700 GB"),
        Alias("deepseek-r1", "deepseek-ai/DeepSeek-R1", "deepseek_v3", 671.0, "671B MoE, FP8: about 700 GB"),
        Alias("deepseek-v3.2-exp", "deepseek-ai/DeepSeek-V3.2-Exp", "deepseek_v32", 671.0,
              "V3 + sparse attention (DSA), FP8: about 690 GB"),
        Alias("deepseek-v3.2", "deepseek-ai/DeepSeek-V3.2", "deepseek_v32", 671.0,
              "V3 + sparse attention (DSA), FP8: about 690 GB"),
        Alias("deepseek-v3.2-speciale", "deepseek-ai/DeepSeek-V3.2-Speciale", "deepseek_v32", 671.0,
              "V3.2 variant for deep reasoning, FP8: about 690 GB"),
        Alias("deepseek-v4-flash", "deepseek-ai/DeepSeek-V4-Flash", "deepseek_v4", 284.3,
              "compressed attention (CSA/HCA), 13.3B active, FP8 + FP4 experts"),
    ]
    out += _hybrid_entries()
    return out


def _hybrid_entries() -> list[Alias]:
    """Gated DeltaNet hybrids (names and sizes from the Qwen model cards; Qwen3.5 counts include the vision tower)."""
    out = [Alias(f"qwen3-next-80b-a3b-{kind.lower()}", f"Qwen/Qwen3-Next-80B-A3B-{kind}", "qwen3_next", 80.0,
                 f"hybrid MoE, 3B active{note}") for kind, note in (("Instruct", ""), ("Thinking", ", reasoning"))]
    for size, params in (("0.8b", 0.9), ("2b", 2.0), ("4b", 5.0), ("9b", 10.0), ("27b", 28.0)):
        out.append(Alias(f"qwen3.5-{size}", f"Qwen/Qwen3.5-{size.upper()}", "qwen3_5", params,
                         "hybrid DeltaNet, reasoning (think/no-think)"))
    for size, params, active in (("35b-a3b", 35.0, 3), ("122b-a10b", 122.0, 10), ("397b-a17b", 397.0, 17)):
        out.append(Alias(f"qwen3.5-{size}", f"Qwen/Qwen3.5-{size.upper()}", "qwen3_5_moe", params,
                         f"hybrid MoE, {active}B active"))
    return out


def _qwen_moe_entries() -> list[Alias]:
    """Qwen's MoE releases and Qwen3's FP8 releases (128x128 block scales, dequantised at load)."""
    out = [
        Alias("qwen1.5-moe-a2.7b", "Qwen/Qwen1.5-MoE-A2.7B", "qwen2_moe", 14.3, "MoE base, 2.7B active"),
        Alias("qwen1.5-moe-a2.7b-chat", "Qwen/Qwen1.5-MoE-A2.7B-Chat", "qwen2_moe", 14.3, "MoE chat, 2.7B active"),
        Alias("qwen2-57b-a14b", "Qwen/Qwen2-57B-A14B", "qwen2_moe", 57.4, "MoE base, 14B active"),
        Alias("qwen2-57b-a14b-instruct", "Qwen/Qwen2-57B-A14B-Instruct", "qwen2_moe", 57.4, "MoE, 14B active"),
    ]
    for name, repo, params, note in (
        ("qwen3-30b-a3b", "Qwen3-30B-A3B", 30.5, "MoE, 3.3B active, reasoning (think/no-think)"),
        ("qwen3-30b-a3b-instruct-2507", "Qwen3-30B-A3B-Instruct-2507", 30.5, "MoE, 3.3B active"),
        ("qwen3-30b-a3b-thinking-2507", "Qwen3-30B-A3B-Thinking-2507", 30.5, "MoE, 3.3B active, reasoning"),
        ("qwen3-coder-30b-a3b-instruct", "Qwen3-Coder-30B-A3B-Instruct", 30.5, "MoE, 3.3B active, code"),
        ("qwen3-235b-a22b", "Qwen3-235B-A22B", 235.0, "MoE, 22B active, reasoning (think/no-think)"),
        ("qwen3-235b-a22b-instruct-2507", "Qwen3-235B-A22B-Instruct-2507", 235.0, "MoE, 22B active"),
    ):
        out.append(Alias(name, f"Qwen/{repo}", "qwen3_moe", params, note))
    for name in ("qwen3-30b-a3b", "qwen3-235b-a22b", "qwen3-30b-a3b-instruct-2507"):
        base = next(a for a in out if a.name == name)
        out.append(Alias(f"{name}-fp8", f"{base.repo}-FP8", "qwen3_moe", base.params_b, f"{base.note}; FP8"))
    for size, params in (("0.6b", 0.6), ("1.7b", 1.7), ("4b", 4.0), ("8b", 8.2), ("14b", 14.8), ("32b", 32.8)):
        out.append(Alias(f"qwen3-{size}-fp8", f"Qwen/Qwen3-{size.upper()}-FP8", "qwen3", params,
                         "reasoning (think/no-think); FP8"))
    return out


ALIASES: dict[str, Alias] = {a.name: a for a in _entries()}
DEMO_MODELS = ("demo-qwen", "demo-deepseek")
