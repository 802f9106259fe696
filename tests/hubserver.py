"""A local model hub for tests: Hugging Face's and ModelScope's file APIs over files the
test makes, on loopback, so downloads are tested for real without leaving the machine.

Point clients at it with `HF_ENDPOINT=<url>` and `MODELSCOPE_DOMAIN=<url>`. It answers:

    GET  /api/models/{repo}[/revision/{rev}]?blobs=true   HF listing (sizes, LFS sha256)
    HEAD|GET /{repo}/resolve/{rev}/{path}                 HF file (Range, X-Repo-Commit, ETag)
    GET  /api/v1/models/{repo}/repo/files?Revision=…      ModelScope listing
    GET  /api/v1/models/{repo}/repo?Revision=…&FilePath=… ModelScope file (Range)

with the hubs' own refusals (`X-Error-Code: RepoNotFound / RevisionNotFound /
EntryNotFound / GatedRepo`). Test controls: `cut[path] = n` ends the next response for
`path` after n bytes (a dropped connection); `throttle` slows every file response (bytes
per second), so progress can be watched; `corrupt` serves other bytes than listed;
`on_file` runs before a file is served; every request is logged with its Range header.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

GATED_TOKEN = "hf_test_token_with_access"
_LFS_FROM = 1024            # files this large are "LFS" (listed with their sha256), as on HF


@dataclass
class Repo:
    files: dict[str, bytes]
    revision: str = "main"
    gated: bool = False
    commit: str = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubServer:
    repos: dict[str, Repo] = field(default_factory=dict)
    cut: dict[str, int] = field(default_factory=dict)
    corrupt: set[str] = field(default_factory=set)
    throttle: float | None = None
    on_file: Callable[[str], None] | None = None
    log: list[tuple[str, str, str | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="test-hub",
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def file_requests(self, path: str) -> list[str | None]:
        """The Range headers of every request for one file, in order."""
        return [r for m, p, r in self.log if p == path and m == "GET"]


class _Handler(BaseHTTPRequestHandler):
    server_hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:      # quiet: tests read `hub.log`
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        path = urllib.parse.unquote(url.path)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path):
            repo = self.server_hub.repos.get(m[1])
            return self._hf_listing(m[1], m[2] or (repo.revision if repo else "main"))
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self._file(m[1], m[2], m[3], head, hf=True)
        if m := re.fullmatch(r"/api/v1/models/([^/]+/[^/]+)/repo/files", path):
            return self._ms_listing(m[1], query.get("Revision", "master"))
        if m := re.fullmatch(r"/api/v1/models/([^/]+/[^/]+)/repo", path):
            return self._file(m[1], query.get("Revision", "master"), query.get("FilePath", ""),
                              head, hf=False)
        self._refuse(404, "EntryNotFound", "no such route")

    # --- listings --------------------------------------------------------------------------

    def _repo(self, name: str, revision: str) -> Repo | None:
        repo = self.server_hub.repos.get(name)
        if repo is None:
            self._refuse(404, "RepoNotFound", f"Repository {name} not found")
            return None
        if revision not in (repo.revision, repo.commit):
            self._refuse(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo

    def _hf_listing(self, name: str, revision: str) -> None:
        if (repo := self._repo(name, revision)) is None:
            return
        siblings = []
        for path, data in sorted(repo.files.items()):
            entry: dict[str, object] = {"rfilename": path, "size": len(data),
                                        "blobId": hashlib.sha1(data).hexdigest()}
            if len(data) >= _LFS_FROM:
                entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                "pointerSize": 134}
            siblings.append(entry)
        self._json({"id": name, "sha": repo.commit, "gated": "manual" if repo.gated else False,
                    "private": False, "siblings": siblings})

    def _ms_listing(self, name: str, revision: str) -> None:
        repo = self.server_hub.repos.get(name)
        if repo is None:
            return self._json({"Code": 10010205, "Message": f"model {name} not exists",
                               "Success": False}, status=404)
        files = [{"Name": p.rsplit("/", 1)[-1], "Path": p, "Size": len(d), "Type": "blob",
                  "Sha256": hashlib.sha256(d).hexdigest(), "Revision": revision}
                 for p, d in sorted(repo.files.items())]
        self._json({"Code": 200, "Data": {"Files": files}, "Success": True})

    # --- files -------------------------------------------------------------------------------

    def _file(self, name: str, revision: str, path: str, head: bool, hf: bool) -> None:
        hub = self.server_hub
        hub.log.append(("HEAD" if head else "GET", path, self.headers.get("Range")))
        if (repo := self._repo(name, revision)) is None:
            return
        if repo.gated and self.headers.get("Authorization") != f"Bearer {GATED_TOKEN}":
            return self._refuse(401, "GatedRepo", f"Access to model {name} is restricted. You "
                                "must have access to it and be authenticated to access it.")
        data = repo.files.get(path)
        if data is None:
            return self._refuse(404, "EntryNotFound", f"{path} does not exist on {revision}")
        if hub.on_file is not None and not head:
            hub.on_file(path)
        if path in hub.corrupt:
            data = bytes(b ^ 0xFF for b in data)
        start, end = 0, len(data)
        status = 200
        if (wanted := self.headers.get("Range")) and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", wanted)):
            start, end = int(m[1]), min(int(m[2]) + 1 if m[2] else len(data), len(data))
            status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        if hf:
            digest = hashlib.sha256(repo.files[path]).hexdigest()
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("ETag", f'"{digest}"')
            self.send_header("X-Linked-Etag", f'"{digest}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.end_headers()
        if head:
            return
        body = data[start:end]
        limit = hub.cut.pop(path, None)
        if limit is not None:                 # a dropped connection, after `limit` bytes
            self.wfile.write(body[:limit])
            self.wfile.flush()
            self.close_connection = True
            return
        step = 64 << 10
        for offset in range(0, len(body), step):
            self.wfile.write(body[offset:offset + step])
            if hub.throttle:
                time.sleep(step / hub.throttle)

    def _refuse(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, payload: object, status: int = 200) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
