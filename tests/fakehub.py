"""A Hub endpoint on 127.0.0.1 serving model repos from local directories, so that huggingface_hub's
real download code (repo_info, list_repo_tree, HEAD/GET resolve with ranges, error codes) runs in
tests with ``HF_ENDPOINT`` pointing here. It records every request and, at each one, calls an
optional observer (the tests count base shards on disk there).

Only what downloads use is served; uploads are not (they are tested at the operations they build).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@dataclass
class Repo:
    root: Path
    commit: str = COMMIT
    gated: bool = False

    def files(self) -> dict[str, Path]:
        return {p.relative_to(self.root).as_posix(): p for p in sorted(self.root.rglob("*")) if p.is_file()}


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, range header)
    observer: Callable[[str, str], None] | None = None
    url: str = ""
    refuse: set[str] = field(default_factory=set)  # file names whose download (not header read) gets 403

    def add(self, repo_id: str, root: Path, **kw: object) -> Repo:
        self.repos[repo_id] = Repo(root, **kw)  # type: ignore[arg-type]
        return self.repos[repo_id]

    def downloads(self, suffix: str = ".safetensors") -> list[str]:
        """Files fetched whole (GET without a range), in order."""
        return [p for m, p, r in self.requests if m == "GET" and not r and p.endswith(suffix) and "/resolve/" in p]

    def header_reads(self) -> list[str]:
        return [p for m, p, r in self.requests if m == "GET" and r and "/resolve/" in p]

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, head=True)

            def do_GET(self) -> None:
                hub._serve(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- serving ---------------------------------------------------------------------------------

    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _json(self, h: BaseHTTPRequestHandler, doc: object, head: bool) -> None:
        body = json.dumps(doc).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _repo(self, h: BaseHTTPRequestHandler, repo_id: str, revision: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 404, "RepoNotFound", f"Repository {repo_id} not found")
        elif repo.gated and "authorization" not in {k.lower() for k in h.headers}:
            self._error(h, 401, "GatedRepo", f"Access to model {repo_id} is restricted")
        elif revision not in ("main", repo.commit):
            self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        else:
            return repo
        return None

    def _serve(self, h: BaseHTTPRequestHandler, *, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append(("HEAD" if head else "GET", path, h.headers.get("Range", "")))
        if self.observer is not None:
            self.observer("HEAD" if head else "GET", path)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            if repo := self._repo(h, m[1], m[2] or "main"):
                siblings = [{"rfilename": name} for name in repo.files()]
                self._json(h, {"id": m[1], "modelId": m[1], "sha": repo.commit, "siblings": siblings}, head)
        elif m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path):
            if repo := self._repo(h, m[1], m[2]):
                self._json(h, [self._entry(name, p) for name, p in repo.files().items()], head)
        elif m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            if repo := self._repo(h, m[1], m[2]):
                file = repo.files().get(m[3])
                if m[3] in self.refuse and not h.headers.get("Range"):
                    self._error(h, 403, "Forbidden", "download refused for this test")
                elif file is None:
                    self._error(h, 404, "EntryNotFound", f"{m[3]} does not exist")
                else:
                    self._file(h, repo, file, head)
        else:
            self._error(h, 404, "NotFound", f"no route for {path}")

    @staticmethod
    def _entry(name: str, path: Path) -> dict[str, object]:
        data = path.read_bytes()
        entry: dict[str, object] = {"type": "file", "path": name, "size": len(data),
                                    "oid": hashlib.sha1(data).hexdigest()}
        if name.endswith(".safetensors"):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _file(self, h: BaseHTTPRequestHandler, repo: Repo, file: Path, head: bool) -> None:
        data = file.read_bytes()
        etag = hashlib.sha256(data).hexdigest()
        status, body = 200, data
        if (rng := h.headers.get("Range")) and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", rng)):
            start = int(m[1])
            end = min(int(m[2]) if m[2] else len(data) - 1, len(data) - 1)
            status, body = 206, data[start : end + 1]
        h.send_response(status)
        h.send_header("X-Repo-Commit", repo.commit)
        h.send_header("ETag", f'"{etag}"')
        h.send_header("Content-Length", str(len(body)))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
        h.end_headers()
        if not head:
            h.wfile.write(body)
