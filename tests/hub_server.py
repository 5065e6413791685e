"""A small Hugging Face Hub-compatible HTTP server on 127.0.0.1, for tests and notebooks (no internet needed).

It implements the part of the Hub API that ``huggingface_hub`` uses for ``create_repo``, ``upload_folder`` /
``create_commit`` (regular uploads: base64 file contents in the NDJSON commit payload), ``push_to_hub``,
``hf_hub_download`` / ``snapshot_download`` / ``from_pretrained``, ``repo_info`` / ``model_info``,
``list_repo_files`` / ``list_repo_tree``, ``file_exists`` and branches. Repositories live in memory; every
commit is a full snapshot, so any earlier commit id can be resolved too.

Select it with ``HF_ENDPOINT=<server url>`` **before** ``huggingface_hub`` is imported (it reads the endpoint at
import time), with any non-empty ``HF_TOKEN`` (writes need an ``Authorization`` header, reads do not) and
``HF_HUB_OFFLINE`` unset or ``0``.

In-process use (a daemon thread; the server stops when the ``with`` block ends or ``lifetime`` seconds pass)::

    with LocalHubServer(lifetime=300) as server:
        env = {**os.environ, **server.client_env(hf_home)}
        subprocess.run([sys.executable, "script_that_pushes.py"], env=env, check=True)

As a process (prints its URL on the first line of stdout; stops after ``--lifetime`` seconds, when its parent
process exits, or on SIGTERM/SIGINT)::

    python tests/hub_server.py --lifetime 600

Bounded on purpose: one request body is at most ``max_body_bytes`` (256 MiB by default) and the server never
outlives ``lifetime``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_USER = "local-user"
DEFAULT_LIFETIME = 600.0
DEFAULT_MAX_BODY = 256 * 1024 * 1024
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file's contents (what the Hub reports as a regular file's oid / ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    title: str
    files: dict[str, bytes]
    created: float = field(default_factory=time.time)


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)  # oid -> commit
    branches: dict[str, str] = field(default_factory=dict)  # name -> head oid
    log: list[str] = field(default_factory=list)  # oids, oldest first

    def head(self, revision: str) -> Commit | None:
        revision = unquote(revision)
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.commits:
            return self.commits[revision]
        matches = [oid for oid in self.commits if len(revision) >= 7 and oid.startswith(revision)]
        return self.commits[matches[0]] if len(matches) == 1 else None


class HubState:
    """All repositories of one server (thread-safe)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.repos: dict[tuple[str, str], Repo] = {}

    def create(self, repo_type: str, repo_id: str, private: bool) -> tuple[Repo, bool]:
        with self.lock:
            key = (repo_type, repo_id)
            if key in self.repos:
                return self.repos[key], False
            repo = Repo(repo_id=repo_id, repo_type=repo_type, private=private)
            initial = Commit(oid=_new_oid(), title="initial commit", files={".gitattributes": _GITATTRIBUTES})
            repo.commits[initial.oid] = initial
            repo.branches["main"] = initial.oid
            repo.log.append(initial.oid)
            self.repos[key] = repo
            return repo, True

    def get(self, repo_type: str, repo_id: str) -> Repo | None:
        with self.lock:
            return self.repos.get((repo_type, repo_id))


_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def _new_oid() -> str:
    return hashlib.sha1(uuid.uuid4().bytes).hexdigest()


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class _Handler(BaseHTTPRequestHandler):
    server_version = "LocalHub/1.0"
    protocol_version = "HTTP/1.1"

    # ------------------------------------------------------------------ plumbing
    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr access log
        if self.server.verbose:
            super().log_message(format, *args)

    @property
    def state(self) -> HubState:
        return self.server.state

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.server.max_body_bytes:
            raise HubError(413, f"request body of {length} bytes is over the server limit")
        if length:
            return self.rfile.read(length)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                total += size
                if total > self.server.max_body_bytes:
                    raise HubError(413, "request body is over the server limit")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, data, headers: dict | None = None):
        self._send(status, json.dumps(data).encode(), headers)

    def _error(self, err: HubError):
        headers = {"X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._json(err.status, {"error": err.message}, headers)

    def _require_token(self):
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[len("Bearer ") :].strip():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _dispatch(self):
        self.server.touch()
        try:
            parts = urlsplit(self.path)
            path, query = unquote(parts.path), parse_qs(parts.query)
            for pattern, methods, handler in _ROUTES:
                match = pattern.fullmatch(path)
                if match and self.command in methods:
                    return handler(self, query=query, **match.groupdict())
            raise HubError(404, f"no route for {self.command} {path}")
        except HubError as err:
            if self.command != "HEAD":
                self._drain()
            self._error(err)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as err:  # noqa: BLE001 - report server bugs to the client instead of hanging
            self._error(HubError(500, f"local hub server error: {type(err).__name__}: {err}"))

    def _drain(self):
        # Discard an unread request body so the connection stays usable.
        try:
            if not getattr(self, "_body_read", False):
                length = int(self.headers.get("Content-Length") or 0)
                if 0 < length <= self.server.max_body_bytes:
                    self.rfile.read(length)
        except Exception:  # noqa: BLE001
            pass

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _dispatch

    # ------------------------------------------------------------------ helpers
    def _repo(self, kind: str, repo_id: str) -> Repo:
        repo = self.state.get(REPO_TYPES.get(kind, "model"), repo_id)
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.head(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.base_url}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    def _read_json(self):
        self._body_read = True
        body = self._body()
        try:
            return json.loads(body or b"{}")
        except json.JSONDecodeError as err:
            raise HubError(400, f"invalid JSON body: {err}") from err

    # ------------------------------------------------------------------ API
    def whoami(self, query, **_):
        self._require_token()
        self._json(
            200,
            {
                "type": "user",
                "name": DEFAULT_USER,
                "fullname": "Local User",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"role": "write"}},
            },
        )

    def create_repo(self, query, **_):
        self._require_token()
        payload = self._read_json()
        name = payload.get("name")
        if not name or "/" in name:
            raise HubError(400, f"invalid repository name {name!r}")
        namespace = payload.get("organization") or DEFAULT_USER
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIX:
            raise HubError(400, f"invalid repository type {repo_type!r}")
        repo, created = self.state.create(repo_type, f"{namespace}/{name}", payload.get("visibility") == "private")
        url = self._repo_url(repo)
        if not created:
            self._json(409, {"error": "You already created this repo", "url": url})
        else:
            self._json(200, {"url": url, "name": repo.repo_id, "id": repo.repo_id})

    def delete_repo(self, query, **_):
        self._require_token()
        payload = self._read_json()
        repo_id = f"{payload.get('organization') or DEFAULT_USER}/{payload.get('name')}"
        with self.state.lock:
            found = self.state.repos.pop((payload.get("type") or "model", repo_id), None)
        if found is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        self._json(200, {})

    def validate_yaml(self, query, **_):
        self._read_json()
        self._json(200, {"errors": [], "warnings": []})

    def repo_info(self, query, kind, repo_id, revision=None, **_):
        repo = self._repo(kind, repo_id)
        commit = self._commit(repo, revision or "main")
        siblings = [
            {"rfilename": p, "size": len(d), "blobId": git_blob_sha1(d)} for p, d in sorted(commit.files.items())
        ]
        info = {
            "_id": repo.repo_id,
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(commit.created)),
            "createdAt": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(repo.commits[repo.log[0]].created)),
            "usedStorage": sum(len(d) for d in commit.files.values()),
        }
        if repo.repo_type == "model":
            try:
                config = json.loads(commit.files.get("config.json", b"{}"))
                info["config"] = {k: config[k] for k in ("architectures", "model_type") if k in config}
            except ValueError:
                pass
        self._json(200, info)

    def _entries(self, commit: Commit, prefix: str, recursive: bool) -> list[dict]:
        prefix = prefix.strip("/")
        entries, folders = [], set()
        for path, data in sorted(commit.files.items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1 :] if prefix else path
            if "/" in rest and not recursive:
                folder = (prefix + "/" if prefix else "") + rest.split("/", 1)[0]
                folders.add(folder)
                continue
            if recursive:
                parents = rest.split("/")[:-1]
                for depth in range(1, len(parents) + 1):
                    folders.add((prefix + "/" if prefix else "") + "/".join(parents[:depth]))
            entries.append({"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path})
        dirs = [
            {"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
            for f in sorted(folders)
        ]
        return dirs + entries

    def tree(self, query, kind, repo_id, revision, path="", **_):
        repo = self._repo(kind, repo_id)
        commit = self._commit(repo, revision)
        path = (path or "").strip("/")
        if path and not any(p.startswith(path + "/") for p in commit.files):
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound")
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        self._json(200, self._entries(commit, path, recursive))

    def paths_info(self, query, kind, repo_id, revision, **_):
        repo = self._repo(kind, repo_id)
        commit = self._commit(repo, revision)
        self._body_read = True
        body = self._body()
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            paths = json.loads(body or b"{}").get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        out = []
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                data = commit.files[path]
                out.append({"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path})
            elif any(p.startswith(path + "/") for p in commit.files):
                out.append(
                    {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}
                )
        self._json(200, out)

    def preupload(self, query, kind, repo_id, revision, **_):
        self._require_token()
        repo = self._repo(kind, repo_id)
        payload = self._read_json()
        commit = repo.head(revision) or repo.commits[repo.branches["main"]]
        files = []
        for item in payload.get("files", []):
            existing = commit.files.get(item["path"])
            files.append(
                {
                    "path": item["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha1(existing) if existing is not None else None,
                }
            )
        self._json(200, {"files": files, "commitOid": commit.oid})

    def commit(self, query, kind, repo_id, revision, **_):
        self._require_token()
        repo = self._repo(kind, repo_id)
        self._body_read = True
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        revision = unquote(revision)
        with self.state.lock:
            if revision not in repo.branches:
                raise HubError(404, f"Invalid rev id: {revision} (commits go to a branch)", "RevisionNotFound")
            parent = repo.commits[repo.branches[revision]]
            files = dict(parent.files)
            title = "commit"
            for line in lines:
                key, value = line.get("key"), line.get("value", {})
                if key == "header":
                    title = value.get("summary") or title
                    expected = value.get("parentCommit")
                    if expected and not parent.oid.startswith(expected):
                        raise HubError(412, f"parent commit {expected} is not the head of {revision}")
                elif key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    for path in [p for p in files if p.startswith(folder)]:
                        del files[path]
                elif key == "lfsFile":
                    raise HubError(400, "this local hub only accepts regular uploads (it answered uploadMode=regular)")
                else:
                    raise HubError(400, f"unknown commit operation {key!r}")
            new = Commit(oid=_new_oid(), title=title, files=files)
            repo.commits[new.oid] = new
            repo.branches[revision] = new.oid
            repo.log.append(new.oid)
        url = self._repo_url(repo)
        self._json(
            200,
            {
                "success": True,
                "commitOid": new.oid,
                "commitUrl": f"{url}/commit/{new.oid}",
                "pullRequestUrl": None,
                "commitMessage": title,
            },
        )

    def create_branch(self, query, kind, repo_id, branch, **_):
        self._require_token()
        repo = self._repo(kind, repo_id)
        payload = self._read_json()
        with self.state.lock:
            if branch in repo.branches:
                raise HubError(409, f"Branch {branch} already exists")
            start = repo.head(payload.get("startingPoint") or "main")
            if start is None:
                raise HubError(404, "starting point not found", "RevisionNotFound")
            repo.branches[unquote(branch)] = start.oid
        self._json(200, {})

    def refs(self, query, kind, repo_id, **_):
        repo = self._repo(kind, repo_id)
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": oid} for n, oid in repo.branches.items()]
        self._json(200, {"branches": branches, "converts": [], "tags": [], "pullRequests": None})

    def commits(self, query, kind, repo_id, revision, **_):
        repo = self._repo(kind, repo_id)
        head = self._commit(repo, revision)
        oids = repo.log[: repo.log.index(head.oid) + 1][::-1]
        self._json(
            200,
            [
                {
                    "id": oid,
                    "title": repo.commits[oid].title,
                    "message": "",
                    "authors": [],
                    "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(repo.commits[oid].created)),
                }
                for oid in oids
            ],
        )

    def resolve(self, query, prefix, repo_id, revision, path, **_):
        repo = self.state.get(REPO_TYPES.get((prefix or "").strip("/"), "model"), repo_id)
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        commit = self._commit(repo, revision)
        data = commit.files.get(path)
        if data is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        etag = git_blob_sha1(data)
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        start = 0
        ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if ranged and self.command == "GET" and int(ranged.group(1)) < len(data):
            start = int(ranged.group(1))
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self._send(206, data[start:], headers, content_type="application/octet-stream")
            return
        self._send(200, data, headers, content_type="application/octet-stream")


_KIND = r"(?P<kind>models|datasets|spaces)"
_REPO = r"(?P<repo_id>[^/]+/[^/]+)"
_ROUTES = [
    (re.compile(r"/api/whoami(?:-v2)?"), {"GET"}, _Handler.whoami),
    (re.compile(r"/api/repos/create"), {"POST"}, _Handler.create_repo),
    (re.compile(r"/api/repos/delete"), {"DELETE"}, _Handler.delete_repo),
    (re.compile(r"/api/validate-yaml"), {"POST"}, _Handler.validate_yaml),
    (re.compile(rf"/api/{_KIND}/{_REPO}/preupload/(?P<revision>[^/]+)"), {"POST"}, _Handler.preupload),
    (re.compile(rf"/api/{_KIND}/{_REPO}/commit/(?P<revision>[^/]+)"), {"POST"}, _Handler.commit),
    (re.compile(rf"/api/{_KIND}/{_REPO}/branch/(?P<branch>.+)"), {"POST"}, _Handler.create_branch),
    (re.compile(rf"/api/{_KIND}/{_REPO}/refs"), {"GET"}, _Handler.refs),
    (re.compile(rf"/api/{_KIND}/{_REPO}/commits/(?P<revision>[^/]+)"), {"GET"}, _Handler.commits),
    (re.compile(rf"/api/{_KIND}/{_REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?"), {"GET"}, _Handler.tree),
    (re.compile(rf"/api/{_KIND}/{_REPO}/paths-info/(?P<revision>[^/]+)"), {"POST"}, _Handler.paths_info),
    (re.compile(rf"/api/{_KIND}/{_REPO}(?:/revision/(?P<revision>[^/]+))?"), {"GET"}, _Handler.repo_info),
    (
        re.compile(rf"/(?P<prefix>datasets/|spaces/)?{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)"),
        {"GET", "HEAD"},
        _Handler.resolve,
    ),
]


class LocalHubServer(ThreadingHTTPServer):
    """The server. ``with LocalHubServer() as server:`` serves on a free port in a daemon thread."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        port: int = 0,
        lifetime: float = DEFAULT_LIFETIME,
        max_body_bytes: int = DEFAULT_MAX_BODY,
        verbose: bool = False,
    ):
        super().__init__(("127.0.0.1", port), _Handler)
        self.state = HubState()
        self.lifetime = float(lifetime)
        self.max_body_bytes = int(max_body_bytes)
        self.verbose = verbose
        self.started = time.monotonic()
        self.last_request = self.started
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def touch(self) -> None:
        self.last_request = time.monotonic()

    def client_env(self, hf_home: str | os.PathLike | None = None, token: str = "hf_local_dummy_token") -> dict:
        """Environment variables that point ``huggingface_hub`` (in a new process) at this server."""
        env = {
            "HF_ENDPOINT": self.url,
            "HF_TOKEN": token,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_ETAG_TIMEOUT": "30",
            "HF_HUB_DOWNLOAD_TIMEOUT": "60",
        }
        if hf_home is not None:
            env["HF_HOME"] = os.fspath(hf_home)
        return env

    def start(self) -> LocalHubServer:
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True, name="local-hub-server"
        )
        self._thread.start()
        self._watchdog = threading.Thread(target=self._watch, daemon=True, name="local-hub-watchdog")
        self._watchdog.start()
        return self

    def _watch(self, parent_pid: int | None = None) -> None:
        while not self._stopped.wait(0.5):
            expired = time.monotonic() - self.started > self.lifetime
            orphaned = parent_pid is not None and os.getppid() != parent_pid
            if expired or orphaned:
                threading.Thread(target=self.stop, daemon=True).start()
                return

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.shutdown()
        self.server_close()

    def __enter__(self) -> LocalHubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Local Hugging Face Hub-compatible server (127.0.0.1, in memory).")
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    parser.add_argument("--lifetime", type=float, default=DEFAULT_LIFETIME, help="stop after this many seconds")
    parser.add_argument("--parent-pid", type=int, default=os.getppid(), help="stop when this process exits")
    parser.add_argument("--verbose", action="store_true", help="log requests to stderr")
    args = parser.parse_args(argv)
    server = LocalHubServer(port=args.port, lifetime=args.lifetime, verbose=args.verbose)
    print(server.url, flush=True)

    def _stop(*_):
        threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    watchdog = threading.Thread(target=server._watch, args=(args.parent_pid,), daemon=True)
    watchdog.start()
    server.serve_forever(poll_interval=0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
