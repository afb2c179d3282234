"""A loopback HTTP server that speaks the Hub API subset huggingface_hub 2.x uses to create a
repo, read model info, resolve files (HEAD, GET, Range), pre-upload and upload LFS objects,
and commit. Repos live in memory, LFS objects in a folder. For tests only; the real client
is pointed at it.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


@dataclass
class Repo:
    private: bool
    head: str = "0" * 40
    files: dict[str, tuple[str, int, bool]] = field(default_factory=dict)  # path -> (sha256, size, lfs)
    commits: list[list[str]] = field(default_factory=list)  # paths touched by each commit


class HubServer:
    def __init__(self, root: Path, token: str | None = None) -> None:
        self.objects = root
        root.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.uploads: list[str] = []  # sha256 of each LFS PUT accepted
        self.fail_uploads_after: int | None = None  # PUTs after this many get 403
        self.deny_writes: int | None = None  # 401 or 403 for every write
        self.requests: list[str] = []
        self.lock = threading.Lock()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.shutdown()
        self._http.server_close()

    def content(self, repo_id: str, path: str) -> bytes:
        sha, _, _ = self.repos[repo_id].files[path]
        return (self.objects / sha).read_bytes()

    def add_file(self, repo_id: str, path: str, data: bytes) -> None:
        """Seed a repo directly (what a test does to host a source model)."""
        sha = self._store(data)
        repo = self.repos.setdefault(repo_id, Repo(private=False))
        repo.files[path] = (sha, len(data), path.endswith(LFS_SUFFIXES))
        repo.head = uuid.uuid4().hex + uuid.uuid4().hex[:8]

    def _store(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        (self.objects / sha).write_bytes(data)
        return sha


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        # -- plumbing
        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(doc).encode(), headers)

        def _error(self, status: int, message: str, code: str | None = None) -> None:
            self._json(status, {"error": message}, {"X-Error-Code": code} if code else {"X-Error-Message": message})

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _authorized(self, write: bool) -> bool:
            if write and hub.deny_writes:
                self._body()
                self._error(hub.deny_writes, "Invalid credentials" if hub.deny_writes == 401 else "Forbidden: no write access")
                return False
            if hub.token and write and self.headers.get("Authorization") != f"Bearer {hub.token}":
                self._body()
                self._error(401, "Invalid credentials")
                return False
            return True

        def _repo(self, repo_id: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "Repository not found", "RepoNotFound")
            return repo

        # -- verbs
        def do_HEAD(self) -> None:
            self._route()

        def do_GET(self) -> None:
            self._route()

        def do_POST(self) -> None:
            self._route()

        def do_PUT(self) -> None:
            self._route()

        def _route(self) -> None:
            path = unquote(urlparse(self.path).path)
            hub.requests.append(f"{self.command} {path}")
            for pattern, method, fn in ROUTES:
                m = re.fullmatch(pattern, path)
                if m and self.command in method:
                    return fn(self, *m.groups())
            self._error(404, f"no route for {self.command} {path}")

        def create_repo(self) -> None:
            if not self._authorized(True):
                return
            doc = json.loads(self._body())
            repo_id = f"{doc['organization']}/{doc['name']}" if doc.get("organization") else doc["name"]
            if repo_id in hub.repos:
                return self._json(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
            hub.repos[repo_id] = Repo(private=doc.get("visibility", "public") == "private" or bool(doc.get("private")))
            self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def model_info(self, repo_id: str, revision: str | None = None) -> None:
            repo = self._repo(repo_id)
            if repo is None:
                return
            siblings = [{"rfilename": p, "size": s, **({"lfs": {"sha256": h, "size": s, "pointerSize": 134}} if lfs else {})}
                        for p, (h, s, lfs) in sorted(repo.files.items())]
            self._json(200, {"id": repo_id, "modelId": repo_id, "sha": repo.head, "private": repo.private,
                             "siblings": siblings, "tags": [], "downloads": 0, "likes": 0})

        def resolve(self, repo_id: str, revision: str, path: str) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None or path not in repo.files:
                return self._error(404, "Entry not found", "EntryNotFound" if repo else "RepoNotFound")
            sha, size, lfs = repo.files[path]
            data = (hub.objects / sha).read_bytes()
            headers = {"X-Repo-Commit": repo.head, "ETag": f'"{sha}"', "Accept-Ranges": "bytes"}
            if lfs:
                headers.update({"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(size)})
            rng = self.headers.get("Range")
            if rng and self.command == "GET":
                lo, hi = rng.removeprefix("bytes=").split("-")
                start, end = int(lo), min(int(hi) if hi else size - 1, size - 1)
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
                return self._send(206, data[start : end + 1], headers, "application/octet-stream")
            self._send(200, data, headers, "application/octet-stream")

        def preupload(self, repo_id: str, revision: str) -> None:
            if not self._authorized(True) or self._repo(repo_id) is None:
                return
            files = json.loads(self._body())["files"]
            self._json(200, {"files": [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                                        "shouldIgnore": False} for f in files]})

        def lfs_batch(self, repo_id: str) -> None:
            if not self._authorized(True) or self._repo(repo_id) is None:
                return
            objects = []
            for o in json.loads(self._body())["objects"]:
                entry: dict[str, Any] = {"oid": o["oid"], "size": o["size"]}
                if not (hub.objects / o["oid"]).exists():
                    entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"}}
                objects.append(entry)
            self._json(200, {"transfer": "basic", "objects": objects})

        def lfs_upload(self, oid: str) -> None:
            data = self._body()
            with hub.lock:
                if hub.fail_uploads_after is not None and len(hub.uploads) >= hub.fail_uploads_after:
                    return self._error(403, "Forbidden: upload quota exceeded")
                if hashlib.sha256(data).hexdigest() != oid:
                    return self._error(400, "sha256 mismatch")
                hub._store(data)
                hub.uploads.append(oid)
            self._send(200)

        def commit(self, repo_id: str, revision: str) -> None:
            if not self._authorized(True):
                return
            repo = self._repo(repo_id)
            if repo is None:
                return
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            staged: dict[str, tuple[str, int, bool]] = {}
            for item in lines:
                value = item["value"]
                if item["key"] == "file":
                    data = base64.b64decode(value["content"])
                    staged[value["path"]] = (hub._store(data), len(data), False)
                elif item["key"] == "lfsFile":
                    if not (hub.objects / value["oid"]).exists():
                        return self._error(400, f"LFS object of {value['path']} was never uploaded")
                    staged[value["path"]] = (value["oid"], value["size"], True)
            repo.files.update(staged)
            repo.commits.append(sorted(staged))
            repo.head = uuid.uuid4().hex + uuid.uuid4().hex[:8]
            self._json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{repo.head}", "commitOid": repo.head})

        def validate_yaml(self) -> None:
            import yaml

            content = json.loads(self._body())["content"]
            head = content.split("---")[1] if content.startswith("---") else ""
            try:
                if not isinstance(yaml.safe_load(head) or {}, dict):
                    raise yaml.YAMLError("metadata is not a mapping")
            except yaml.YAMLError as exc:
                return self._json(400, {"error": f"invalid model card metadata: {exc}"})
            self._json(200, {"errors": [], "warnings": []})

    REPO = r"([^/]+/[^/]+)"
    ROUTES = [
        (r"/api/repos/create", {"POST"}, Handler.create_repo),
        (r"/api/validate-yaml", {"POST"}, Handler.validate_yaml),
        (rf"/api/models/{REPO}", {"GET"}, Handler.model_info),
        (rf"/api/models/{REPO}/revision/(.+)", {"GET"}, Handler.model_info),
        (rf"/api/models/{REPO}/preupload/([^/]+)", {"POST"}, Handler.preupload),
        (rf"/api/models/{REPO}/commit/([^/]+)", {"POST"}, Handler.commit),
        (rf"/{REPO}\.git/info/lfs/objects/batch", {"POST"}, Handler.lfs_batch),
        (r"/lfs-upload/([0-9a-f]{64})", {"PUT"}, Handler.lfs_upload),
        (rf"/{REPO}/resolve/([^/]+)/(.+)", {"GET", "HEAD"}, Handler.resolve),
    ]
    return Handler
