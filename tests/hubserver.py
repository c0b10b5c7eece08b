"""A hub-like HTTP server on 127.0.0.1 for download tests.

It speaks the part of the Hugging Face Hub protocol that huggingface_hub's downloads use: repo info
(`/api/models/{repo}[/revision/{rev}]`), the recursive tree listing (`/api/models/{repo}/tree/{rev}`)
and `/{repo}/resolve/{rev}/{path}` HEAD and GET (with Range), with the headers the client reads
(X-Repo-Commit, ETag, Content-Length, X-Linked-Size/-Etag, X-Error-Code). It never sends Xet headers,
so the client uses plain HTTP. Faults can be injected per file: a dropped connection mid-body, an
error status, an error status for resumed (ranged) transfers only, a slow transfer. Every request is
recorded for the tests to inspect.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith((".safetensors", ".bin", ".pt", ".tiktoken"))


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> files
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> sha
    gated: bool = False

    def commit_of(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.refs.get(revision)


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None


class FakeHub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.drop_once: dict[str, float] = {}  # file path -> fraction sent before the connection drops
        self.fail: dict[str, int] = {}  # file path -> status for every GET
        self.fail_resumes: dict[str, int] = {}  # file path -> status for every GET with a Range (a resume)
        self.slow: dict[str, float] = {}  # file path -> seconds to sleep per 4 KiB chunk (read per chunk)
        self._server: ThreadingHTTPServer | None = None

    # -- content ----------------------------------------------------------------------------------

    def add_commit(self, repo_id: str, files: dict[str, bytes], revision: str = "main", gated: bool = False) -> str:
        repo = self.repos.setdefault(repo_id, Repo())
        repo.gated = repo.gated or gated
        digest = hashlib.sha1(json.dumps(sorted((k, git_blob_id(v)) for k, v in files.items())).encode())
        sha = hashlib.sha1((repo_id + revision).encode() + digest.digest()).hexdigest()
        repo.commits[sha] = dict(files)
        repo.refs[revision] = sha
        return sha

    def file_requests(self, name: str, method: str | None = None) -> list[Request]:
        return [r for r in self.requests if "/resolve/" in r.path and r.path.endswith("/" + name)
                and (method is None or r.method == method)]

    # -- server -----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                hub._handle(self, head=False)

            def do_HEAD(self):
                hub._handle(self, head=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # -- protocol ---------------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = urlsplit(h.path).path
        self.requests.append(Request("HEAD" if head else "GET", unquote(path), h.headers.get("Range"),
                                     h.headers.get("Authorization")))
        if path.startswith("/api/models/"):
            return self._api(h, path[len("/api/models/"):])
        if "/resolve/" in path:
            repo_id, rest = path.lstrip("/").split("/resolve/", 1)
            revision, _, file_path = rest.partition("/")
            return self._resolve(h, unquote(repo_id), unquote(revision), unquote(file_path), head)
        self._error(h, 404, None, "not found")

    def _error(self, h, status: int, code: str | None, message: str, extra: dict | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        h.send_response(status)
        if code:
            h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        for key, value in (extra or {}).items():
            h.send_header(key, value)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def _json(self, h, data) -> None:
        body = json.dumps(data).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _api(self, h, rest: str) -> None:
        parts = [unquote(p) for p in rest.split("/")]
        repo_id = "/".join(parts[:2])
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 404, "RepoNotFound", "Repository not found")
        tail = parts[2:]
        if not tail or tail[0] == "revision":
            revision = tail[1] if len(tail) > 1 else "main"
            sha = repo.commit_of(revision)
            if sha is None:
                return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return self._json(h, {
                "id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                "gated": "auto" if repo.gated else False,
                "siblings": [{"rfilename": p} for p in sorted(repo.commits[sha])],
            })
        if tail[0] == "tree":
            sha = repo.commit_of(tail[1])
            if sha is None:
                return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {tail[1]}")
            return self._json(h, self._tree(repo.commits[sha]))
        self._error(h, 404, None, "not found")

    @staticmethod
    def _tree(files: dict[str, bytes]) -> list[dict]:
        entries, folders = [], set()
        for path, data in sorted(files.items()):
            parts = path.split("/")
            for i in range(1, len(parts)):
                folders.add("/".join(parts[:i]))
            entry = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": path}
            if is_lfs(path):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "oid": git_blob_id(f.encode()), "size": 0, "path": f} for f in folders]
        return entries

    def _resolve(self, h, repo_id: str, revision: str, file_path: str, head: bool) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 404, "RepoNotFound", "Repository not found")
        sha = repo.commit_of(revision)
        if sha is None:
            return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        if repo.gated and not h.headers.get("Authorization"):
            return self._error(h, 401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have "
                               "access to it and be authenticated to access it. Please log in.")
        data = repo.commits[sha].get(file_path)
        if data is None:
            return self._error(h, 404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": sha})
        if not head and file_path in self.fail:
            return self._error(h, self.fail[file_path], None, "injected failure")
        if not head and h.headers.get("Range") and file_path in self.fail_resumes:
            return self._error(h, self.fail_resumes[file_path], None, "injected failure of a resumed transfer")
        etag = hashlib.sha256(data).hexdigest() if is_lfs(file_path) else git_blob_id(data)
        start = 0
        rng = h.headers.get("Range")
        if rng and not head:
            start = int(rng.removeprefix("bytes=").split("-")[0])
        body = data[start:]
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", sha)
        h.send_header("ETag", f'"{etag}"')
        h.send_header("Accept-Ranges", "bytes")
        if is_lfs(file_path):
            h.send_header("X-Linked-Size", str(len(data)))
            h.send_header("X-Linked-Etag", f'"{etag}"')
        h.send_header("Content-Length", str(len(body)))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if head:
            return
        try:
            if start == 0 and file_path in self.drop_once:
                cut = int(len(data) * self.drop_once.pop(file_path))
                h.wfile.write(body[:cut])
                h.wfile.flush()
                h.close_connection = True
                return
            for i in range(0, len(body), 4096):
                h.wfile.write(body[i:i + 4096])
                delay = self.slow.get(file_path)  # per chunk: a test can speed up a transfer in flight
                if delay:
                    h.wfile.flush()
                    time.sleep(delay)
        except (BrokenPipeError, ConnectionResetError):  # the client went away (e.g. Ctrl-C)
            h.close_connection = True
