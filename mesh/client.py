"""A small synchronous client of the management API, for the CLI and scripts.

The CLI is a short-lived process, not the daemon: blocking urllib is the simple, right tool
here. Where to connect and with which key, in order: explicit arguments, `GPUMESH_URL` /
`GPUMESH_API_KEY`, then the local node (`http://127.0.0.1:8470` and the admin key file in
the local data dir).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .config import DEFAULT_API_PORT, default_data_dir
from .datadir import DataDir

__all__ = ["ApiClient", "ApiError"]


class ApiError(Exception):
    """The API said no (status >= 400) or could not be reached (status 0)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ApiClient:
    def __init__(self, url: str | None = None, api_key: str | None = None,
                 timeout: float = 30.0) -> None:
        self.url = (url or os.environ.get("GPUMESH_URL")
                    or f"http://127.0.0.1:{DEFAULT_API_PORT}").rstrip("/")
        self.api_key = api_key or os.environ.get("GPUMESH_API_KEY") or _local_admin_key()
        self.timeout = timeout

    def get(self, path: str) -> Any:
        return self._call("GET", path)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._call("POST", path, body)

    def patch(self, path: str, body: dict[str, Any]) -> Any:
        return self._call("PATCH", path, body)

    def delete(self, path: str) -> Any:
        return self._call("DELETE", path)

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
            raise _api_error(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiError(0, f"cannot reach gpumesh at {self.url} ({reason}); is `gpumesh up` "
                              f"running there? (set GPUMESH_URL to use another node)") from None


def model_path(name: str) -> str:
    return "/api/models/" + urllib.parse.quote(name, safe="/:")


def _api_error(exc: urllib.error.HTTPError) -> ApiError:
    try:
        error = json.loads(exc.read())["error"]
        return ApiError(exc.code, error["message"], error.get("code"))
    except (ValueError, KeyError, TypeError):
        return ApiError(exc.code, f"HTTP {exc.code} {exc.reason}")


def _local_admin_key() -> str | None:
    return DataDir(default_data_dir()).read_admin_key()
