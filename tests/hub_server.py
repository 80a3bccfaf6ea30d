"""A small in-process stand-in for the Hugging Face Hub HTTP API, for tests that must not use the network.

It implements only what huggingface_hub (2.x) calls for awqpad's Hub features, with the headers the real
Hub sends so the library raises its own typed errors:

  GET  /api/models/{repo}[/revision/{rev}]        repo info (sha, siblings; sizes with ?blobs=true)
  GET  /api/models/{repo}/tree/{rev}[/{path}]     file listing (recursive or not), LFS info for *.safetensors
  HEAD /{repo}/resolve/{rev}/{path}               X-Repo-Commit, ETag, Content-Length, Accept-Ranges
  GET  /{repo}/resolve/{rev}/{path}               the bytes, honouring `Range: bytes=a-b` / `bytes=a-` (206)
  GET  /api/whoami-v2                             the token's user, organisations and role (read / write)
  POST /api/repos/create                          create a repo (409 if it exists)
  POST /api/validate-yaml                         README metadata check (always fine)
  POST /api/models/{repo}/preupload/{rev}         upload mode: always "regular" (content inline in the commit)
  POST /api/models/{repo}/commit/{rev}            ndjson commit: header, file (base64), deletedFile/Folder

Errors as the Hub sends them: 404/401 + `X-Error-Code: RepoNotFound`, 404 + `RevisionNotFound` /
`EntryNotFound`, 401/403 + `GatedRepo`, 401 "Invalid credentials in Authorization header" for an unknown
token, 429 for repos marked rate-limited. Private repos need `Authorization: Bearer <token>`.

Every response body byte is counted per (method, path) in `sent`, so tests can assert what was fetched.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

TOKEN = "hf_awqpad_test_token"
READ_TOKEN = "hf_awqpad_read_only_token"  # reads like TOKEN; writes get 403; whoami says role "read"
USER, ORGS = "me", ("org",)  # whoami of both tokens: may write to me/* and org/*
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


Content = bytes | Path  # file content, or a file on disk served lazily (for huge sparse fixtures)


def size_of(data: Content) -> int:
    return data.stat().st_size if isinstance(data, Path) else len(data)


def read_range(data: Content, start: int = 0, end: int | None = None) -> bytes:
    """Bytes [start, end] (inclusive) of a file."""
    stop = size_of(data) if end is None else end + 1
    if isinstance(data, Path):
        with open(data, "rb") as fh:
            fh.seek(start)
            return fh.read(stop - start)
    return data[start:stop]


def git_blob_oid(data: Content) -> str:
    if isinstance(data, Path):  # not the real git oid: hashing a 40 GB sparse file would take a minute
        return hashlib.sha1(f"lazy:{data}:{size_of(data)}".encode()).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256_of(data: Content) -> str:
    if isinstance(data, Path):
        return hashlib.sha256(f"lazy:{data}:{size_of(data)}".encode()).hexdigest()
    return hashlib.sha256(data).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith((".safetensors", ".bin", ".pt", ".pth", ".gguf"))


@dataclass
class FakeRepo:
    repo_id: str
    private: bool = False
    gated: bool = False
    rate_limited: bool = False
    refs: dict[str, str] = field(default_factory=dict)  # branch / tag -> commit sha
    commits: dict[str, dict[str, Content]] = field(default_factory=dict)  # sha -> {path: content}
    messages: dict[str, str] = field(default_factory=dict)

    def commit(self, files: dict[str, Content], branch: str = "main", message: str = "commit") -> str:
        parent = self.refs.get(branch, "")
        h = hashlib.sha1(parent.encode() + message.encode())
        for path in sorted(files):
            h.update(path.encode() + b"\0" + sha256_of(files[path]).encode())
        sha = h.hexdigest()
        self.commits[sha] = dict(files)
        self.messages[sha] = message
        self.refs[branch] = sha
        return sha

    def resolve(self, rev: str) -> str | None:
        if rev in self.refs:
            return self.refs[rev]
        if rev in self.commits:
            return rev
        matches = [sha for sha in self.commits if len(rev) >= 7 and sha.startswith(rev)]
        return matches[0] if len(matches) == 1 else None

    @property
    def head(self) -> dict[str, bytes]:
        return {path: read_range(data) for path, data in self.commits[self.refs["main"]].items()}


def read_dir(root: Path, lazy: bool = False) -> dict[str, Content]:
    return {p.relative_to(root).as_posix(): (p if lazy else p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


class HubServer:
    """`with HubServer() as hub: hub.add_repo("org/name", path)`; point HF_ENDPOINT at `hub.url`."""

    def __init__(self, token: str = TOKEN):
        self.token = token
        self.repos: dict[str, FakeRepo] = {}
        self.sent: Counter = Counter()  # (method, path) -> response body bytes
        self.log: list[tuple[str, str, int, str | None]] = []  # method, path, status, Range header
        self.lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- fixtures ---------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: Path | dict[str, Content], *, private: bool = False, gated: bool = False,
                 branch: str = "main", message: str = "initial commit", lazy: bool = False) -> str:
        """Add a commit of `files` (a directory, or {path: content}) on `branch`; returns its sha.
        lazy=True serves a directory's files from disk instead of memory (huge sparse fixtures)."""
        repo = self.repos.get(repo_id) or FakeRepo(repo_id, private=private, gated=gated)
        self.repos[repo_id] = repo
        content = read_dir(files, lazy) if isinstance(files, Path) else dict(files)
        content.setdefault(".gitattributes", GITATTRIBUTES)
        return repo.commit(content, branch=branch, message=message)

    def tag(self, repo_id: str, tag: str, commit: str) -> None:
        self.repos[repo_id].refs[tag] = commit

    def reset(self) -> None:
        with self.lock:
            self.sent.clear()
            self.log.clear()

    def bytes_sent(self, suffix: str = "", method: str | None = None) -> int:
        with self.lock:
            return sum(n for (m, path), n in self.sent.items()
                       if path.endswith(suffix) and (method is None or m == method))

    def requests(self, suffix: str = "") -> list[tuple[str, str, int, str | None]]:
        with self.lock:
            return [r for r in self.log if r[1].endswith(suffix)]

    # -- lifecycle --------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    server_hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet
        pass

    # -- plumbing ---------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_length: int | None = None) -> None:
        hub = self.server_hub
        path = urlsplit(self.path).path
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        with hub.lock:
            hub.sent[(self.command, path)] += 0 if self.command == "HEAD" else len(body)
            hub.log.append((self.command, path, status, self.headers.get("Range")))

    def _json(self, status: int, data, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str | None, message: str, extra: dict | None = None) -> None:
        headers = {"X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers)

    def _token(self) -> tuple[bool, bool]:
        """(sent a token, it is the valid one)."""
        auth = self.headers.get("Authorization") or ""
        if not auth:
            return False, False
        return True, auth.removeprefix("Bearer ").strip() in (self.server_hub.token, READ_TOKEN)

    def _writer(self) -> bool:
        return (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip() == self.server_hub.token

    def _check_auth(self) -> bool:
        sent, valid = self._token()
        if sent and not valid:
            self._error(401, None, "Invalid credentials in Authorization header")
            return False
        return True

    def _repo(self, repo_id: str, *, files: bool = False) -> FakeRepo | None:
        """The repo if this request may read it; otherwise sends the Hub's error and returns None."""
        hub = self.server_hub
        sent, valid = self._token()
        repo = hub.repos.get(repo_id)
        if repo is None or (repo.private and not valid):
            # The Hub answers 401 to anonymous requests for both missing and private repos.
            status = 404 if valid else 401
            self._error(status, "RepoNotFound", "Repository not found" if valid else "Invalid username or password.")
            return None
        if repo.rate_limited:
            self._error(429, None, "You have been rate-limited; retry later", {"RateLimit": '"api";r=0;t=30'})
            return None
        if files and repo.gated and not valid:
            self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it and "
                        "be authenticated to access it. Please log in.")
            return None
        return repo

    def _rev(self, repo: FakeRepo, rev: str) -> str | None:
        sha = repo.resolve(rev)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return sha

    def _at(self, repo_id: str, rev: str, *, files: bool = False) -> tuple[FakeRepo, str] | None:
        """(repo, commit sha) if this request may read `repo_id` at `rev`; otherwise the Hub's error is sent."""
        repo = self._repo(repo_id, files=files)
        if repo is None:
            return None
        sha = self._rev(repo, rev)
        return None if sha is None else (repo, sha)

    @staticmethod
    def _split(path: str) -> list[str]:
        return [unquote(p) for p in path.split("/") if p != ""]

    # -- routes -----------------------------------------------------------------------------------
    def do_HEAD(self):
        self._route()

    def do_GET(self):
        self._route()

    def do_POST(self):
        self._route()

    def _route(self) -> None:
        try:
            if not self._check_auth():
                return
            url = urlsplit(self.path)
            parts = self._split(url.path)
            query = parse_qs(url.query)
            if self.command == "POST":
                body = self._body()
                if parts == ["api", "repos", "create"]:
                    return self._create(json.loads(body or b"{}"))
                if parts == ["api", "validate-yaml"]:
                    return self._json(200, {"errors": [], "warnings": []})
                if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
                    return self._preupload(f"{parts[2]}/{parts[3]}", "/".join(parts[5:]), json.loads(body or b"{}"))
                if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
                    return self._commit(f"{parts[2]}/{parts[3]}", "/".join(parts[5:]), body)
            elif parts == ["api", "whoami-v2"]:
                return self._whoami()
            elif len(parts) >= 4 and parts[:2] == ["api", "models"]:
                repo_id = f"{parts[2]}/{parts[3]}"
                if len(parts) == 4:
                    return self._info(repo_id, "main", query)
                if parts[4] == "revision" and len(parts) >= 6:
                    return self._info(repo_id, "/".join(parts[5:]), query)
                if parts[4] == "tree" and len(parts) >= 6:
                    return self._tree(repo_id, parts[5], "/".join(parts[6:]), query)
            elif len(parts) >= 5 and parts[2] == "resolve":
                raw = [p for p in url.path.split("/") if p]  # the revision is one %-quoted segment
                return self._resolve(f"{parts[0]}/{parts[1]}", unquote(raw[3]), "/".join(unquote(p) for p in raw[4:]))
            self._error(404, None, f"fake hub: no route for {self.command} {url.path}")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _info(self, repo_id: str, rev: str, query: dict) -> None:
        found = self._at(repo_id, rev)
        if found is None:
            return
        repo, sha = found
        files = repo.commits[sha]
        blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path, data in sorted(files.items()):
            entry = {"rfilename": path}
            if blobs:
                entry.update(size=size_of(data), blobId=git_blob_oid(data))
                if is_lfs(path):
                    entry["lfs"] = {"sha256": sha256_of(data), "size": size_of(data), "pointerSize": 134}
            siblings.append(entry)
        self._json(200, {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
            "author": repo_id.split("/")[0], "sha": sha, "lastModified": "2025-01-01T00:00:00.000Z",
            "private": repo.private, "gated": "auto" if repo.gated else False, "disabled": False,
            "downloads": 0, "likes": 0, "tags": [], "library_name": "transformers", "siblings": siblings,
            "createdAt": "2025-01-01T00:00:00.000Z",
        })

    def _tree(self, repo_id: str, rev: str, prefix: str, query: dict) -> None:
        found = self._at(repo_id, rev)
        if found is None:
            return
        repo, sha = found
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = prefix.strip("/")
        base = prefix + "/" if prefix else ""
        entries, dirs = [], set()
        for path, data in sorted(repo.commits[sha].items()):
            if not path.startswith(base):
                continue
            rest = path[len(base):]
            if "/" in rest and not recursive:
                dirs.add(base + rest.split("/")[0])
                continue
            if recursive:
                parent = path.rsplit("/", 1)[0] if "/" in rest else None
                while parent and parent + "/" != base and parent.startswith(base):
                    dirs.add(parent)
                    parent = parent.rsplit("/", 1)[0] if "/" in parent else None
            entry = {"type": "file", "oid": git_blob_oid(data), "size": size_of(data), "path": path}
            if is_lfs(path):
                entry["lfs"] = {"oid": sha256_of(data), "size": size_of(data), "pointerSize": 134}
            entries.append(entry)
        if not entries and not dirs and prefix:
            return self._error(404, "EntryNotFound", f"{prefix} does not exist on {rev}")
        folders = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d} for d in sorted(dirs)]
        self._json(200, folders + entries)

    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        found = self._at(repo_id, rev, files=True)
        if found is None:
            return
        repo, sha = found
        data = repo.commits[sha].get(path)
        if data is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}", {"X-Repo-Commit": sha})
        size = size_of(data)
        etag = sha256_of(data) if is_lfs(path) else git_blob_oid(data)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        rng = self.headers.get("Range")
        if rng:
            try:
                unit, spec = rng.split("=", 1)
                start_s, end_s = spec.split(",")[0].strip().split("-", 1)
                start = int(start_s) if start_s else max(0, size - int(end_s))
                end = min(int(end_s), size - 1) if end_s and start_s else size - 1
                if unit.strip() != "bytes" or start >= size or end < start:
                    raise ValueError(rng)
            except ValueError:
                return self._send(416, b"", {**headers, "Content-Range": f"bytes */{size}"})
            body = b"" if self.command == "HEAD" else read_range(data, start, end)
            return self._send(206, body, {**headers, "Content-Range": f"bytes {start}-{end}/{size}"},
                              content_length=end - start + 1)
        body = b"" if self.command == "HEAD" else read_range(data)
        self._send(200, body, headers, content_length=size)

    # -- writes -----------------------------------------------------------------------------------
    def _whoami(self) -> None:
        sent, valid = self._token()
        if not valid:
            return self._error(401, None, "Invalid username or password.")
        role = "write" if self._writer() else "read"
        self._json(200, {"type": "user", "name": USER, "fullname": USER,
                         "orgs": [{"type": "org", "name": org, "roleInOrg": "write"} for org in ORGS],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": role}}})

    def _need_write(self) -> bool:
        sent, valid = self._token()
        if not valid:
            self._error(401, None, "Invalid username or password.")
            return False
        if not self._writer():
            self._error(403, None, "You don't have the rights to write to this repo (read-only token)")
            return False
        return True

    def _create(self, payload: dict) -> None:
        if not self._need_write():
            return
        hub = self.server_hub
        name, org = payload.get("name"), payload.get("organization")
        repo_id = f"{org}/{name}" if org else f"user/{name}"
        if (payload.get("type") or "model") != "model":
            return self._error(400, None, "fake hub: models only")
        if repo_id in hub.repos:
            return self._json(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"},
                              {"X-Error-Message": "You already created this model repo"})
        private = payload.get("private")
        if private is None:
            private = payload.get("visibility", "public") == "private"
        repo = FakeRepo(repo_id, private=bool(private))
        repo.commit({".gitattributes": GITATTRIBUTES}, message="initial commit")
        hub.repos[repo_id] = repo
        self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": hashlib.md5(repo_id.encode()).hexdigest()[:24]})

    def _preupload(self, repo_id: str, rev: str, payload: dict) -> None:
        if not self._need_write():
            return
        found = self._at(repo_id, rev)
        if found is None:
            return
        repo, sha = found
        current = repo.commits[sha]
        files = []
        for f in payload.get("files", []):
            existing = current.get(f["path"])
            files.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                          "oid": git_blob_oid(existing) if existing is not None else None})
        self._json(200, {"files": files, "commitOid": sha})

    def _commit(self, repo_id: str, rev: str, body: bytes) -> None:
        if not self._need_write():
            return
        hub = self.server_hub
        found = self._at(repo_id, rev)
        if found is None:
            return
        repo, sha = found
        files = dict(repo.commits[sha])
        summary = "commit"
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary") or summary
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else value["content"].encode()
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(prefix)}
            else:
                return self._error(400, None, f"fake hub: unsupported commit operation {key!r} (LFS uploads are not emulated)")
        branch = rev if rev in repo.refs else "main"
        new = repo.commit(files, branch=branch, message=summary)
        self._json(200, {"success": True, "commitOid": new, "commitUrl": f"{hub.url}/{repo_id}/commit/{new}",
                         "hookOutput": ""})


def hub_url(hub: HubServer, repo_id: str, filename: str, rev: str = "main") -> str:
    return f"{hub.url}/{repo_id}/resolve/{quote(rev, safe='')}/{quote(filename)}"


def patch_hub_env(monkeypatch, endpoint: str, hf_home: Path, *, offline: bool = False, token: str | None = None) -> None:
    """Point an *already imported* huggingface_hub at `endpoint` / `hf_home`, for in-process tests.

    huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE into `huggingface_hub.constants` when it
    is imported, so setting the variables is not enough in-process: the derived constants are patched too
    (and the environment set, for anything that reads it at call time, such as HF_TOKEN). Tests of the
    environment handling itself run the CLI in a fresh interpreter instead."""
    import os

    from huggingface_hub import constants as c

    for key in list(os.environ):
        if key.startswith(("HF_", "HUGGINGFACE_")):
            monkeypatch.delenv(key)
    hf_home = Path(hf_home)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if token is not None:
        monkeypatch.setenv("HF_TOKEN", token)
    values = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(hf_home / "hub"),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "HF_HUB_OFFLINE": offline,
    }
    for name, value in values.items():
        if hasattr(c, name):
            monkeypatch.setattr(c, name, value)


def client_env(hub: HubServer, hf_home, root, **extra: str) -> dict:
    """Environment for an awqpad subprocess that talks to `hub` only: no inherited HF_* settings, no
    AWQPAD_DEBUG (tracebacks would hide the one-line errors under test), a private HF_HOME."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "AWQPAD_DEBUG"}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(root), **extra)
    return env
