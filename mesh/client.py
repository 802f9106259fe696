"""A small synchronous client of the management API, for the CLI and scripts.

The CLI is a short-lived process, not the daemon: blocking urllib is the simple, right tool
here. Where to connect, in order: the explicit `url`, `GPUMESH_URL`, then the local node —
the address its daemon wrote into the data dir (`GPUMESH_DATA_DIR` or the default), so a
node on any port is found — and last `http://127.0.0.1:8470`. Which key: the explicit
`api_key`, `GPUMESH_API_KEY`, then the data dir's `admin.key` (keys are cluster-wide, so the
local admin key also manages the other nodes of the cluster).

A URL may be given as people have it at hand: `host:8470` (no scheme: http, and port 8470
when none is given) or the OpenAI base URL `http://host:8470/v1` (a trailing /v1 or /api is
dropped, since the client adds its own paths).
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DEFAULT_API_PORT, default_data_dir
from .datadir import DataDir

__all__ = ["ApiClient", "ApiError", "Target", "model_path", "normalise_url", "resolve_target"]


class ApiError(Exception):
    """The API said no (status >= 400), could not be reached (status 0), or did not answer
    in time (status 0, `timed_out`). `code` is the API's error code, `param` the field."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 param: str | None = None, timed_out: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param
        self.timed_out = timed_out


@dataclass(frozen=True)
class Target:
    """Where the CLI talks to, with which key, and where each came from (for messages)."""

    url: str
    api_key: str | None
    url_from: str
    key_from: str | None
    data_dir: Path


def resolve_target(url: str | None = None, api_key: str | None = None) -> Target:
    data = DataDir(default_data_dir())
    if url:
        chosen, url_from = normalise_url(url), "--url"
    elif env_url := os.environ.get("GPUMESH_URL"):
        chosen, url_from = normalise_url(env_url, "GPUMESH_URL"), "GPUMESH_URL"
    elif endpoint := data.read_endpoint():
        chosen, url_from = endpoint["connect_url"], f"{data.endpoint_file}"
    else:
        chosen, url_from = f"http://127.0.0.1:{DEFAULT_API_PORT}", "the default"
    if api_key:
        key, key_from = api_key, "--api-key"
    elif env_key := os.environ.get("GPUMESH_API_KEY"):
        key, key_from = env_key, "GPUMESH_API_KEY"
    elif local_key := data.read_admin_key():
        key, key_from = local_key, str(data.admin_key_file)
    else:
        key, key_from = None, None
    return Target(chosen, key, url_from, key_from, data.root)


def normalise_url(text: str, source: str = "--url") -> str:
    """`host:8470`, `http://host:8470/v1`, `https://proxy/prefix/api/` → the API's base URL."""
    raw = text.strip()
    has_scheme = "://" in raw
    parts = urllib.parse.urlsplit(raw if has_scheme else "http://" + raw)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{source} {text!r} must be an http:// or https:// URL")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{source} {text!r} has an invalid port") from None
    if not parts.hostname:
        raise ValueError(f"{source} {text!r} names no host (e.g. http://10.0.0.5:8470)")
    netloc = parts.netloc
    if port is None and not has_scheme:      # a bare host means a node's own port
        netloc += f":{DEFAULT_API_PORT}"
    path = parts.path.rstrip("/")
    for suffix in ("/v1", "/api"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
    return urllib.parse.urlunsplit((parts.scheme, netloc, path, "", ""))


class ApiClient:
    def __init__(self, url: str | None = None, api_key: str | None = None,
                 timeout: float = 30.0, target: Target | None = None) -> None:
        self.target = target or resolve_target(url, api_key)
        self.url = self.target.url
        self.api_key = self.target.api_key
        self.timeout = timeout

    def get(self, path: str) -> Any:
        return self._call("GET", path)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._call("POST", path, body)

    def patch(self, path: str, body: dict[str, Any]) -> Any:
        return self._call("PATCH", path, body)

    def delete(self, path: str) -> Any:
        return self._call("DELETE", path)

    def stream(self, path: str, timeout: float | None = None) -> Any:
        """GET `path` and return the open response (a binary file object) to read as it
        arrives; `timeout` None waits for data forever (following a log)."""
        request = urllib.request.Request(self.url + path)
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            raise self._refusal(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            raise ApiError(0, f"cannot reach gpumesh at {self.url} "
                              f"({getattr(exc, 'reason', exc)}); {self._where_hint()}") from None

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise self._refusal(exc) from None
        except (TimeoutError, socket.timeout):
            raise ApiError(0, f"gpumesh at {self.url} did not answer {method} {path} within "
                              f"{self.timeout:.0f} s", timed_out=True) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise ApiError(0, f"gpumesh at {self.url} did not answer within "
                                  f"{self.timeout:.0f} s", timed_out=True) from None
            raise ApiError(0, f"cannot reach gpumesh at {self.url} ({reason}); "
                              f"{self._where_hint()}") from None

    def _refusal(self, exc: urllib.error.HTTPError) -> ApiError:
        try:
            error = json.loads(exc.read())["error"]
            error = ApiError(exc.code, error["message"], error.get("code"), error.get("param"))
        except (ValueError, KeyError, TypeError):
            error = ApiError(exc.code, f"HTTP {exc.code} {exc.reason}")
        if exc.code == 401:
            error.args = (f"{error.args[0]}; {self._key_hint()}",)
        return error

    def _where_hint(self) -> str:
        t = self.target
        if t.url_from == "the default":
            return (f"no node has run with the data dir {t.data_dir} (set GPUMESH_DATA_DIR to "
                    f"a node's data dir, or GPUMESH_URL to its address)")
        if t.url_from.endswith("endpoint.json"):
            return (f"that is where the node with the data dir {t.data_dir} last listened; "
                    f"is its `gpumesh up` running?")
        return f"the URL came from {t.url_from}; is `gpumesh up` running there?"

    def _key_hint(self) -> str:
        t = self.target
        if t.key_from is None:
            return (f"no API key was given and {t.data_dir / 'admin.key'} does not exist: set "
                    f"GPUMESH_API_KEY, pass --api-key, or set GPUMESH_DATA_DIR to the node's "
                    f"data dir")
        return f"the key came from {t.key_from}"


def model_path(name: str) -> str:
    return "/api/models/" + urllib.parse.quote(name, safe="/:")
