"""A small, real Hugging Face Hub look-alike for tests: serves in-memory repos over HTTP on 127.0.0.1.

It speaks the endpoints huggingface_hub's `model_info`, `list_repo_tree`, `snapshot_download` and
`hf_hub_download` use:

    GET       /api/models/{repo}                      model info of "main" (JSON: id, sha, siblings)
    GET       /api/models/{repo}/revision/{rev}       model info of a branch or commit
    GET       /api/models/{repo}/tree/{rev}[/{dir}]   file listing (?recursive=true)
    HEAD/GET  /{repo}/resolve/{rev}/{file}            file metadata / content; LFS-like files 302 to:
    HEAD/GET  /api/resolve-cache/models/{repo}/{commit}/{file}

File responses carry X-Repo-Commit, ETag (git blob sha1) and, for LFS-like files, X-Linked-Etag
(sha256) and X-Linked-Size. Errors are 404s with X-Error-Code RepoNotFound / RevisionNotFound /
EntryNotFound, or 401 GatedRepo for a gated repo fetched without its token. Every request is logged
in `HubServer.requests` as (method, path).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".onnx", ".pt", ".pth", ".h5", ".msgpack")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass
class _Repo:
    branches: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> {path: content}
    token: str | None = None  # gated: files need "Authorization: Bearer <token>"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def free_port() -> int:
    """A TCP port that nothing listens on (right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HubServer:
    """A threaded HTTP server holding repos {repo_id: {revision_or_commit: {filename: bytes}}}."""

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def add_repo(
        self, repo_id: str, revisions: dict[str, dict[str, bytes]], *, token: str | None = None
    ) -> dict[str, str]:
        """Add a repo; keys of `revisions` are branch names or 40-hex commits. Returns {key: commit}."""
        repo = _Repo(token=token)
        for name, files in revisions.items():
            if _COMMIT.fullmatch(name):
                commit = name
            else:
                digest = hashlib.sha1(f"{repo_id}@{name}".encode())
                for path in sorted(files):
                    digest.update(path.encode() + b"\0" + files[path])
                commit = digest.hexdigest()
                repo.branches[name] = commit
            repo.commits[commit] = dict(files)
        self.repos[repo_id] = repo
        return {name: repo.branches.get(name, name) for name in revisions}

    def start(self) -> HubServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def log(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def file_requests(self, method: str = "GET") -> list[str]:
        """Unquoted `/{repo}/resolve/...` and resolve-cache paths requested with `method`."""
        return [unquote(p) for m, p in self.requests if m == method and ("/resolve/" in p or "/resolve-cache/" in p)]

    def downloaded(self) -> set[str]:
        """Base names of the files requested with GET on a file endpoint."""
        return {p.rsplit("/", 1)[-1] for p in self.file_requests("GET")}


class _Handler(BaseHTTPRequestHandler):
    server_version = "FakeHub/1.0"

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        self._dispatch(body=True)

    def do_HEAD(self) -> None:
        self._dispatch(body=False)

    # -- routing -------------------------------------------------------------------------------------------
    def _dispatch(self, body: bool) -> None:
        url = urlsplit(self.path)
        self.hub.log(self.command, url.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        query = parse_qs(url.query)
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            if not rest:
                return self._model_info(repo_id, "main")
            if rest[0] == "revision" and len(rest) == 2:
                return self._model_info(repo_id, rest[1])
            if rest[0] == "tree" and len(rest) >= 2:
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), recursive)
        if parts[:3] == ["api", "resolve-cache", "models"] and len(parts) >= 7:
            return self._file(f"{parts[3]}/{parts[4]}", parts[5], "/".join(parts[6:]), body, redirect=False)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._file("/".join(parts[:2]), parts[3], "/".join(parts[4:]), body, redirect=True)
        self._error(404, None, f"no route for {url.path}")

    def _lookup(self, repo_id: str, revision: str) -> tuple[_Repo, str, dict[str, bytes]] | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        commit = repo.branches.get(revision, revision)
        if commit not in repo.commits:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo, commit, repo.commits[commit]

    # -- endpoints -----------------------------------------------------------------------------------------
    def _model_info(self, repo_id: str, revision: str) -> None:
        found = self._lookup(repo_id, revision)
        if found is None:
            return
        repo, commit, files = found
        info = {
            "id": repo_id, "modelId": repo_id, "sha": commit, "private": False, "disabled": False,
            "gated": "manual" if repo.token else False, "tags": [],
            "siblings": [{"rfilename": name} for name in sorted(files)],
        }
        self._json(info)

    def _tree(self, repo_id: str, revision: str, directory: str, recursive: bool) -> None:
        found = self._lookup(repo_id, revision)
        if found is None:
            return
        _, _, files = found
        prefix = f"{directory}/" if directory else ""
        entries: dict[str, dict] = {}
        for name in sorted(files):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix):].split("/")
            for depth in range(1, len(parts)):  # parent folders of the file
                folder = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "path": folder, "oid": "0" * 40})
            if recursive or len(parts) == 1:
                entries[name] = self._tree_entry(name, files[name])
        if directory and not entries:
            return self._error(404, "EntryNotFound", f"{directory} does not exist")
        self._json(list(entries.values()))

    @staticmethod
    def _tree_entry(name: str, data: bytes) -> dict:
        entry = {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)}
        if name.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _file(self, repo_id: str, revision: str, filename: str, body: bool, redirect: bool) -> None:
        found = self._lookup(repo_id, revision)
        if found is None:
            return
        repo, commit, files = found
        if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
            return self._error(401, "GatedRepo", "Access to this model is restricted", commit)
        if filename not in files:
            return self._error(404, "EntryNotFound", f"{filename} does not exist", commit)
        data = files[filename]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{git_blob_sha1(data)}"', "Content-Length": str(len(data))}
        if filename.endswith(LFS_SUFFIXES):
            sha256 = hashlib.sha256(data).hexdigest()
            headers.update({"ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(data))})
            if redirect:  # like the Hub: LFS content is served from another location
                headers.update({"Location": f"/api/resolve-cache/models/{repo_id}/{commit}/{filename}"})
                headers["Content-Length"] = "0"
                return self._send(302, headers, b"")
        self._send(200, headers, data if body else b"")

    # -- helpers -------------------------------------------------------------------------------------------
    def _json(self, payload: object) -> None:
        data = json.dumps(payload).encode()
        self._send(200, {"Content-Type": "application/json", "Content-Length": str(len(data))}, data)

    def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        data = json.dumps({"error": message}).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(data)), "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(status, headers, data if self.command != "HEAD" else b"")

    def _send(self, status: int, headers: dict[str, str], data: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if data:
            self.wfile.write(data)


@pytest.fixture
def hub_server():
    """A running HubServer with no repos; add them with `hub_server.add_repo(...)`."""
    server = HubServer().start()
    try:
        yield server
    finally:
        server.stop()
