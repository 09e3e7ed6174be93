"""A loopback stand-in for the part of the Hugging Face Hub API that ``huggingface_hub`` (2.4)
uses to push a folder: whoami, repo creation, branch creation, model info, README metadata
validation, pre-upload, the git-LFS batch API with the ``basic`` transfer (single PUT plus verify),
and the NDJSON commit endpoint.

It keeps repositories in memory (files per branch, LFS blobs by sha256) so that tests can assert
byte-identity, records every request with its headers, and can be told to fail: ``fail("commit",
503, times=1)`` answers the next commit with a 503 and then behaves again.

The server never advertises Xet: the client decides between Xet and LFS on its own side
(``hf_xet`` installed and ``HF_HUB_DISABLE_XET`` unset means Xet), so tests that use this server
set ``HF_HUB_DISABLE_XET=1``; the LFS batch answer then names ``basic`` as the transfer.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from loopback import serve, stop

# The Hub's default .gitattributes sends these through LFS; so do binary samples and big files.
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.onnx",
                "*.msgpack", "*.model", "*.npy", "*.npz", "*.pkl", "*.zip", "*.tar", "*.gz",
                "*.png", "*.jpg")
LFS_SIZE = 10 * 1024 * 1024
BAD_TOKEN_MESSAGE = "Invalid credentials in Authorization header"  # what the real Hub says


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    endpoint: str
    body: bytes = b""  # kept for API calls, not for LFS uploads
    status: int = 0


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})
    commits: list[dict[str, Any]] = field(default_factory=list)
    prs: int = 0


@dataclass
class Failure:
    endpoint: str
    status: int
    times: int
    message: str


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


def is_lfs(path: str, size: int, sample: bytes) -> bool:
    return (size >= LFS_SIZE or b"\0" in sample
            or any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) for p in LFS_PATTERNS))


_ROUTES: list[tuple[str, str, re.Pattern]] = [
    ("GET", "whoami", re.compile(r"^/api/whoami-v2$")),
    ("POST", "create", re.compile(r"^/api/repos/create$")),
    ("POST", "validate_yaml", re.compile(r"^/api/validate-yaml$")),
    ("POST", "preupload", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>.+)$")),
    ("POST", "commit", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>.+)$")),
    ("POST", "branch", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>.+)$")),
    ("GET", "model_info", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+?)(?:/revision/(?P<rev>.+))?$")),
    ("POST", "lfs_batch", re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$")),
    ("PUT", "lfs_upload", re.compile(r"^/lfs-storage/(?P<oid>[0-9a-f]{64})$")),
    ("POST", "lfs_verify", re.compile(r"^/lfs-verify/(?P<oid>[0-9a-f]{64})$")),
]


class HubServer:
    """``with HubServer(tokens={"hf_x": ("alice", "write")}) as hub: ... hub.url ...``"""

    def __init__(self, tokens: dict[str, tuple[str, str]] | None = None,
                 orgs: dict[str, list[str]] | None = None) -> None:
        self.tokens = dict(tokens or {})  # token -> (user name, role: read | write)
        self.orgs = dict(orgs or {})  # user -> organisations they may write to
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[Recorded] = []
        self.failures: list[Failure] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> "HubServer":
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd, self._thread = serve(handler)
        return self

    def __exit__(self, *exc) -> None:
        assert self._httpd is not None and self._thread is not None
        stop(self._httpd, self._thread)

    @property
    def url(self) -> str:
        assert self._httpd is not None, "use the server as a context manager"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # ---- test controls -------------------------------------------------------------------
    def fail(self, endpoint: str, status: int, times: int = 1, message: str = "") -> None:
        """Answer the next ``times`` calls to ``endpoint`` (a route name) with ``status``."""
        self.failures.append(Failure(endpoint, status, times, message or f"injected {status}"))

    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None, private: bool = False) -> Repo:
        repo = self.repos[repo_id] = Repo(repo_id, private)
        if files:
            repo.branches["main"].update(files)
            repo.heads["main"] = hashlib.sha1(repr(sorted(files)).encode()).hexdigest()
        return repo

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].branches[revision])

    def calls(self, endpoint: str) -> list[Recorded]:
        return [r for r in self.requests if r.endpoint == endpoint]

    # ---- helpers used by the handler -----------------------------------------------------
    def take_failure(self, endpoint: str) -> Failure | None:
        with self._lock:
            for f in self.failures:
                if f.endpoint == endpoint and f.times > 0:
                    f.times -= 1
                    return f
        return None

    def user_for(self, headers: dict[str, str]) -> tuple[str, str] | None:
        auth = headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            return None
        return self.tokens.get(auth[7:].strip())

    def can_write(self, user: str, role: str, namespace: str) -> bool:
        return role == "write" and (namespace == user or namespace in self.orgs.get(user, []))


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    # ---- plumbing ------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self._rec.status = status

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        name, match = "unknown", None
        for m, n, pattern in _ROUTES:
            if m == method and (match := pattern.match(path)):
                name = n
                break
        body = self._body()
        self._rec = Recorded(method, path, parse_qs(parts.query),
                             {k.lower(): v for k, v in self.headers.items()}, name,
                             body if name != "lfs_upload" else b"")
        self.hub.requests.append(self._rec)
        if match is None:
            return self._error(404, f"no route for {method} {path}")
        failure = self.hub.take_failure(name)
        if failure is not None:
            if failure.status == 401:
                return self._error(401, BAD_TOKEN_MESSAGE)
            return self._error(failure.status, failure.message)
        if name in ("lfs_upload",):  # presigned storage URL: no Hub token needed
            return self._lfs_upload(match, body)
        who = self.hub.user_for(self._rec.headers)
        if who is None:
            return self._error(401, BAD_TOKEN_MESSAGE)
        getattr(self, f"_{name}")(match, body, who)

    def _repo(self, repo_id: str, who: tuple[str, str], write: bool) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, f"Repository {repo_id} not found", "RepoNotFound")
            return None
        if write and not self.hub.can_write(*who, repo_id.split("/")[0]):
            self._error(403, f"You don't have the rights to write to {repo_id}")
            return None
        return repo

    # ---- endpoints -----------------------------------------------------------------------
    def _whoami(self, match, body, who) -> None:
        user, role = who
        self._send(200, {"type": "user", "name": user,
                         "orgs": [{"name": o} for o in self.hub.orgs.get(user, [])],
                         "auth": {"type": "access_token",
                                  "accessToken": {"displayName": "test", "role": role}}})

    def _create(self, match, body, who) -> None:
        req = json.loads(body)
        if req.get("type", "model") != "model":
            return self._error(400, "this test server only holds model repos")
        namespace = req.get("organization") or who[0]
        repo_id = f"{namespace}/{req['name']}"
        if not self.hub.can_write(*who, namespace):
            return self._error(403, f"You don't have the rights to create a model under the namespace "
                                    f"\"{namespace}\"")
        if repo_id in self.hub.repos:
            return self._send(409, {"error": "You already created this model repo",
                                    "url": f"{self.hub.url}/{repo_id}"},
                              {"X-Error-Message": "You already created this model repo"})
        self.hub.add_repo(repo_id, private=req.get("visibility") == "private")
        self._send(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def _branch(self, match, body, who) -> None:
        repo = self._repo(match["repo"], who, write=True)
        if repo is None:
            return
        branch = match["rev"]
        if branch in repo.branches:
            return self._error(409, f"Branch {branch} already exists")
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        repo.branches[branch] = dict(repo.branches[start])
        repo.heads[branch] = repo.heads[start]
        self._send(200, {})

    def _model_info(self, match, body, who) -> None:
        repo = self._repo(match["repo"], who, write=False)
        if repo is None:
            return
        rev = match["rev"] or "main"
        if rev not in repo.branches:
            return self._error(404, f"Revision {rev} not found", "RevisionNotFound")
        self._send(200, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.heads[rev],
                         "private": repo.private,
                         "siblings": [{"rfilename": p} for p in sorted(repo.branches[rev])]})

    def _validate_yaml(self, match, body, who) -> None:
        import yaml

        content = json.loads(body)["content"]
        m = re.match(r"^---\n(.*?)\n---\n", content, flags=re.S)
        if m is None:
            return self._send(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
        try:
            meta = yaml.safe_load(m.group(1))
        except yaml.YAMLError as e:
            return self._send(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
        if not isinstance(meta, dict):
            return self._send(400, {"errors": [{"message": "metadata must be a mapping"}]})
        self._send(200, {"errors": [], "warnings": []})

    def _preupload(self, match, body, who) -> None:
        repo = self._repo(match["repo"], who, write=True)
        if repo is None:
            return
        rev = match["rev"]
        existing = repo.branches.get(rev, {})
        out = []
        for f in json.loads(body)["files"]:
            sample = base64.b64decode(f["sample"])
            mode = "lfs" if is_lfs(f["path"], f["size"], sample) else "regular"
            old = existing.get(f["path"])
            oid = None
            if old is not None:
                oid = hashlib.sha256(old).hexdigest() if mode == "lfs" else git_blob_sha1(old)
            out.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": out, "commitOid": repo.heads.get(rev)})

    def _lfs_batch(self, match, body, who) -> None:
        if self._repo(match["repo"], who, write=True) is None:
            return
        req = json.loads(body)
        if req.get("operation") != "upload" or "basic" not in req.get("transfers", ["basic"]):
            return self._error(400, "only upload with the basic transfer is supported here")
        objects = []
        for obj in req["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs:
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs-storage/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{self.hub.url}/lfs-verify/{obj['oid']}", "header": {}},
                }
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_upload(self, match, body) -> None:
        if hashlib.sha256(body).hexdigest() != match["oid"]:
            return self._error(400, "uploaded content does not match its sha256")
        self.hub.lfs[match["oid"]] = body
        self._send(200)

    def _lfs_verify(self, match, body, who) -> None:
        req = json.loads(body)
        blob = self.hub.lfs.get(match["oid"])
        if blob is None or len(blob) != req.get("size") or req.get("oid") != match["oid"]:
            return self._error(404, "object not found in LFS storage")
        self._send(200, {})

    def _commit(self, match, body, who) -> None:
        repo = self._repo(match["repo"], who, write=True)
        if repo is None:
            return
        rev = match["rev"]
        create_pr = self._rec.query.get("create_pr") == ["1"]
        if rev not in repo.branches:
            return self._error(404, f"Revision {rev} not found", "RevisionNotFound")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return self._error(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != repo.heads[rev]:
            return self._error(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.branches[rev])
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                blob = self.hub.lfs.get(value["oid"])
                if blob is None or ("size" in value and len(blob) != value["size"]):
                    return self._error(400, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                files[value["path"]] = blob
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:
                return self._error(400, f"unsupported commit operation {key}")
        oid = hashlib.sha1(f"{repo.repo_id}{len(repo.commits)}{header}".encode()).hexdigest()
        target = rev
        pr_url = None
        if create_pr:
            repo.prs += 1
            target = f"refs/pr/{repo.prs}"
            pr_url = f"{self.hub.url}/{repo.repo_id}/discussions/{repo.prs}"
        repo.branches[target] = files
        repo.heads[target] = oid
        repo.commits.append({"oid": oid, "branch": target, "summary": header.get("summary"),
                             "description": header.get("description")})
        self._send(200, {"commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{oid}",
                         "commitOid": oid, "pullRequestUrl": pr_url, "success": True})
