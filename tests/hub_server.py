"""A tiny in-memory Hugging Face Hub for tests: just the endpoints `push_to_hub` and `hf_hub_download` use.

Write side (as called by huggingface_hub's HfApi): create_repo, create_branch, validate-yaml, preupload
(always answers "regular": files travel base64-encoded inside the ndjson commit, no LFS, no Xet) and commit
(with create_pr). Read side: HEAD/GET `/{repo_id}/resolve/{revision}/{path}` with the ETag,
X-Repo-Commit and Content-Length headers hf_hub_download needs. Everything else answers 404.

Use as a context manager; the server also stops by itself after `max_seconds`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Repo:
    private: bool = False
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}
    messages: dict[str, str] = field(default_factory=dict)
    upload_modes: list[str] = field(default_factory=list)
    num_prs: int = 0

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


def _git_blob_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class FakeHub:
    def __init__(self, token: str | None = None, max_seconds: float = 120.0):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.max_seconds = max_seconds
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        # A forgotten server must not outlive the test session.
        self._timer = threading.Timer(self.max_seconds, self._server.shutdown)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------ repo operations
    def create_repo(self, repo_id: str, private: bool) -> bool:
        with self.lock:
            if repo_id in self.repos:
                return False
            repo = Repo(private=private)
            # Like the Hub, a new repo starts with one commit holding .gitattributes.
            files = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
            sha = self._new_commit(repo, files, "initial commit")
            repo.refs["main"] = sha
            self.repos[repo_id] = repo
            return True

    @staticmethod
    def _new_commit(repo: Repo, files: dict[str, bytes], message: str) -> str:
        digest = hashlib.sha1(str(len(repo.commits)).encode() + message.encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + files[path])
        sha = digest.hexdigest()
        repo.commits[sha] = files
        repo.messages[sha] = message
        return sha


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub

    def log_message(self, format: str, *args) -> None:  # keep test output clean
        pass

    # ------------------------------------------------------------------ helpers
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj: object, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(
        self, status: int, code: str | None, message: str, head: bool = False, extra: dict | None = None
    ) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers, head=head)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _authorized(self) -> bool:
        token = self.hub.token
        if token is None or self.headers.get("Authorization") == f"Bearer {token}":
            return True
        self._error(401, None, "Invalid credentials in Authorization header")
        return False

    def _parts(self) -> tuple[list[str], dict[str, list[str]]]:
        split = urlsplit(self.path)
        with self.hub.lock:
            self.hub.requests.append((self.command, split.path))
        # Split before unquoting: revisions such as refs/pr/1 arrive as one %2F-quoted segment.
        return [unquote(p) for p in split.path.strip("/").split("/")], parse_qs(split.query)

    def _repo(self, repo_id: str, head: bool = False) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", head=head)
        return repo

    # ------------------------------------------------------------------ verbs
    def do_POST(self) -> None:
        parts, query = self._parts()
        body = self._body()
        if parts == ["api", "validate-yaml"]:
            return self._json(200, {"errors": [], "warnings": []})
        if not self._authorized():
            return None
        if parts == ["api", "repos", "create"]:
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            answer = {"url": f"{self.hub.url}/{repo_id}", "name": repo_id}
            if not self.hub.create_repo(repo_id, payload.get("visibility") == "private"):
                # The Hub's 409 still carries the repo url, which create_repo(exist_ok=True) returns.
                return self._json(409, {"error": "You already created this model repo", **answer})
            return self._json(200, answer)
        if len(parts) >= 6 and parts[:2] == ["api", "models"]:
            repo_id, action, revision = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
            repo = self._repo(repo_id)
            if repo is None:
                return None
            if action == "branch":
                return self._create_branch(repo, revision, json.loads(body or b"{}"))
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._json(
                    200,
                    {
                        "files": [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                            for f in files
                        ]
                    },
                )
            if action == "commit":
                return self._commit(repo_id, repo, revision, body, create_pr=query.get("create_pr") == ["1"])
        return self._error(404, None, f"no route for POST {self.path}")

    def _create_branch(self, repo: Repo, branch: str, payload: dict) -> None:
        with self.hub.lock:
            if branch in repo.refs:
                return self._error(409, None, "Reference already exists")
            start = repo.resolve(payload.get("startingPoint", "main"))
            if start is None:
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            repo.refs[branch] = start
        return self._json(200, {})

    def _commit(self, repo_id: str, repo: Repo, revision: str, body: bytes, create_pr: bool) -> None:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = lines[0]
        if header.get("key") != "header":
            return self._error(400, None, "first ndjson line must be the header")
        with self.hub.lock:
            parent = repo.resolve(revision)
            if parent is None:
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            files = dict(repo.commits[parent])
            for op in lines[1:]:
                key, value = op["key"], op["value"]
                if key == "file" and value.get("encoding") == "base64":
                    files[value["path"]] = base64.b64decode(value["content"])
                    repo.upload_modes.append("regular")
                elif key in ("deletedFile", "deletedFolder"):
                    files = {
                        p: c
                        for p, c in files.items()
                        if p != value["path"] and not p.startswith(value["path"].rstrip("/") + "/")
                    }
                else:
                    return self._error(400, None, f"this test server does not support {key!r} operations")
            sha = self.hub._new_commit(repo, files, header["value"]["summary"])
            answer = {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}
            if create_pr:
                repo.num_prs += 1
                repo.refs[f"refs/pr/{repo.num_prs}"] = sha
                answer["pullRequestUrl"] = f"{self.hub.url}/{repo_id}/discussions/{repo.num_prs}"
            else:
                repo.refs[revision] = sha
        return self._json(200, answer)

    def do_HEAD(self) -> None:
        self._resolve(head=True)

    def do_GET(self) -> None:
        self._resolve(head=False)

    def _resolve(self, head: bool) -> None:
        parts, _ = self._parts()
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(404, None, f"no route for {self.command} {self.path}", head=head)
        repo_id, revision, path = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
        repo = self._repo(repo_id, head=head)
        if repo is None:
            return None
        with self.hub.lock:
            sha = repo.resolve(revision)
            content = repo.commits[sha].get(path) if sha else None
        if sha is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id", head=head)
        if content is None:
            return self._error(404, "EntryNotFound", "Entry not found", head=head, extra={"X-Repo-Commit": sha})
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{_git_blob_sha(content)}"',
            "X-Repo-Commit": sha,
        }
        self._send(200, content, headers, head=head)
