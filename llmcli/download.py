"""Fetching models from the Hugging Face Hub: which files, how big, whether they fit, and the transfer.

huggingface_hub does the transfers (cache layout, auth, Range-resumed retries, atomic
`.incomplete` -> blob renames, a lock per file so that processes fetching the same model at once
transfer each file once); llmcli picks the files, checks the disk first and shows one progress bar
for the whole model. Files land in the standard HF cache, so other tools reuse them.

huggingface_hub reads its environment (HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE) once, at import;
llmcli reads them at call time and passes them explicitly, so the cache and endpoint always follow
the current environment.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import logging
import os
import re
import shutil
import sys
import threading
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from llmcli.errors import LlmcliError
from llmcli.units import human_bytes

# What llmcli loads from a repository (top-level files only).
LOADABLE_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "qwen.tiktoken",
]
# The small files `show` needs to describe a model without its weights.
METADATA_PATTERNS = [p for p in LOADABLE_PATTERNS if p != "*.safetensors"]
# Never fetched, whatever --include says: code (llmcli never runs remote code) and pickle weights
# (unpickling can execute code; llmcli loads safetensors only).
CODE_PATTERNS = ["*.py", "*.pyc"]
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt"]
WORKERS = 4  # files transferred at once
HUB_LOGGER = logging.getLogger("huggingface_hub")


# -- environment, read at call time ----------------------------------------------------------------


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_cache_dir() -> Path:
    """The HF hub cache, resolved the way huggingface_hub does, from the current environment."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(key):
            return Path(os.path.expandvars(os.environ[key])).expanduser()
    home = os.environ.get("HF_HOME")
    if not home:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        home = os.path.join(base, "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def is_offline() -> bool:
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


# -- the HF cache on disk --------------------------------------------------------------------------


def repo_folder(repo: str, cache: Path | None = None) -> Path:
    return (cache or hub_cache_dir()) / ("models--" + repo.replace("/", "--"))


_NUMBERED_SHARD = re.compile(r"(.+)-(\d+)-of-(\d+)\.safetensors")


def snapshot_is_complete(path: Path) -> bool:
    """config.json and every weight file: all shards of the index, or at least one *.safetensors, and
    never part of a numbered set (`model-00001-of-00002`): a download that failed before the index
    arrived must not look complete."""
    if not (path / "config.json").is_file():
        return False
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        return all((path / shard).is_file() for shard in shards)
    names = {p.name for p in path.glob("*.safetensors") if p.is_file()}
    for name in names:
        numbered = _NUMBERED_SHARD.fullmatch(name)
        if numbered:
            stem, digits, total = numbered.group(1), len(numbered.group(2)), int(numbered.group(3))
            if any(f"{stem}-{i:0{digits}d}-of-{numbered.group(3)}.safetensors" not in names
                   for i in range(1, total + 1)):
                return False
    return bool(names)


def _read_ref(folder: Path, revision: str) -> str | None:
    try:
        return (folder / "refs" / revision).read_text().strip() or None
    except OSError:
        return None


def find_snapshot(repo: str, revision: str | None = None, complete: bool = True) -> Path | None:
    """A snapshot of `repo` in the HF cache: the one `revision` (default main) points to, else, when no
    revision was asked for, the newest snapshot there. With `complete`, only a snapshot with all weights."""
    folder = repo_folder(repo)
    snapshots = folder / "snapshots"
    if not snapshots.is_dir():
        return None
    ok = snapshot_is_complete if complete else (lambda p: (p / "config.json").is_file())
    commit = _read_ref(folder, revision or "main") or revision
    if commit and (snapshots / commit).is_dir():
        if ok(snapshots / commit):
            return snapshots / commit
    if revision is not None:
        return None
    candidates = [p for p in snapshots.iterdir() if p.is_dir() and ok(p)]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def write_ref(repo: str, revision: str, commit: str) -> None:
    """Point refs/<revision> at `commit` (atomically), so offline runs resolve the name."""
    if revision == commit:
        return
    ref = repo_folder(repo) / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f"{ref.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref)


def folder_bytes(folder: Path) -> int:
    """Bytes used by a cached repo: its blobs (snapshots only hold links to them)."""
    total = 0
    blobs = folder / "blobs"
    scan = blobs if blobs.is_dir() else folder
    for root, _, files in os.walk(scan):
        for name in files:
            if not name.endswith(".incomplete"):
                try:
                    total += os.lstat(os.path.join(root, name)).st_size
                except OSError:
                    pass
    return total


# -- choosing files --------------------------------------------------------------------------------


def _matches(path: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], p) for p in patterns)


def select_files(paths: list[str], include: list[str] | None = None, exclude: list[str] | None = None,
                 ) -> tuple[list[str], list[str]]:
    """(files to fetch, files never fetched). Without `include`, the loadable top-level files; code and
    pickle files are never fetched."""
    chosen, never = [], []
    for path in paths:
        if _matches(path, CODE_PATTERNS + PICKLE_PATTERNS):
            never.append(path)
        elif include:
            if _matches(path, include) and not (exclude and _matches(path, exclude)):
                chosen.append(path)
        elif "/" not in path and _matches(path, LOADABLE_PATTERNS) and not (exclude and _matches(path, exclude)):
            chosen.append(path)
    return chosen, never


def refuse_pickle_only(repo: str, paths: list[str]) -> None:
    has_safetensors = any(p.endswith(".safetensors") for p in paths)
    pickles = [p for p in paths if _matches(p, PICKLE_PATTERNS)]
    if pickles and not has_safetensors:
        raise LlmcliError(
            f"{repo} has only pickle weights ({', '.join(sorted(pickles)[:3])}); llmcli loads safetensors only, "
            "because unpickling a file can run arbitrary code. Look for a safetensors version of this model"
        )


# -- errors ----------------------------------------------------------------------------------------


class HubUnreachable(LlmcliError):
    """The Hub could not be reached (offline mode, no network, server down)."""


class AccessError(LlmcliError):
    """The Hub refused: no such repo or revision, or no access to it. Retrying will not help."""


def _token_hint() -> str:
    return "pass --token, set HF_TOKEN, or run `hf auth login`"


@contextmanager
def hub_errors(repo: str, revision: str | None = None, token: str | None = None):
    """Turn huggingface_hub / HTTP exceptions into one-line LlmcliErrors."""
    import httpx2
    from huggingface_hub import errors as hf

    try:
        yield
    except LlmcliError:
        raise
    except hf.GatedRepoError as exc:
        url = f"{hub_endpoint()}/{repo}"
        if token or _known_token():
            raise AccessError(f"{repo} is gated and your token has no access yet: accept its terms at {url}") from exc
        raise AccessError(f"{repo} is gated: accept its terms at {url}, then {_token_hint()}") from exc
    except hf.RevisionNotFoundError as exc:
        raise AccessError(f"{repo} has no revision {revision!r}") from exc
    except hf.RepositoryNotFoundError as exc:
        raise AccessError(
            f"no such model on the Hugging Face Hub: {repo} (check the name; for a private repo, {_token_hint()})"
        ) from exc
    except hf.OfflineModeIsEnabled as exc:
        raise HubUnreachable("offline mode is on (HF_HUB_OFFLINE=1)") from exc
    except hf.HFValidationError as exc:
        raise LlmcliError(f"{repo!r} is not a valid Hugging Face repo id") from exc
    except hf.RemoteEntryNotFoundError as exc:
        raise LlmcliError(f"{repo}: a file it lists is missing on the Hub ({_first_line(exc)})") from exc
    except hf.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            raise AccessError(f"{repo}: access denied (401); it may be private or gated: {_token_hint()}") from exc
        if status == 403:
            raise AccessError(f"{repo}: your token is not allowed to read this repo (403)") from exc
        if status == 404:
            raise AccessError(f"no such model on the Hugging Face Hub: {repo}") from exc
        raise LlmcliError(f"the Hub answered {status} for {repo}: {_first_line(exc)}") from exc
    except (httpx2.ConnectError, httpx2.TimeoutException, httpx2.NetworkError, hf.LocalEntryNotFoundError) as exc:
        raise HubUnreachable(f"cannot reach {hub_endpoint()} ({_first_line(exc)})") from exc
    except httpx2.HTTPError as exc:
        raise LlmcliError(f"download from {hub_endpoint()} failed: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0]


def _known_token() -> bool:
    from huggingface_hub import get_token

    try:
        return get_token() is not None
    except Exception:  # a broken token file is not our concern here
        return False


# -- the plan --------------------------------------------------------------------------------------


@dataclass
class RemoteFile:
    path: str
    size: int
    blob: str  # the cache's blob name: LFS sha256, else the git blob id
    done: bool = False  # already in this snapshot (or local dir): not asked for again
    linked: bool = False  # its content is in the cache (another revision has it): linked, not transferred


@dataclass
class DownloadPlan:
    repo: str
    revision: str  # as asked ("main" by default)
    commit: str
    files: list[RemoteFile]
    never: list[str] = field(default_factory=list)  # code and pickle files left on the Hub
    local_dir: Path | None = None
    token: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def missing(self) -> list[RemoteFile]:
        return [f for f in self.files if not f.done]

    @property
    def missing_bytes(self) -> int:
        """Bytes to transfer."""
        return sum(f.size for f in self.missing if not f.linked)

    def subset(self, patterns: list[str]) -> DownloadPlan:
        return replace(self, files=[f for f in self.files if _matches(f.path, patterns)])

    @property
    def destination(self) -> Path:
        if self.local_dir is not None:
            return self.local_dir
        return repo_folder(self.repo) / "snapshots" / self.commit


def _local_dir_has(local_dir: Path, path: str, commit: str) -> bool:
    """Whether huggingface_hub's metadata says `path` in `local_dir` is this commit's file."""
    try:
        from huggingface_hub._local_folder import read_download_metadata
    except ImportError:  # private helper: without it, let hf_hub_download decide per file
        return False
    meta = read_download_metadata(local_dir, path)
    return meta is not None and meta.commit_hash == commit and (local_dir / path).is_file()


def _mark_cached(plan: DownloadPlan) -> None:
    if plan.local_dir is not None:
        for f in plan.files:
            f.done = _local_dir_has(plan.local_dir, f.path, plan.commit)
        return
    blobs = repo_folder(plan.repo) / "blobs"
    for f in plan.files:
        target = plan.destination / f.path
        f.done = target.is_file() and target.stat().st_size == f.size
        blob = blobs / f.blob
        f.linked = not f.done and blob.is_file() and blob.stat().st_size == f.size


def plan_download(repo: str, revision: str | None = None, include: list[str] | None = None,
                  exclude: list[str] | None = None, token: str | None = None, local_dir: Path | None = None,
                  metadata_only: bool = False) -> DownloadPlan:
    """Ask the Hub for the commit and file list, choose the files and see which are already here."""
    if is_offline():
        raise HubUnreachable("offline mode is on (HF_HUB_OFFLINE=1)")
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=hub_endpoint(), token=token)
    with hub_errors(repo, revision, token):
        info = api.model_info(repo, revision=revision)
        commit = info.sha
        if not commit:
            raise LlmcliError(f"the Hub did not say which commit {repo} is at")
        tree = [f for f in api.list_repo_tree(repo, recursive=True, revision=commit) if isinstance(f, RepoFile)]
    paths = [f.path for f in tree]
    refuse_pickle_only(repo, paths)
    chosen, never = select_files(paths, METADATA_PATTERNS if metadata_only else include, exclude)
    if not chosen:
        raise LlmcliError(f"no files of {repo} match the patterns" if include else f"{repo} has no files llmcli loads")
    if not metadata_only and not include and not any(p.endswith(".safetensors") for p in chosen):
        raise LlmcliError(f"{repo} has no *.safetensors weights at its top level")
    by_path = {f.path: f for f in tree}
    plan = DownloadPlan(repo, revision or "main", commit, [], never, Path(local_dir) if local_dir else None, token)
    for path in sorted(chosen):
        f = by_path[path]
        size = f.lfs.size if f.lfs is not None else f.size
        plan.files.append(RemoteFile(path, int(size), f.lfs.sha256 if f.lfs is not None else f.blob_id))
    _mark_cached(plan)
    return plan


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_disk_space(plan: DownloadPlan) -> None:
    """Refuse, with the numbers, when the files still to fetch do not fit on the disk."""
    where = _existing_parent(plan.destination)
    free = shutil.disk_usage(where).free
    need = plan.missing_bytes
    if need > free:
        raise LlmcliError(
            f"not enough disk space for {plan.repo}: {human_bytes(need)} to download, "
            f"{human_bytes(free)} free in {where}"
        )


# -- progress --------------------------------------------------------------------------------------


class Cancelled(Exception):
    """Raised inside a transfer (from its progress callback) to stop it; the partial file is deleted."""


class Progress:
    """One bar for the whole model (bytes, speed, ETA) on stderr; plain lines when stderr is not a terminal."""

    def __init__(self, plan: DownloadPlan, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.live = not quiet and self.console.is_terminal
        self.quiet = quiet
        self.cancel = threading.Event()
        self.files_done = 0
        self.files_total = len(plan.missing)
        self.transferring: set[str] = set()  # blobs this process is writing now (it holds their locks)
        self.repo = plan.repo
        self.total = plan.missing_bytes
        self._bar = None

    def __enter__(self):
        # huggingface_hub logs each retry over two lines and warns when the disk fills before a file
        # starts: the bar shows the progress and, when a file fails, one line says why
        self._hub_log_level = HUB_LOGGER.level
        HUB_LOGGER.setLevel(logging.ERROR)
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message="Not enough free disk space")
        if self.live:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True), TransferSpeedColumn(),
                TimeRemainingColumn(), console=self.console, transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self._description(), total=self.total)
        return self

    def __exit__(self, *exc):
        HUB_LOGGER.setLevel(self._hub_log_level)
        self._warnings.__exit__(*exc)
        if self._bar is not None:
            self._bar.stop()

    def _description(self) -> str:
        return f"{self.repo} [{self.files_done}/{self.files_total} files]"

    def advance(self, n: int) -> None:
        if self.cancel.is_set():
            raise Cancelled()
        if self._bar is not None and n:
            self._bar.update(self._task, advance=n)

    def file_done(self, f: RemoteFile) -> None:
        self.files_done += 1
        if self._bar is not None:
            self._bar.update(self._task, description=self._description())
        elif not self.quiet:
            self.console.print(f"  fetched {f.path} ({human_bytes(f.size)})")

    def bar_class(self, f: RemoteFile):
        """A class that looks enough like tqdm for huggingface_hub, feeding our single bar. huggingface_hub
        makes one when the transfer of `f` starts, after it has taken the file's lock."""
        progress = self

        class FileBar:
            def __init__(self, *args, total=None, initial=0, **kwargs):
                progress.transferring.add(f.blob)
                self.total, self.n = total, 0
                if initial:
                    self.update(initial)

            def update(self, n=1):
                n = int(n or 0)
                self.n += n
                progress.advance(n)

            def update_transfer(self, n=1):  # network bytes; `update` already counts what reaches the disk
                if progress.cancel.is_set():
                    raise Cancelled()

            def set_postfix_str(self, *args, **kwargs):
                pass

            set_transfer_postfix_str = set_postfix_str
            set_description = set_postfix_str
            refresh = set_postfix_str
            close = set_postfix_str

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                pass

        return FileBar


# -- the transfer ----------------------------------------------------------------------------------


def _partial_files(plan: DownloadPlan, blobs: set[str]) -> list[Path]:
    """huggingface_hub's temporary files for these blobs (named `<etag>.<random>.incomplete`, the etag
    being the blob's name): another process may be writing other blobs of the same model."""
    if plan.local_dir is not None:
        found = (plan.local_dir / ".cache" / "huggingface").glob("**/*.incomplete")
    else:
        found = (repo_folder(plan.repo) / "blobs").glob("*.incomplete")
    return [p for p in found if any(f".{blob}." in f".{p.name}" for blob in blobs)]


def _failure_reason(error: BaseException, plan: DownloadPlan) -> str:
    if isinstance(error, LlmcliError):
        return str(error)
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        where = _existing_parent(plan.destination)
        return f"the disk is full ({human_bytes(shutil.disk_usage(where).free)} free in {where}): free some space"
    if isinstance(error, OSError) and error.errno == errno.EFBIG:
        return "a file is larger than the file system or a file-size limit (`ulimit -f`) allows"
    return f"{type(error).__name__}: {_first_line(error)}"


def fetch(plan: DownloadPlan, quiet: bool = False, workers: int = WORKERS) -> Path:
    """Download the plan's missing files; returns the model directory. A failed or interrupted run
    leaves the completed files in place (a re-run skips them) and no partial file behind. Safe with other
    processes fetching the same model: huggingface_hub locks each file, and llmcli removes only its own."""
    from huggingface_hub import hf_hub_download

    # Small files (config, index, tokenizer) first: a run that fails on a shard still leaves the index
    # that says which shards are missing.
    todo = sorted(plan.missing, key=lambda f: f.path.endswith(".safetensors"))
    if not todo:
        if plan.local_dir is None:
            write_ref(plan.repo, plan.revision, plan.commit)
        return plan.destination
    queue = list(reversed(todo))
    results: list[tuple[RemoteFile, BaseException | None]] = []
    lock = threading.Lock()
    with Progress(plan, quiet) as progress:
        def worker() -> None:
            while not progress.cancel.is_set():
                with lock:
                    if not queue or any(err for _, err in results):  # after a failure, start nothing new
                        return
                    f = queue.pop()
                error = None
                try:
                    with hub_errors(plan.repo, plan.revision, plan.token):
                        hf_hub_download(
                            plan.repo, f.path, revision=plan.commit, endpoint=hub_endpoint(), token=plan.token,
                            cache_dir=None if plan.local_dir else str(hub_cache_dir()),
                            local_dir=str(plan.local_dir) if plan.local_dir else None,
                            tqdm_class=progress.bar_class(f),
                        )
                except BaseException as exc:  # handed to the main thread
                    error = exc
                with lock:
                    progress.transferring.discard(f.blob)
                    results.append((f, error))

        # Daemon threads: Ctrl-C must not wait for a transfer in the middle of a read to notice.
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, min(workers, len(todo))))]
        reported = 0
        try:
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads) or reported < len(results):
                for t in threads:
                    t.join(0.1)
                with lock:
                    new, reported = results[reported:], len(results)
                for f, err in new:
                    if err is None:
                        progress.file_done(f)
        except KeyboardInterrupt:
            progress.cancel.set()  # transfers stop at their next chunk; hf deletes their temporary files
            for t in threads:
                t.join(1.0)
            with lock:  # threads still inside a read: remove their files
                unfinished = set(progress.transferring)
            for partial in _partial_files(plan, unfinished):
                partial.unlink(missing_ok=True)
            done = len(plan.files) - len(todo) + sum(err is None for _, err in results)
            print(f"interrupted: {done} of {len(plan.files)} files are complete; run the same command "
                  "again to fetch the rest", file=sys.stderr)
            raise
    errors = [err for _, err in results if err is not None]
    if errors:
        done = len(plan.files) - len(todo) + sum(err is None for _, err in results)
        error = errors[0]
        if isinstance(error, AccessError):
            raise error
        raise LlmcliError(f"download of {plan.repo} failed ({done} of {len(plan.files)} files complete; "
                          f"run the same command again to resume): {_failure_reason(error, plan)}")
    if plan.local_dir is None:
        write_ref(plan.repo, plan.revision, plan.commit)
    return plan.destination
