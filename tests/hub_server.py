"""A Hugging Face Hub look-alike on 127.0.0.1, for tests.

The project downloads and publishes weights with huggingface_hub. Mocking that client would test
our idea of the protocol, not the client's, so tests point the real client at this server instead:
it answers the requests huggingface_hub 2.x sends (checked against its source), from repos held in
memory, and it needs nothing but the standard library.

What it serves, and the Hub behaviour each part copies:

- Download: ``HEAD``/``GET /{repo_id}/resolve/{revision}/{path}`` (and ``/models/{repo_id}/...``).
  Responses carry ``X-Repo-Commit`` and an ``ETag``: the sha256 for LFS files (also sent as
  ``X-Linked-Etag`` with ``X-Linked-Size``), the git blob sha1 for regular ones. The client names
  cache blobs after that ETag. No redirects: the bytes come from the same URL.
- Metadata: ``/api/models/{repo}[/revision/{rev}]``, ``/tree/{rev}[/{path}]``, ``/paths-info/{rev}``.
- Upload: ``/api/repos/create``, ``/preupload``, the git-LFS batch endpoint, a PUT target that plays
  the part of the storage bucket, ``/commit`` (NDJSON) and ``/api/validate-yaml``.
- Errors: 4xx with ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``),
  which the client turns into its own error classes. Never 5xx: the client retries those with
  backoff for tens of seconds, which would make a failing test slow instead of red.

``refuse_lfs = (where, status, message)`` makes the server refuse LFS uploads as the Hub does (a
quota, a size limit): with a per-object error in the batch answer (``"batch"``) or at the storage
PUT (``"put"``).

A file is LFS when its name ends in a weights suffix or it is larger than 10 KB. Repo visibility is
a flag reported in metadata, not access control; ``require_token`` is the access control.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".npy")
LFS_MIN_SIZE = 10 * 1024
_LFS_UPLOAD_PREFIX = "/_lfs-upload/"
# Path segments that end a repo id: "/gpt2/resolve/..." is repo "gpt2", "/org/name/resolve/..." is "org/name".
_ROUTE_WORDS = {"resolve", "revision", "tree", "paths-info", "preupload", "commit", "info"}


def is_lfs(path: str, size: int) -> bool:
    """Whether the test servers store a file in LFS: weights by name, anything else above 10 KB."""
    return path.endswith(LFS_SUFFIXES) or size > LFS_MIN_SIZE


def git_blob_sha1(data: bytes) -> str:
    """The id git gives a blob, which the Hub uses as the ETag of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The pointer file git stores in place of an LFS file's bytes."""
    oid = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n".encode()


def closed_port_endpoint() -> str:
    """An http URL on 127.0.0.1 where nothing listens, so connections are refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def use_endpoint(monkeypatch, endpoint: str) -> None:
    """Point the package and huggingface_hub at ``endpoint``, as ``HF_ENDPOINT`` set before the process started does.

    huggingface_hub reads ``HF_ENDPOINT`` once, at import; some releases (0.x) build the URLs of a commit's
    result from that import-time value. A test that changes the endpoint later sets both.
    """
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)


@dataclass(frozen=True)
class _Blob:
    data: bytes
    lfs: bool
    sha256: str
    blob_id: str  # git sha1 of what git stores: the pointer for LFS files, the bytes otherwise
    pointer_size: int | None

    @classmethod
    def of(cls, path: str, data: bytes) -> _Blob:
        lfs = is_lfs(path, len(data))
        stored = lfs_pointer(data) if lfs else data
        return cls(data, lfs, hashlib.sha256(data).hexdigest(), git_blob_sha1(stored), len(stored) if lfs else None)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id


@dataclass(frozen=True)
class _Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, _Blob]


@dataclass
class _Repo:
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)
    corrupted: dict[str, bytes] = field(default_factory=dict)


@dataclass
class _Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class HubError(Exception):
    """A 4xx answer, with the ``X-Error-Code`` the client maps to an error class."""

    def __init__(self, status: int, code: str | None, message: str, *, commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit

    def reply(self) -> _Reply:
        # Header values must be latin-1; a path in the message may not be.
        message = self.message.encode("ascii", "replace").decode()
        headers = {"X-Error-Message": message, "Content-Type": "application/json"}
        if self.code:
            headers["X-Error-Code"] = self.code
        if self.commit:
            headers["X-Repo-Commit"] = self.commit
        return _Reply(self.status, headers, json.dumps({"error": self.message}).encode())


def _json(payload: object, status: int = 200, content_type: str = "application/json") -> _Reply:
    return _Reply(status, {"Content-Type": content_type}, json.dumps(payload).encode())


class HubServer:
    """An in-memory Hub serving model repos on an ephemeral 127.0.0.1 port."""

    def __init__(self, *, require_token: str | None = None):
        self.require_token = require_token
        # Set to (status, message) to refuse LFS uploads as the Hub does (e.g. a quota or a size limit):
        # at the batch endpoint, with a per-object error ("batch"), or at the storage PUT ("put").
        self.refuse_lfs: tuple[str, int, str] | None = None
        self.endpoint = ""
        self.requests: list[tuple[str, str]] = []  # (method, URL path without query), in arrival order
        self._repos: dict[str, _Repo] = {}
        self._lfs: dict[str, bytes] = {}  # sha256 -> bytes: the LFS storage, shared by all repos
        self._pending_uploads: dict[str, int] = {}  # sha256 -> size announced by a batch call
        self._clock = itertools.count(1_700_000_000)  # commit timestamps, so equal trees get new shas
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # Lifecycle

    def start(self) -> HubServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._httpd = self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # Test-facing state

    def add_file(
        self, repo_id: str, path_in_repo: str, data: bytes, *, revision: str = "main", message: str = "add file"
    ) -> str:
        """Commit one file on a branch, creating the repo and the branch if needed; return the commit sha."""
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo())
            base = repo.branches.get(revision) or repo.branches.get("main")
            files = dict(repo.commits[base].files) if base else {}
            files[path_in_repo] = self._store(path_in_repo, data)
            return self._commit(repo, revision, files, message, parent=base)

    def commits(self, repo_id: str, revision: str = "main") -> list[str]:
        """Commit shas reachable from a revision, newest first."""
        with self._lock:
            repo, commit = self._lookup(repo_id, revision)
            shas = []
            while commit is not None:
                shas.append(commit.sha)
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return shas

    def serve_corrupted(self, repo_id: str, path_in_repo: str, data: bytes) -> None:
        """From now on GET returns ``data`` for this file, at any revision, while HEAD and the metadata
        endpoints keep reporting the original sha256 and size: a tampered mirror, or bit rot."""
        with self._lock:
            self._repos[repo_id].corrupted[path_in_repo] = data

    def file_bytes(self, repo_id: str, path_in_repo: str, revision: str = "main") -> bytes:
        """The bytes a commit holds for a file (what was uploaded, never the corrupted copy)."""
        with self._lock:
            _, commit = self._lookup(repo_id, revision)
            if path_in_repo not in commit.files:
                raise KeyError(f"{path_in_repo!r} is not in {repo_id}@{revision}; it has {sorted(commit.files)}")
            return commit.files[path_in_repo].data

    def repo_private(self, repo_id: str) -> bool:
        with self._lock:
            return self._repos[repo_id].private

    # Internals shared by the two sides

    def _store(self, path: str, data: bytes) -> _Blob:
        blob = _Blob.of(path, data)
        if blob.lfs:
            self._lfs[blob.sha256] = data
        return blob

    def _commit(self, repo: _Repo, branch: str, files: dict[str, _Blob], message: str, *, parent: str | None) -> str:
        """Record a commit whose sha is computed the way git does, from its tree, parent and time."""
        tree = hashlib.sha1("".join(f"{p}\0{b.blob_id}\n" for p, b in sorted(files.items())).encode()).hexdigest()
        text = f"tree {tree}\n" + (f"parent {parent}\n" if parent else "") + f"time {next(self._clock)}\n\n{message}\n"
        sha = hashlib.sha1(b"commit %d\0" % len(text) + text.encode()).hexdigest()
        repo.commits[sha] = _Commit(sha, parent, message, files)
        repo.branches[branch] = sha
        return sha

    def _lookup(self, repo_id: str, revision: str) -> tuple[_Repo, _Commit]:
        repo = self._repos.get(repo_id)
        if repo is None:
            raise HubError(404, "RepoNotFound", f"Repository not found: {repo_id}")
        sha = repo.branches.get(revision) or (revision if revision in repo.commits else None)
        if sha is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo, repo.commits[sha]

    def _authorized(self, authorization: str | None) -> bool:
        return self.require_token is None or authorization == f"Bearer {self.require_token}"

    # Routing

    def _handle(self, method: str, raw_path: str, query: dict, headers, body: bytes) -> _Reply:
        if method == "PUT" and raw_path.startswith(_LFS_UPLOAD_PREFIX):
            # The storage bucket: the client PUTs there without credentials, like to a signed S3 URL.
            return self._lfs_put(raw_path[len(_LFS_UPLOAD_PREFIX) :], body)
        if not self._authorized(headers.get("Authorization")):
            raise HubError(401, None, "Invalid credentials in Authorization header")
        # Split before unquoting: a quoted revision such as refs%2Fpr%2F1 stays one segment.
        parts = [unquote(p) for p in raw_path.split("/")[1:]]
        if method == "POST" and parts == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body))
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return _json({"errors": [], "warnings": []})
        if parts[:2] == ["api", "models"]:
            repo_id, rest = _split_repo_id(parts[2:])
            return self._api(method, repo_id, rest, query, headers, body)
        if parts[:1] == ["models"]:
            parts = parts[1:]
        repo_id, rest = _split_repo_id(parts)
        if method in ("GET", "HEAD") and len(rest) >= 3 and rest[0] == "resolve":
            return self._resolve(method, repo_id, rest[1], "/".join(rest[2:]))
        if method == "POST" and repo_id.endswith(".git") and rest == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(repo_id.removesuffix(".git"), json.loads(body))
        raise HubError(404, None, f"HubServer has no route for {method} {raw_path}")

    def _api(self, method: str, repo_id: str, rest: list[str], query: dict, headers, body: bytes) -> _Reply:
        if method == "GET" and not rest:
            return self._model_info(repo_id, "main", query)
        if method == "GET" and len(rest) == 2 and rest[0] == "revision":
            return self._model_info(repo_id, rest[1], query)
        if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
            recursive = query.get("recursive", ["false"])[-1].lower() in ("1", "true")
            return self._tree(repo_id, rest[1], "/".join(rest[2:]).strip("/"), recursive)
        if method == "POST" and len(rest) == 2 and rest[0] == "paths-info":
            if "json" in headers.get("Content-Type", ""):
                paths = json.loads(body).get("paths", [])
            else:
                paths = parse_qs(body.decode()).get("paths", [])
            return self._paths_info(repo_id, rest[1], paths)
        if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
            return self._preupload(repo_id, rest[1], json.loads(body))
        if method == "POST" and len(rest) == 2 and rest[0] == "commit":
            if query.get("create_pr"):
                raise HubError(400, None, "HubServer does not support pull requests")
            return self._commit_ndjson(repo_id, rest[1], body)
        raise HubError(404, None, f"HubServer has no API route for {method} {'/'.join(rest)}")

    # Download

    def _resolve(self, method: str, repo_id: str, revision: str, path: str) -> _Reply:
        with self._lock:
            repo, commit = self._lookup(repo_id, revision)
            blob = commit.files.get(path)
            if blob is None:
                raise HubError(404, "EntryNotFound", f"{path} does not exist at {commit.sha}", commit=commit.sha)
            served = repo.corrupted.get(path, blob.data)
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{blob.etag}"', "Content-Type": "application/octet-stream"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))})
        if method == "HEAD":
            headers["Content-Length"] = str(len(blob.data))
            return _Reply(200, headers)
        return _Reply(200, headers, served)

    # Metadata

    def _model_info(self, repo_id: str, revision: str, query: dict) -> _Reply:
        with_blobs = query.get("blobs", ["false"])[-1].lower() in ("1", "true")
        with self._lock:
            repo, commit = self._lookup(repo_id, revision)
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling: dict = {"rfilename": path}
            if with_blobs:
                sibling.update(size=len(blob.data), blobId=blob.blob_id)
                if blob.lfs:
                    sibling["lfs"] = {"sha256": blob.sha256, "size": len(blob.data), "pointerSize": blob.pointer_size}
            siblings.append(sibling)
        author = repo_id.split("/")[0] if "/" in repo_id else None
        return _json({
            "id": repo_id, "modelId": repo_id, "author": author, "sha": commit.sha, "private": repo.private,
            "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
        })  # fmt: skip

    def _tree(self, repo_id: str, revision: str, folder: str, recursive: bool) -> _Reply:
        with self._lock:
            _, commit = self._lookup(repo_id, revision)
        if folder and folder not in _folders(commit.files):
            raise HubError(404, "EntryNotFound", f"{folder} is not a folder at {commit.sha}", commit=commit.sha)
        prefix = f"{folder}/" if folder else ""
        paths = sorted(p for p in {*commit.files, *_folders(commit.files)} if p.startswith(prefix))
        if not recursive:
            paths = [p for p in paths if "/" not in p[len(prefix) :]]
        return _json([_path_info(commit, p) for p in paths])

    def _paths_info(self, repo_id: str, revision: str, paths: list[str]) -> _Reply:
        with self._lock:
            _, commit = self._lookup(repo_id, revision)
        known = {*commit.files, *_folders(commit.files)}
        return _json([_path_info(commit, p.strip("/")) for p in paths if p.strip("/") in known])

    # Upload

    def _create_repo(self, payload: dict) -> _Reply:
        if payload.get("type") not in (None, "model"):
            raise HubError(400, None, "HubServer only hosts model repos")
        name, organization = payload["name"], payload.get("organization")
        repo_id = f"{organization}/{name}" if organization else name
        url = f"{self.endpoint}/{repo_id}"
        with self._lock:
            if repo_id in self._repos:
                return _json({"error": "You already created this model repo", "url": url}, status=409)
            private = payload.get("visibility") == "private" or payload.get("private") is True
            repo = self._repos[repo_id] = _Repo(private=private)
            # Like the Hub, a new repo starts with one commit, so "main" resolves at once.
            attributes = b"".join(b"*%s filter=lfs diff=lfs merge=lfs -text\n" % s.encode() for s in LFS_SUFFIXES)
            self._commit(repo, "main", {".gitattributes": _Blob.of(".gitattributes", attributes)}, "initial commit",
                         parent=None)  # fmt: skip
        return _json({"url": url, "name": repo_id})

    def _preupload(self, repo_id: str, revision: str, payload: dict) -> _Reply:
        with self._lock:
            _, commit = self._lookup(repo_id, revision)
        answers = []
        for entry in payload["files"]:
            existing = commit.files.get(entry["path"])
            answers.append({
                "path": entry["path"],
                "uploadMode": "lfs" if is_lfs(entry["path"], entry["size"]) else "regular",
                "shouldIgnore": False,
                # What the client compares with its local oid to skip unchanged files.
                "oid": existing.etag if existing else None,
            })  # fmt: skip
        return _json({"files": answers, "commitOid": commit.sha})

    def _lfs_batch(self, repo_id: str, payload: dict) -> _Reply:
        if payload.get("operation") != "upload":
            raise HubError(400, None, "HubServer's LFS batch endpoint only handles uploads")
        with self._lock:
            if repo_id not in self._repos:
                raise HubError(404, "RepoNotFound", f"Repository not found: {repo_id}")
            objects = []
            for obj in payload["objects"]:
                answer = {"oid": obj["oid"], "size": obj["size"]}
                if self.refuse_lfs and self.refuse_lfs[0] == "batch":
                    answer["error"] = {"code": self.refuse_lfs[1], "message": self.refuse_lfs[2]}
                elif obj["oid"] not in self._lfs:  # no actions: "already stored, skip the upload"
                    self._pending_uploads[obj["oid"]] = obj["size"]
                    href = f"{self.endpoint}{_LFS_UPLOAD_PREFIX}{obj['oid']}"
                    answer.update(authenticated=True, actions={"upload": {"href": href}})
                objects.append(answer)
        return _json({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str, body: bytes) -> _Reply:
        if self.refuse_lfs and self.refuse_lfs[0] == "put":
            raise HubError(self.refuse_lfs[1], None, self.refuse_lfs[2])
        with self._lock:
            size = self._pending_uploads.get(oid)
            if size is None:
                raise HubError(403, None, f"no upload was announced for LFS object {oid}")
            if hashlib.sha256(body).hexdigest() != oid or len(body) != size:
                raise HubError(400, None, f"uploaded bytes do not match LFS object {oid} ({size} bytes)")
            self._lfs[oid] = body
            del self._pending_uploads[oid]
        return _Reply(200)

    def _commit_ndjson(self, repo_id: str, revision: str, body: bytes) -> _Reply:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, None, "a commit payload starts with a header line")
        header = lines[0]["value"]
        with self._lock:
            repo, commit = self._lookup(repo_id, revision)
            if revision not in repo.branches:
                raise HubError(400, None, f"can only commit to a branch, not to {revision}")
            if header.get("parentCommit") not in (None, commit.sha):
                raise HubError(412, None, f"parent commit {header['parentCommit']} is not the head {commit.sha}")
            files = dict(commit.files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                path = value["path"]
                if key == "file":
                    files[path] = self._store(path, base64.b64decode(value["content"]))
                elif key == "lfsFile":
                    data = self._lfs.get(value["oid"])
                    if data is None:
                        raise HubError(400, None, f"LFS object {value['oid']} for {path} was never uploaded")
                    files[path] = _Blob.of(path, data)
                elif key in ("deletedFile", "deletedFolder"):
                    doomed = [p for p in files if p == path or p.startswith(path.rstrip("/") + "/")]
                    if not doomed:
                        raise HubError(404, "EntryNotFound", f"A file with this name doesn't exist: {path}")
                    for p in doomed:
                        del files[p]
                else:
                    raise HubError(400, None, f"HubServer does not support commit operation {key!r}")
            message = header.get("summary") or "commit"
            sha = self._commit(repo, revision, files, message, parent=commit.sha)
        return _json({"success": True, "commitOid": sha, "commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}"})


def _split_repo_id(parts: list[str]) -> tuple[str, list[str]]:
    """Split URL segments into a repo id ("name" or "namespace/name") and the rest of the route."""
    n = 1 if len(parts) == 1 or (len(parts) > 1 and parts[1] in _ROUTE_WORDS) else 2
    return "/".join(parts[:n]), parts[n:]


def _folders(files: dict[str, _Blob]) -> set[str]:
    return {path.rsplit("/", i)[0] for path in files for i in range(1, path.count("/") + 1)}


def _path_info(commit: _Commit, path: str) -> dict:
    """One entry of /tree or /paths-info, in the Hub's shape."""
    blob = commit.files.get(path)
    if blob is None:
        tree_id = hashlib.sha1(f"tree {commit.sha} {path}".encode()).hexdigest()
        return {"type": "directory", "oid": tree_id, "size": 0, "path": path}
    entry: dict = {"type": "file", "oid": blob.blob_id, "size": len(blob.data), "path": path}
    if blob.lfs:
        entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": blob.pointer_size}
    return entry


class _Handler(BaseHTTPRequestHandler):
    """Turns HTTP requests into HubServer calls.

    It speaks HTTP/1.0, one request per connection: a stopped server then leaves no keep-alive
    connection behind that would still answer.
    """

    server_version = "HubServer/1.0"

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def log_message(self, format: str, *args: object) -> None:
        pass  # tests read hub.requests instead of stderr

    def _dispatch(self, method: str) -> None:
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        with hub._lock:
            hub.requests.append((method, url.path))
        try:
            reply = hub._handle(method, url.path, parse_qs(url.query), self.headers, self._read_body())
        except HubError as error:
            reply = error.reply()
        except Exception as error:  # a bug here must not become a 5xx, which the client retries for ~23 s
            reply = HubError(400, None, f"HubServer failed on {method} {url.path}: {error!r}").reply()
        self.send_response(reply.status)
        reply.headers.setdefault("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(reply.body)

    def _read_body(self) -> bytes:
        # huggingface_hub sends Content-Length even when it uploads from a file; chunked bodies are not read.
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))


class HangingServer:
    """Accepts TCP connections and never answers: a frozen server, or a proxy that swallows requests.

    Shows whether a caller gives up on its own timeout instead of waiting for one that never comes.
    """

    def __init__(self) -> None:
        self.endpoint = ""
        self._sock: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def accepted(self) -> int:
        """How many connections were accepted (and left unanswered)."""
        return len(self._connections)

    def start(self) -> HangingServer:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self.endpoint = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept_forever, daemon=True)
        self._thread.start()
        return self

    def _accept_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._sock.accept()
            except TimeoutError:
                continue
            self._connections.append(connection)

    def stop(self) -> None:
        if self._thread is not None:
            self._stopping.set()
            self._thread.join()
            for connection in self._connections:
                connection.close()
            self._sock.close()
            self._thread = None

    def __enter__(self) -> HangingServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
