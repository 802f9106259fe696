"""The two model hubs, spoken over their own HTTP file APIs (blocking; call from threads).

Hugging Face (`HF_ENDPOINT`, default https://huggingface.co; token `HF_TOKEN`):
    list     GET  /api/models/{repo}/revision/{rev}?blobs=true   siblings: name, size, lfs sha256
    file     GET  /{repo}/resolve/{rev}/{path}                   byte ranges; may redirect (CDN)
    errors   the `X-Error-Code` header: RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo
ModelScope (`MODELSCOPE_DOMAIN`, default www.modelscope.cn over https — a value with a
scheme, e.g. http://127.0.0.1:8080, is used as it is; token `MODELSCOPE_API_TOKEN`):
    list     GET  /api/v1/models/{repo}/repo/files?Revision={rev}&Recursive=true
                  {"Code": 200, "Data": {"Files": [{"Path", "Size", "Sha256", "Type"}]}}
    file     GET  /api/v1/models/{repo}/repo?Revision={rev}&FilePath={path}   byte ranges

Offline (`GPUMESH_OFFLINE=1`, or `HF_HUB_OFFLINE=1` for Hugging Face): no request is made;
callers use what the node's cache holds.

Every failure becomes a `SourceError` that says what to do: a gated repo names the page
where its terms are accepted and the token variable, a missing repo or file says which.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, BinaryIO

from gpumesh import __version__

from .spec import SourceError

__all__ = ["Hub", "RemoteFile", "hub_for", "is_offline"]

_TIMEOUT_S = 30.0
_USER_AGENT = f"gpumesh/{__version__}"


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None          # known for LFS files (HF) and every file (ModelScope)


def is_offline(hub: str) -> bool:
    flags = [os.environ.get("GPUMESH_OFFLINE", "")]
    if hub == "huggingface":
        flags.append(os.environ.get("HF_HUB_OFFLINE", ""))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


class Hub:
    """One hub: list a repo's files, open one (from a byte offset), read a byte range."""

    name = ""
    label = ""
    token_variable = ""

    def endpoint(self) -> str:
        raise NotImplementedError

    def listing_url(self, repo: str, revision: str) -> str:
        raise NotImplementedError

    def file_url(self, repo: str, revision: str, path: str) -> str:
        raise NotImplementedError

    def parse_listing(self, body: Any, repo: str) -> list[RemoteFile]:
        raise NotImplementedError

    def repo_page(self, repo: str) -> str:
        return f"{self.endpoint()}/{repo}"

    # --- requests -------------------------------------------------------------------------

    def list_files(self, repo: str, revision: str) -> list[RemoteFile]:
        with self._open(self.listing_url(repo, revision), repo, revision, None) as response:
            try:
                body = json.loads(response.read())
            except ValueError:
                raise SourceError(f"{self.label} answered the file list of {repo} with "
                                  "something that is not JSON") from None
        return self.parse_listing(body, repo)

    def open_file(self, repo: str, revision: str, path: str, offset: int = 0,
                  end: int | None = None) -> tuple[BinaryIO, int, bool]:
        """(stream, status, ranged): the file from `offset` (to `end`, exclusive). `ranged`
        says the server honoured the range (206); a 200 sends the whole file again."""
        headers = {}
        if offset or end is not None:
            last = "" if end is None else str(end - 1)
            headers["Range"] = f"bytes={offset}-{last}"
        response = self._open(self.file_url(repo, revision, path), repo, revision, path,
                              headers)
        return response, response.status, response.status == 206

    def read_range(self, repo: str, revision: str, path: str, start: int, length: int) -> bytes:
        stream, _, ranged = self.open_file(repo, revision, path, start, start + length)
        with stream:
            if not ranged:          # a server without ranges: skip to the start ourselves
                _skip(stream, start)
            return _read_exactly(stream, length)

    def _open(self, url: str, repo: str, revision: str, path: str | None,
              headers: dict[str, str] | None = None) -> Any:
        if is_offline(self.name):
            raise SourceError(f"this node is offline (GPUMESH_OFFLINE or HF_HUB_OFFLINE): "
                              f"{repo} cannot be fetched from {self.label} and is not in "
                              f"its cache")
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT,
                                                       **(headers or {})})
        token = os.environ.get(self.token_variable)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            return urllib.request.urlopen(request, timeout=_TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            raise self._refusal(exc, repo, revision, path) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SourceError(f"cannot reach {self.label} at {self.endpoint()} for {repo} "
                              f"({reason}); offline? set GPUMESH_OFFLINE=1 to use only this "
                              "node's cache") from None

    def _refusal(self, exc: urllib.error.HTTPError, repo: str, revision: str,
                 path: str | None) -> SourceError:
        code = exc.headers.get("X-Error-Code", "")
        detail = exc.headers.get("X-Error-Message", "")
        has_token = bool(os.environ.get(self.token_variable))
        if code == "GatedRepo" or (exc.code in (401, 403) and "gated" in detail.lower()):
            return SourceError(f"{repo} is gated on {self.label}: accept its terms at "
                               f"{self.repo_page(repo)}, then give this node a token with "
                               f"access ({self.token_variable})")
        if code == "RevisionNotFound":
            return SourceError(f"{repo} has no revision {revision!r} on {self.label}")
        if code == "EntryNotFound" or (exc.code == 404 and path is not None and not code):
            return SourceError(f"{repo} has no file {path!r} at revision {revision!r}")
        if code == "RepoNotFound" or exc.code == 404 or (exc.code == 401 and not has_token):
            private = "" if has_token else f" (or it is private: set {self.token_variable})"
            return SourceError(f"{repo} was not found on {self.label}{private}")
        if exc.code in (401, 403):
            return SourceError(f"{self.label} refused access to {repo} with the token in "
                               f"{self.token_variable} (HTTP {exc.code})")
        return SourceError(f"{self.label} answered HTTP {exc.code} for {repo}"
                           + (f": {detail}" if detail else ""))


class HuggingFace(Hub):
    name = "huggingface"
    label = "Hugging Face"
    token_variable = "HF_TOKEN"

    def endpoint(self) -> str:
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")

    def listing_url(self, repo: str, revision: str) -> str:
        return (f"{self.endpoint()}/api/models/{repo}/revision/"
                f"{urllib.parse.quote(revision, safe='')}?blobs=true")

    def file_url(self, repo: str, revision: str, path: str) -> str:
        return (f"{self.endpoint()}/{repo}/resolve/{urllib.parse.quote(revision, safe='')}/"
                f"{urllib.parse.quote(path)}")

    def parse_listing(self, body: Any, repo: str) -> list[RemoteFile]:
        siblings = body.get("siblings") if isinstance(body, dict) else None
        if not isinstance(siblings, list):
            raise SourceError(f"Hugging Face's answer for {repo} has no file list")
        files = []
        for s in siblings:
            lfs = s.get("lfs") or {}
            files.append(RemoteFile(str(s["rfilename"]), int(s.get("size") or lfs.get("size") or 0),
                                    lfs.get("sha256")))
        return files


class ModelScope(Hub):
    name = "modelscope"
    label = "ModelScope"
    token_variable = "MODELSCOPE_API_TOKEN"

    def endpoint(self) -> str:
        domain = os.environ.get("MODELSCOPE_DOMAIN", "www.modelscope.cn").rstrip("/")
        return domain if "://" in domain else f"https://{domain}"

    def repo_page(self, repo: str) -> str:
        return f"{self.endpoint()}/models/{repo}"

    def listing_url(self, repo: str, revision: str) -> str:
        query = urllib.parse.urlencode({"Revision": revision, "Recursive": "true"})
        return f"{self.endpoint()}/api/v1/models/{repo}/repo/files?{query}"

    def file_url(self, repo: str, revision: str, path: str) -> str:
        query = urllib.parse.urlencode({"Revision": revision, "FilePath": path})
        return f"{self.endpoint()}/api/v1/models/{repo}/repo?{query}"

    def parse_listing(self, body: Any, repo: str) -> list[RemoteFile]:
        if not isinstance(body, dict) or body.get("Code") not in (200, None) \
                or body.get("Success") is False:
            message = body.get("Message") if isinstance(body, dict) else None
            raise SourceError(f"ModelScope refused the file list of {repo}: "
                              f"{message or 'no reason given'}")
        files = (body.get("Data") or {}).get("Files")
        if not isinstance(files, list):
            raise SourceError(f"ModelScope's answer for {repo} has no file list")
        return [RemoteFile(str(f.get("Path") or f["Name"]), int(f.get("Size") or 0),
                           f.get("Sha256") or None)
                for f in files if f.get("Type", "blob") != "tree"]


def hub_for(kind: str) -> Hub:
    if kind == "huggingface":
        return HuggingFace()
    if kind == "modelscope":
        return ModelScope()
    raise SourceError(f"unknown model source kind {kind!r}")


def _skip(stream: BinaryIO, count: int) -> None:
    while count > 0:
        chunk = stream.read(min(count, 1 << 20))
        if not chunk:
            return
        count -= len(chunk)


def _read_exactly(stream: BinaryIO, length: int) -> bytes:
    parts, got = [], 0
    while got < length:
        chunk = stream.read(length - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)
