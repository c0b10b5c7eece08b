"""download / list / model resolution against a hub-like server on 127.0.0.1.

Downloads run `llmcli` in a subprocess with a clean environment: huggingface_hub reads HF_ENDPOINT,
HF_HOME and HF_HUB_OFFLINE once at import, so the real client is pointed at the test server before it
is imported. Everything the client asks for is recorded by the server.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmcli import download as dl
from llmcli import hub
from tests.conftest import write_byte_tokenizer
from tests.hubserver import FakeHub

ROOT = Path(__file__).resolve().parent.parent
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
MiB = 2**20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict[str, bytes]:
    """A tiny Qwen2 saved by transformers in two safetensors shards, both above huggingface_hub's
    10 MiB read chunk (a dropped transfer resumes only once a chunk has arrived)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=512, hidden_size=256, intermediate_size=2048, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=False)
    directory = tmp_path_factory.mktemp("tiny-sharded")
    Qwen2ForCausalLM(cfg).save_pretrained(directory, max_shard_size="16MB")
    write_byte_tokenizer(directory, 512)
    files = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    assert {SHARD1, SHARD2} <= set(files) and min(len(files[SHARD1]), len(files[SHARD2])) > 11 * MiB
    return files


@pytest.fixture(scope="module")
def fake_hub(checkpoint):
    server = FakeHub().start()
    extras = {"modeling_tiny.py": b"import os\n", "README.md": b"# tiny\n", "extra/notes.txt": b"notes\n"}
    server.add_commit("org/tiny", {**checkpoint, **extras})
    v1_config = json.loads(checkpoint["config.json"])
    v1_config["max_position_embeddings"] = 512
    server.add_commit("org/tiny", {**checkpoint, "config.json": json.dumps(v1_config).encode()}, revision="v1")
    server.add_commit("org/gated", {"config.json": checkpoint["config.json"], SHARD1: checkpoint[SHARD1][:1000]},
                      gated=True)
    server.add_commit("org/pickled", {"config.json": checkpoint["config.json"], "pytorch_model.bin": b"x" * 100})
    yield server
    server.stop()


@pytest.fixture
def hf(fake_hub, tmp_path, monkeypatch):
    """A fresh HF cache; the hub's faults and request log reset."""
    fake_hub.requests.clear()
    fake_hub.drop_once.clear()
    fake_hub.fail.clear()
    fake_hub.fail_resumes.clear()
    fake_hub.slow.clear()
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    return home


def cli_env(hub_url: str, hf_home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=hub_url, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONPATH=str(ROOT), **extra)
    return env


def run_llmcli(hub_url: str, hf_home: Path, *args: str, preamble: str = "", **env) -> subprocess.CompletedProcess:
    """`llmcli ARGS` in a fresh interpreter; `preamble` is Python run first (e.g. to fake the free space)."""
    code = f"import sys\n{preamble}\nfrom llmcli.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], env=cli_env(hub_url, hf_home, **env),
                          capture_output=True, text=True, timeout=120)


def snapshot(hf_home: Path, repo: str, commit: str) -> Path:
    return hf_home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / commit


def test_full_download_fetches_what_llmcli_loads(fake_hub, hf, checkpoint, run_cli, monkeypatch):
    commit = fake_hub.repos["org/tiny"].refs["main"]
    r = run_llmcli(fake_hub.url, hf, "download", "org/tiny")
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path == snapshot(hf, "org/tiny", commit)
    assert sorted(p.name for p in path.iterdir()) == sorted(checkpoint)  # no README, .py or subfolder files
    for name, data in checkpoint.items():
        assert (path / name).read_bytes() == data, name
    assert (hf / "hub" / "models--org--tiny" / "refs" / "main").read_text() == commit
    assert not any(r.path.endswith(".py") for r in fake_hub.requests)
    assert "modeling_tiny.py" in r.stderr  # reported as not fetched

    # Again: every file is here, nothing is requested.
    fake_hub.requests.clear()
    r = run_llmcli(fake_hub.url, hf, "download", "org/tiny")
    assert r.returncode == 0, r.stderr
    assert not [q for q in fake_hub.requests if "/resolve/" in q.path]

    # Offline, the cached model resolves by name and runs.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve("org/tiny").path == path
    code, out, err = run_cli("generate", "org/tiny", "-p", "hi", "-n", "2", "--raw", "--json")
    assert code == 0, err
    assert json.loads(out)["generated_tokens"] == 2


def test_include_exclude_and_never_code(fake_hub, hf):
    r = run_llmcli(fake_hub.url, hf, "download", "org/tiny", "--include", "*.json", "--exclude", "tokenizer*")
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip().splitlines()[-1])
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors.index.json"]
    fake_hub.requests.clear()
    r = run_llmcli(fake_hub.url, hf, "download", "org/tiny", "--include", "*", "--exclude", "*.safetensors")
    assert r.returncode == 0, r.stderr
    assert (path / "README.md").is_file() and (path / "extra" / "notes.txt").is_file()
    assert not (path / "modeling_tiny.py").exists()
    assert not any(q.path.endswith(".py") for q in fake_hub.requests)
    assert not fake_hub.file_requests(SHARD1)


def test_revision_reuses_cached_files(fake_hub, hf, checkpoint):
    assert run_llmcli(fake_hub.url, hf, "download", "org/tiny").returncode == 0
    fake_hub.requests.clear()
    commit = fake_hub.repos["org/tiny"].refs["v1"]
    r = run_llmcli(fake_hub.url, hf, "download", "org/tiny", "--revision", "v1")
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path == snapshot(hf, "org/tiny", commit) == hub.cached_snapshot("org/tiny", "v1")
    assert json.loads((path / "config.json").read_text())["max_position_embeddings"] == 512
    assert (hf / "hub" / "models--org--tiny" / "refs" / "v1").read_text() == commit
    # The shards are the same blobs as main's: linked into the v1 snapshot, not transferred again.
    assert not fake_hub.file_requests(SHARD1, "GET") and not fake_hub.file_requests(SHARD2, "GET")
    assert (path / SHARD1).read_bytes() == checkpoint[SHARD1]
    assert hub.cached_snapshot("org/tiny") != path  # main still resolves to main
    r = run_llmcli(fake_hub.url, hf, "download", "org/tiny", "--revision", "nope")
    assert r.returncode == 1 and "no revision 'nope'" in r.stderr


def test_dropped_transfer_resumes_with_range(fake_hub, hf, checkpoint):
    fake_hub.drop_once[SHARD1] = 0.9
    r = run_llmcli(fake_hub.url, hf, "download", "org/tiny")
    assert r.returncode == 0, r.stderr
    gets = fake_hub.file_requests(SHARD1, "GET")
    assert [g.range for g in gets][0] is None and len(gets) == 2
    assert gets[1].range is not None and gets[1].range.startswith("bytes=")
    assert int(gets[1].range.removeprefix("bytes=").split("-")[0]) >= 10 * MiB
    path = Path(r.stdout.strip().splitlines()[-1])
    assert (path / SHARD1).read_bytes() == checkpoint[SHARD1]


def test_failed_shard_then_rerun_skips_completed_files(fake_hub, hf, checkpoint):
    fake_hub.fail[SHARD2] = 500
    r = run_llmcli(fake_hub.url, hf, "download", "org/tiny")
    assert r.returncode == 1
    assert "run the same command again" in r.stderr and "Traceback" not in r.stderr
    blobs = hf / "hub" / "models--org--tiny" / "blobs"
    assert not list(blobs.glob("*.incomplete"))
    assert hub.cached_snapshot("org/tiny") is None  # incomplete: not resolvable

    fake_hub.fail.clear()
    fake_hub.requests.clear()
    r = run_llmcli(fake_hub.url, hf, "download", "org/tiny")
    assert r.returncode == 0, r.stderr
    assert fake_hub.file_requests(SHARD1) == []  # done in the first run: not asked for again
    assert fake_hub.file_requests(SHARD2, "GET")
    path = Path(r.stdout.strip().splitlines()[-1])
    assert (path / SHARD2).read_bytes() == checkpoint[SHARD2]
    assert hub.cached_snapshot("org/tiny") == path


def test_ctrl_c_exits_130_without_partial_files(fake_hub, hf, checkpoint):
    fake_hub.slow[SHARD1] = fake_hub.slow[SHARD2] = 0.005
    proc = start_llmcli(fake_hub.url, hf, "download", "org/tiny")
    deadline = time.time() + 60
    while not fake_hub.file_requests(SHARD1, "GET") and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # mid-transfer
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "run the same command again" in err
    blobs = hf / "hub" / "models--org--tiny" / "blobs"
    assert not list(blobs.glob("*.incomplete"))
    commit = fake_hub.repos["org/tiny"].refs["main"]
    assert not (snapshot(hf, "org/tiny", commit) / SHARD1).exists()
    for blob in blobs.iterdir():  # whatever finished is whole
        assert blob.read_bytes() in checkpoint.values()


def test_a_transfer_cut_midway_fails_in_one_line_and_the_next_run_completes(fake_hub, hf, checkpoint):
    """The server drops the connection midway through a shard and refuses the resumed request: the run
    fails with one line, leaves no partial file, and the next run fetches only what is missing."""
    fake_hub.drop_once[SHARD1] = 0.9  # past huggingface_hub's first 10 MiB read: the retry asks for a Range
    fake_hub.fail_resumes[SHARD1] = 503
    r = run_llmcli(fake_hub.url, hf, "download", "org/tiny")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: download of org/tiny failed"), r.stderr
    assert "503" in r.stderr and "run the same command again" in r.stderr
    assert_one_error_line(r.stderr)
    gets = fake_hub.file_requests(SHARD1, "GET")
    assert [g.range is not None for g in gets] == [False, True]  # cut, then the resume refused
    blobs = hf / "hub" / "models--org--tiny" / "blobs"
    assert not list(blobs.glob("*.incomplete"))  # huggingface_hub removes its partial file
    assert all(blob.read_bytes() in checkpoint.values() for blob in blobs.iterdir())

    fake_hub.drop_once.clear()
    fake_hub.fail_resumes.clear()
    fake_hub.requests.clear()
    r = run_llmcli(fake_hub.url, hf, "download", "org/tiny")
    assert r.returncode == 0, r.stderr
    assert not fake_hub.file_requests("config.json", "GET")  # completed in the first run
    assert [g.range for g in fake_hub.file_requests(SHARD1, "GET")] == [None]  # no partial file was kept
    path = Path(r.stdout.strip().splitlines()[-1])
    for name, data in checkpoint.items():
        assert (path / name).read_bytes() == data, name


def as_from_a_terminal() -> None:
    """In a child before it runs: Ctrl-C acts as in a terminal. A shell without job control starts a background job
    with SIGINT ignored, which children inherit (pytest started with `&` from a script): Python then never raises
    KeyboardInterrupt, and an interrupted download ran to its end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_llmcli(hub_url: str, hf_home: Path, *args: str) -> subprocess.Popen:
    code = "import sys\nfrom llmcli.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *args], env=cli_env(hub_url, hf_home),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=as_from_a_terminal)


def test_two_processes_download_the_same_model_at_once(fake_hub, hf, checkpoint):
    """huggingface_hub's per-file locks: both finish with the whole model, each file crosses the network once."""
    fake_hub.slow[SHARD1] = fake_hub.slow[SHARD2] = 0.0005  # both processes are mid-transfer together
    procs = [start_llmcli(fake_hub.url, hf, "download", "org/tiny") for _ in range(2)]
    results = [(*p.communicate(timeout=120), p.returncode) for p in procs]
    for _, err, code in results:
        assert code == 0, err
    paths = {Path(out.strip().splitlines()[-1]) for out, _, _ in results}
    assert len(paths) == 1
    path = paths.pop()
    for name, data in checkpoint.items():
        assert (path / name).read_bytes() == data, name
        assert len(fake_hub.file_requests(name, "GET")) == 1, name
    assert not list((hf / "hub" / "models--org--tiny" / "blobs").glob("*.incomplete"))


def test_ctrl_c_in_one_download_leaves_another_one_alone(fake_hub, hf, checkpoint):
    """Interrupted, a download removes its own partial files only: another process fetching the same model
    (here: the second shard, which the interrupted one never asked for) carries on."""
    fake_hub.slow[SHARD1] = fake_hub.slow[SHARD2] = 0.005
    whole = start_llmcli(fake_hub.url, hf, "download", "org/tiny")
    first_shard = start_llmcli(fake_hub.url, hf, "download", "org/tiny", "--include", SHARD1)
    deadline = time.time() + 60
    while not (fake_hub.file_requests(SHARD1, "GET") and fake_hub.file_requests(SHARD2, "GET")):
        assert time.time() < deadline, "the transfers did not start"
        time.sleep(0.05)
    time.sleep(0.5)  # both shards mid-transfer
    first_shard.send_signal(signal.SIGINT)
    _, err = first_shard.communicate(timeout=30)
    assert first_shard.returncode == 130, err
    fake_hub.slow.clear()  # the transfers still running speed up
    out, err = whole.communicate(timeout=120)
    assert whole.returncode == 0, err
    path = Path(out.strip().splitlines()[-1])
    for name, data in checkpoint.items():
        assert (path / name).read_bytes() == data, name
    assert not list((hf / "hub" / "models--org--tiny" / "blobs").glob("*.incomplete"))


FILE_SIZE_LIMIT = """import resource
resource.setrlimit(resource.RLIMIT_FSIZE, (4 * 2**20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))"""


def test_a_write_refused_midway_fails_in_one_line_and_the_next_run_completes(fake_hub, hf, checkpoint):
    """A file-size limit (`ulimit -f`, 4 MiB) stops both shards midway, as a full disk would, everywhere
    (the tmpfs test below needs user namespaces)."""
    r = run_llmcli(fake_hub.url, hf, "download", "org/tiny", preamble=FILE_SIZE_LIMIT)
    assert r.returncode == 1
    assert "file-size limit" in r.stderr and "run the same command again" in r.stderr
    blobs = hf / "hub" / "models--org--tiny" / "blobs"
    assert_failed_midway(fake_hub, r, blobs, checkpoint)
    r = run_llmcli(fake_hub.url, hf, "download", "org/tiny")
    assert r.returncode == 0, r.stderr
    assert_resumed(fake_hub, Path(r.stdout.strip().splitlines()[-1]), checkpoint)


FILL_THE_DISK = """import os, threading, time
from pathlib import Path

def fill_the_disk_once_the_shard_starts(blob):
    blobs = Path(os.environ["HF_HOME"]) / "hub" / "models--org--tiny" / "blobs"
    while not list(blobs.glob(blob + ".*.incomplete")):
        time.sleep(0.002)
    with open(Path(os.environ["HF_HOME"]) / "filler", "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(bytes(2**20))
        except OSError:
            pass

threading.Thread(target=fill_the_disk_once_the_shard_starts, args=({blob!r},), daemon=True).start()"""

# In a user and mount namespace of its own, HF_HOME becomes a 40 MiB tmpfs: the model (28 MiB) fits, so
# llmcli's check lets the download start; then something else fills the disk. The second run, after the
# filler is removed, is in the same namespace (the tmpfs goes with it).
DISK_FULL_SCRIPT = """mount -t tmpfs -o size=40m tmpfs "$HF_HOME" || exit 77
"$PYTHON" -c "$FIRST" download org/tiny >"$OUT/1.out" 2>"$OUT/1.err"; echo $? >"$OUT/1.rc"
cp -r "$HF_HOME/hub/models--org--tiny/blobs" "$OUT/blobs"
rm "$HF_HOME/filler"
"$PYTHON" -c "$SECOND" download org/tiny >"$OUT/2.out" 2>"$OUT/2.err"; echo $? >"$OUT/2.rc"
cp -rL "$(tail -n 1 "$OUT/2.out")" "$OUT/snapshot"
"""


def test_a_disk_that_fills_midway_fails_in_one_line_and_the_next_run_completes(fake_hub, hf, checkpoint,
                                                                                 tmp_path):
    if not shutil.which("unshare") or subprocess.run(
            ["unshare", "-rm", "mount", "-t", "tmpfs", "tmpfs", str(tmp_path)], capture_output=True).returncode:
        pytest.skip("no user namespaces here to mount a small tmpfs in")
    fake_hub.slow[SHARD1] = fake_hub.slow[SHARD2] = 0.0005  # the filler wins the race to the disk
    main = "import sys\n{}\nfrom llmcli.cli import main\nsys.exit(main(sys.argv[1:]))"
    out = tmp_path / "out"
    out.mkdir()
    hf.mkdir()
    env = cli_env(fake_hub.url, hf, PYTHON=sys.executable, OUT=str(out), SECOND=main.format(""),
                  FIRST=main.format(FILL_THE_DISK.format(blob=hashlib.sha256(checkpoint[SHARD1]).hexdigest())))
    done = subprocess.run(["unshare", "-rm", "sh", "-c", DISK_FULL_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    first = subprocess.CompletedProcess([], int((out / "1.rc").read_text()), (out / "1.out").read_text(),
                                        (out / "1.err").read_text())
    assert first.returncode == 1
    assert "the disk is full" in first.stderr and "run the same command again" in first.stderr
    assert_failed_midway(fake_hub, first, out / "blobs", checkpoint)
    assert (out / "2.rc").read_text().strip() == "0", (out / "2.err").read_text()
    assert_resumed(fake_hub, out / "snapshot", checkpoint)


def assert_failed_midway(fake_hub, first, blobs: Path, checkpoint) -> None:
    """After the failed run: one error line; what huggingface_hub kept is whole (it removes partial files)."""
    assert_one_error_line(first.stderr)
    assert fake_hub.file_requests(SHARD1, "GET")  # it failed during the transfer, not before
    assert not list(blobs.glob("*.incomplete"))
    kept = [blob.read_bytes() for blob in blobs.iterdir()]
    assert kept and all(data in checkpoint.values() for data in kept)
    assert checkpoint[SHARD1] not in kept


def assert_resumed(fake_hub, path: Path, checkpoint) -> None:
    """The second run fetched what was missing (the failed shard again from its start: huggingface_hub
    does not keep partial files) and not the files the first run completed."""
    for name, data in checkpoint.items():
        assert (path / name).read_bytes() == data, name
    assert len(fake_hub.file_requests("config.json", "GET")) == 1
    assert [g.range for g in fake_hub.file_requests(SHARD1, "GET")][-1] is None


def assert_one_error_line(stderr: str) -> None:
    """The failure is said in one line: no traceback, no library log lines around it."""
    assert "Traceback" not in stderr and "Warning" not in stderr, stderr
    assert sum(line.startswith("error:") for line in stderr.splitlines()) == 1, stderr
    assert not [line for line in stderr.splitlines() if "Error while downloading" in line], stderr


def test_gated_repo_asks_for_a_token(fake_hub, hf):
    r = run_llmcli(fake_hub.url, hf, "download", "org/gated")
    assert r.returncode == 1
    assert "gated" in r.stderr and "--token" in r.stderr and "HF_TOKEN" in r.stderr
    assert r.stderr.count("\n") <= 3 and "Traceback" not in r.stderr
    fake_hub.requests.clear()
    r = run_llmcli(fake_hub.url, hf, "download", "org/gated", "--token", "hf_test")
    assert r.returncode == 0, r.stderr
    sent = fake_hub.file_requests(SHARD1)
    assert sent and all(q.authorization == "Bearer hf_test" for q in sent)


def test_missing_repo_and_pickle_only_repo(fake_hub, hf):
    r = run_llmcli(fake_hub.url, hf, "download", "org/missing")
    assert r.returncode == 1 and "no such model" in r.stderr and "Traceback" not in r.stderr
    r = run_llmcli(fake_hub.url, hf, "download", "org/pickled")
    assert r.returncode == 1 and "pickle" in r.stderr and "safetensors" in r.stderr
    assert not [q for q in fake_hub.requests if "/resolve/" in q.path]


def test_disk_space_refusal(fake_hub, hf, checkpoint):
    preamble = ("import shutil\nreal = shutil.disk_usage\n"
                "shutil.disk_usage = lambda p: real(p)._replace(free=5 * 2**20)")
    r = run_llmcli(fake_hub.url, hf, "download", "org/tiny", preamble=preamble)
    assert r.returncode == 1
    assert "not enough disk space" in r.stderr and "5.0 MiB free" in r.stderr
    total = sum(len(checkpoint[n]) for n in checkpoint)
    assert dl.human_bytes(total) in r.stderr
    assert not [q for q in fake_hub.requests if "/resolve/" in q.path]


def test_dry_run_lists_sizes_and_transfers_nothing(fake_hub, hf, checkpoint):
    r = run_llmcli(fake_hub.url, hf, "download", "org/tiny", "--dry-run")
    assert r.returncode == 0, r.stderr
    for name in checkpoint:
        assert name in r.stdout
    assert "modeling_tiny.py" not in r.stdout
    assert not [q for q in fake_hub.requests if "/resolve/" in q.path]


def test_local_dir(fake_hub, hf, tmp_path, checkpoint):
    target = tmp_path / "plain"
    r = run_llmcli(fake_hub.url, hf, "download", "org/tiny", "--local-dir", str(target), "--include", "*.json")
    assert r.returncode == 0, r.stderr
    assert (target / "config.json").read_bytes() == checkpoint["config.json"]
    assert not (hf / "hub" / "models--org--tiny" / "blobs").exists()
    # Files of this commit already in the folder are not asked for again.
    fake_hub.requests.clear()
    r = run_llmcli(fake_hub.url, hf, "download", "org/tiny", "--local-dir", str(target), "--include", "*.json")
    assert r.returncode == 0, r.stderr
    assert not [q for q in fake_hub.requests if "/resolve/" in q.path]


def test_implicit_download(fake_hub, hf, checkpoint):
    """Commands download a missing model; above the size limit they ask, or need --yes."""
    resolve = "from llmcli import hub\nhub.ASK_ABOVE_BYTES = {limit}\nprint(hub.resolve('org/tiny', yes={yes}).path)"
    code = "import sys\n" + resolve.format(limit=1000, yes=False)
    r = subprocess.run([sys.executable, "-c", code], env=cli_env(fake_hub.url, hf), capture_output=True, text=True)
    assert r.returncode == 1 and "llmcli download org/tiny" in r.stderr and "--yes" in r.stderr
    assert not [q for q in fake_hub.requests if "/resolve/" in q.path]
    code = "import sys\n" + resolve.format(limit=1000, yes=True)
    r = subprocess.run([sys.executable, "-c", code], env=cli_env(fake_hub.url, hf), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip())
    assert (path / SHARD2).read_bytes() == checkpoint[SHARD2]
    assert "not on disk: downloading" in r.stderr


def test_show_fetches_only_metadata(fake_hub, hf, checkpoint):
    r = run_llmcli(fake_hub.url, hf, "show", "org/tiny", "--json")
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    assert facts["weights_on_disk"] is False and facts["params_source"] == "config"
    assert facts["download_bytes"] == sum(len(v) for v in checkpoint.values())
    assert not fake_hub.file_requests(SHARD1) and not fake_hub.file_requests(SHARD2)
    # The config-derived count equals the tensors' (read from the files the server holds).
    from safetensors.torch import load

    expected = sum(t.numel() for shard in (SHARD1, SHARD2) for t in load(checkpoint[shard]).values())
    assert facts["params_total"] == expected
    # The model is not complete: a command that needs weights still downloads it.
    assert hub.cached_snapshot("org/tiny") is None


def test_unreachable_hub_names_the_download_command(hf, tmp_path):
    r = run_llmcli("http://127.0.0.1:9", hf, "show", "org/absent")
    assert r.returncode == 1
    assert "cannot reach" in r.stderr and "llmcli download org/absent" in r.stderr


# -- in-process: offline resolution, list, file choice ------------------------------------------------


def fake_cached_model(hf_home: Path, repo: str, config: dict, weights: bool = True, ref: bool = True) -> Path:
    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(config))
    if weights:
        (folder / "blobs").mkdir()
        (folder / "blobs" / "b").write_bytes(b"0" * 2048)
        (snap / "model.safetensors").symlink_to(folder / "blobs" / "b")
    if ref:
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text("a" * 40)
    return snap


def test_offline_missing_model_names_the_download_command(run_cli):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    code, _, err = run_cli("generate", "qwen2.5-0.5b-instruct", "-p", "hi")
    assert code == 1
    assert "llmcli download qwen2.5-0.5b-instruct" in err and "offline" in err
    code, _, err = run_cli("show", "someone/model")
    assert code == 1 and "llmcli download someone/model" in err


def test_offline_resolution_from_cache(hf):
    snap = fake_cached_model(hf, "org/cached", {"model_type": "qwen2"})
    assert hub.resolve("org/cached").path == snap
    # Without refs/main (fetched by commit elsewhere) the newest complete snapshot is used.
    fake_cached_model(hf, "org/noref", {"model_type": "qwen2"}, ref=False)
    assert hub.resolve("org/noref").path.name == "a" * 40
    # An index whose shards are not all here is not a usable snapshot.
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "missing.safetensors"}}))
    assert hub.cached_snapshot("org/cached") is None


def test_list_json(hf, run_cli):
    qwen3 = {"model_type": "qwen3", "vocab_size": 100, "hidden_size": 8, "intermediate_size": 16,
             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
             "tie_word_embeddings": True}
    fake_cached_model(hf, "org/runnable", qwen3)
    fake_cached_model(hf, "org/partial", {"model_type": "deepseek_v3"}, weights=False)
    fake_cached_model(hf, "org/bert", {"model_type": "bert"})
    fake_cached_model(hf, "Qwen/Qwen2.5-0.5B-Instruct", {"model_type": "qwen2"})
    code, out, err = run_cli("list", "--json")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["org/runnable"]["downloaded"] == "yes" and rows["org/runnable"]["family"] == "qwen3"
    assert rows["org/runnable"]["size_on_disk"] == 2048
    # embeddings 800 + final norm 8 + norms 16 + q 64 + k, v 32 each + o 64 + q/k norms 8 + MLP 384
    assert rows["org/runnable"]["params"] == 800 + 8 + 16 + 64 + 32 + 32 + 64 + 8 + 384
    assert rows["org/partial"]["downloaded"] == "partial"
    assert "org/bert" not in rows
    assert rows["qwen2.5-0.5b-instruct"]["downloaded"] == "yes"
    assert rows["qwen2.5-7b-instruct"]["downloaded"] == "no"
    assert rows["deepseek-v3"]["repo"] == "deepseek-ai/DeepSeek-V3"
    assert rows["demo-qwen"]["downloaded"] == "built-in"
    code, out, _ = run_cli("list")
    assert code == 0 and "org/runnable" in out and "qwen3-8b" in out


def test_registry_has_the_issue_aliases():
    from llmcli.registry import ALIASES

    names = {"qwen-1.8b", "qwen-7b", "qwen-14b", "qwen-1.8b-base", "qwen-7b-base", "qwen-14b-base",
             "deepseek-r1", "deepseek-v3", "deepseek-v2-lite", "deepseek-v2-lite-chat", "demo-qwen"}
    names |= {f"qwen2.5-{s}-instruct" for s in ("0.5b", "1.5b", "3b", "7b", "14b", "32b", "72b")}
    names |= {f"qwen3-{s}" for s in ("0.6b", "1.7b", "4b", "8b", "14b", "32b")}
    names |= {f"deepseek-r1-distill-qwen-{s}" for s in ("1.5b", "7b", "14b", "32b")}
    assert names <= set(ALIASES)
    assert ALIASES["qwen-7b"].repo == "Qwen/Qwen-7B-Chat" and ALIASES["qwen-7b-base"].repo == "Qwen/Qwen-7B"


@pytest.mark.parametrize("paths, include, exclude, expected", [
    (["config.json", "model.safetensors", "modeling.py", "README.md", "sub/model.safetensors"], None, None,
     ["config.json", "model.safetensors"]),
    (["config.json", "a.safetensors", "b.py", "pytorch_model.bin"], ["*"], ["a.*"], ["config.json"]),
    (["config.json", "inference/model.py", "inference/config.json"], ["inference/*"], None,
     ["inference/config.json"]),
])
def test_select_files(paths, include, exclude, expected):
    chosen, _ = dl.select_files(paths, include, exclude)
    assert chosen == expected


def test_a_snapshot_missing_its_index_and_a_shard_is_not_complete(tmp_path):
    """A download that failed before model.safetensors.index.json arrived leaves config.json and some
    numbered shards: that is not a model (seen once as a flaky failure of the test above, when the
    failing shard beat the index to it)."""
    from llmcli.download import snapshot_is_complete

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / SHARD1).write_bytes(b"x")
    assert not snapshot_is_complete(tmp_path)
    (tmp_path / SHARD2).write_bytes(b"x")
    assert snapshot_is_complete(tmp_path)  # every numbered shard is there
    single = tmp_path / "single"
    single.mkdir()
    (single / "config.json").write_text("{}")
    (single / "model.safetensors").write_bytes(b"x")
    assert snapshot_is_complete(single)
