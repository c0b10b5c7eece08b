"""Known model aliases and the facts `list` shows about them."""

from __future__ import annotations

from dataclasses import dataclass


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
    ]
    return out


ALIASES: dict[str, Alias] = {a.name: a for a in _entries()}
DEMO_MODELS = ("demo-qwen", "demo-deepseek")
