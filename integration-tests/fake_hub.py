"""A stand-in for the Hugging Face Hub, for tests: a small threaded HTTP server on 127.0.0.1
that answers the calls huggingface_hub makes to download a snapshot, from repositories held in
memory. Point a client at it with HF_ENDPOINT=<FakeHub.url>.

What it serves, as the Hub does (without Xet headers, so clients use plain HTTP):
- `GET /api/models/{repo}[/revision/{rev}]`: the model info, with `sha` and `siblings`;
- `GET /api/models/{repo}/tree/{rev}`: the file listing (`oid`, `size`, `lfs` for weights);
- `HEAD`/`GET /{repo}/resolve/{rev}/{file}`: the file, with `X-Repo-Commit`, `ETag` (the git
  blob id, or the sha256 of a file stored in LFS) and `Content-Length`; a `Range: bytes=N-`
  request gets 206 and the rest of the file.

Errors carry the `X-Error-Code` header huggingface_hub maps to its exceptions: a gated
repository answers 401 `GatedRepo` without `Authorization: Bearer <its token>`, an unknown
repository 404 `RepoNotFound`, an unknown revision 404 `RevisionNotFound`, an unknown file 404
`EntryNotFound`. A file can be made to break off halfway through its first download, so that a
client has to resume it. Every request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Files the Hub keeps in LFS: their ETag is the content's sha256, not the git blob id.
LFS_SUFFIXES = (".safetensors", ".bin", ".model", ".gguf")


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, bytes]
    commit: str
    # Branch and tag names that resolve to `commit`.
    refs: set[str] = field(default_factory=lambda: {"main"})
    # When set, requests must carry `Authorization: Bearer <gated_token>`.
    gated_token: str | None = None
    # Files whose first full download stops halfway through.
    break_once: set[str] = field(default_factory=set)

    def resolves(self, revision: str) -> bool:
        return revision in self.refs or revision == self.commit


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]


class FakeHub:
    """Use as a context manager: serves on a free port until the block ends."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        gated_token: str | None = None,
        break_once: set[str] | None = None,
    ) -> FakeRepo:
        digest = hashlib.sha1(repo_id.encode())
        for name, content in sorted(files.items()):
            digest.update(name.encode() + b"\0" + content)
        commit = digest.hexdigest()
        repo = FakeRepo(
            repo_id, dict(files), commit, gated_token=gated_token, break_once=break_once or set()
        )
        self.repos[repo_id] = repo
        return repo

    def add_repo_from_dir(self, repo_id: str, directory: Path, **options) -> FakeRepo:
        files = {
            path.relative_to(directory).as_posix(): path.read_bytes()
            for path in sorted(directory.rglob("*"))
            if path.is_file()
        }
        return self.add_repo(repo_id, files, **options)

    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def downloads(self, repo_id: str) -> list[RecordedRequest]:
        """The GET requests for files of repo_id, in order."""
        prefix = f"/{repo_id}/resolve/"
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and r.path.startswith(prefix)]

    def downloaded_files(self, repo_id: str) -> set[str]:
        return {r.path.split("/", 5)[5] for r in self.downloads(repo_id)}


class HubError(Exception):
    def __init__(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.commit = commit


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # Keep-alive, as the Hub does: huggingface_hub's client reuses connections.
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._answer(send_body=False)

        def do_GET(self) -> None:
            self._answer(send_body=True)

        def _answer(self, send_body: bool) -> None:
            # Split before unquoting: a quoted revision may hold a "/" (refs/pr/1).
            raw_path = urlsplit(self.path).path
            headers = {name.lower(): value for name, value in self.headers.items()}
            hub.record(RecordedRequest(self.command, unquote(raw_path), headers))
            try:
                if raw_path.startswith("/api/models/"):
                    self._api(raw_path.removeprefix("/api/models/"), send_body)
                elif "/resolve/" in raw_path:
                    self._resolve(raw_path.lstrip("/"), send_body)
                else:
                    raise HubError(404, "", f"no route {unquote(raw_path)}")
            except HubError as error:
                self._error(error, send_body)

        def _repo(self, repo_id: str) -> FakeRepo:
            repo = hub.repos.get(repo_id)
            if repo is None:
                raise HubError(404, "RepoNotFound", "Repository not found")
            if repo.gated_token is not None:
                if self.headers.get("Authorization") != f"Bearer {repo.gated_token}":
                    raise HubError(
                        401,
                        "GatedRepo",
                        f"Access to model {repo_id} is restricted. You must have access to it "
                        "and be authenticated to access it. Please log in.",
                    )
            return repo

        def _revision(self, repo: FakeRepo, revision: str) -> None:
            if not repo.resolves(revision):
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

        def _api(self, rest: str, send_body: bool) -> None:
            # {org}/{name}[/revision/{rev}] or {org}/{name}/tree/{rev}
            parts = [unquote(part) for part in rest.split("/", 3)]
            repo = self._repo("/".join(parts[:2]))
            kind = parts[2] if len(parts) > 2 else "revision"
            revision = parts[3] if len(parts) > 3 else "main"
            self._revision(repo, revision)
            if kind == "revision":
                body = {
                    "id": repo.repo_id,
                    "modelId": repo.repo_id,
                    "sha": repo.commit,
                    "private": False,
                    "gated": "manual" if repo.gated_token else False,
                    "siblings": [{"rfilename": name} for name in sorted(repo.files)],
                }
            elif kind == "tree":
                body = [_tree_entry(name, content) for name, content in sorted(repo.files.items())]
            else:
                raise HubError(404, "", f"no route /api/models/{rest}")
            self._json(body, send_body)

        def _resolve(self, rest: str, send_body: bool) -> None:
            repo_part, _, after = rest.partition("/resolve/")
            repo = self._repo(unquote(repo_part))
            revision, _, filename = (unquote(part) for part in after.partition("/"))
            self._revision(repo, revision)
            content = repo.files.get(filename)
            if content is None:
                raise HubError(404, "EntryNotFound", f"{filename} does not exist", repo.commit)

            start = _range_start(self.headers.get("Range"))
            # A client resumes with a Range header; the break applies to a full download only.
            breaks = send_body and start == 0 and filename in repo.break_once
            if breaks:
                repo.break_once.discard(filename)
            body = content[start:]
            self.send_response(206 if start else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            if start:
                content_range = f"bytes {start}-{len(content) - 1}/{len(content)}"
                self.send_header("Content-Range", content_range)
            self.send_header("ETag", f'"{_etag(filename, content)}"')
            self.send_header("X-Repo-Commit", repo.commit)
            self.end_headers()
            if not send_body:
                return
            if breaks:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def _json(self, body: object, send_body: bool) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if send_body:
                self.wfile.write(data)

        def _error(self, error: HubError, send_body: bool) -> None:
            data = json.dumps({"error": error.message}).encode()
            self.send_response(error.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if error.code:
                self.send_header("X-Error-Code", error.code)
            self.send_header("X-Error-Message", error.message)
            if error.commit:
                self.send_header("X-Repo-Commit", error.commit)
            self.end_headers()
            if send_body:
                self.wfile.write(data)

    return Handler


def _range_start(header: str | None) -> int:
    """N of `bytes=N-`, the only form huggingface_hub sends; 0 without a Range header."""
    if header is None:
        return 0
    if not header.startswith("bytes=") or not header.endswith("-"):
        raise HubError(416, "", f"unsupported Range {header}")
    return int(header.removeprefix("bytes=").removesuffix("-"))


def _is_lfs(filename: str) -> bool:
    return filename.endswith(LFS_SUFFIXES)


def _git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _etag(filename: str, content: bytes) -> str:
    return hashlib.sha256(content).hexdigest() if _is_lfs(filename) else _git_blob_id(content)


def _tree_entry(filename: str, content: bytes) -> dict:
    entry: dict = {
        "type": "file",
        "oid": _git_blob_id(content),
        "size": len(content),
        "path": filename,
    }
    if _is_lfs(filename):
        entry["lfs"] = {
            "oid": hashlib.sha256(content).hexdigest(),
            "size": len(content),
            "pointerSize": 134,
        }
    return entry
