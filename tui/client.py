"""The console's own small async client of a node's management API.

The console talks HTTP only and never imports the daemon (`gpumesh.mesh`): it is a client
like any other, and it can be attached to a node of another version. One aiohttp session
serves every request; the node it talks to (`url`) changes when the console reconnects.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import aiohttp

__all__ = ["ApiError", "NodeClient", "sse_events"]

# One SSE data line is one JSON document (a snapshot of a big cluster runs to hundreds of
# KiB); aiohttp refuses lines over twice its read buffer.
_LINE_BUFFER = 4 << 20


class ApiError(Exception):
    """The node said no (status >= 400) or could not be reached (status 0)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    @property
    def missing_route(self) -> bool:
        """The node has no such API (an older node, or one not built yet), as opposed to
        "no such model": gpumesh answers unknown routes 404 without a code (or 405)."""
        return self.status == 405 or (self.status == 404 and self.code is None)


class NodeClient:
    """Requests to the attached node, with the admin key. Create and use on one event loop."""

    def __init__(self, url: str, api_key: str | None, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self.headers)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def get(self, path: str, **params: Any) -> Any:
        return await self.request("GET", path, params=params or None)

    async def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return await self.request("POST", path, json_body=body if body is not None else {})

    async def patch(self, path: str, body: dict[str, Any]) -> Any:
        return await self.request("PATCH", path, json_body=body)

    async def delete(self, path: str) -> Any:
        return await self.request("DELETE", path)

    async def request(self, method: str, path: str, *, json_body: Any = None,
                      params: dict[str, Any] | None = None, url: str | None = None) -> Any:
        try:
            async with self._http().request(method, (url or self.url) + path, json=json_body,
                                             params=params, timeout=self._timeout) as reply:
                raw = await reply.read()
                if reply.status >= 400:
                    raise _error(reply.status, raw)
                return json.loads(raw) if raw else None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ApiError(0, f"cannot reach {url or self.url}: {_reason(exc)}") from None

    async def events(self, url: str | None = None, telemetry: bool = True,
                     history: float = 0, idle_timeout: float = 6.0) -> AsyncIterator[tuple[str, Any]]:
        """`/api/events` of `url` (default: the attached node), as (event, data) pairs.

        With telemetry on, the node writes every second; `idle_timeout` seconds of silence
        mean the node (or the path to it) is gone, even if TCP has not noticed."""
        base = url or self.url
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=3, sock_read=idle_timeout)
        try:
            async with self._http().get(base + "/api/events",
                                        params={"telemetry": "1" if telemetry else "0",
                                                "history": str(history)},
                                        timeout=timeout, read_bufsize=_LINE_BUFFER) as reply:
                if reply.status >= 400:
                    raise _error(reply.status, await reply.read())
                async for event in sse_events(reply.content):
                    yield event
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ApiError(0, f"lost {base}: {_reason(exc)}") from None

    async def lines(self, path: str, params: dict[str, Any] | None = None,
                    idle_timeout: float | None = None) -> AsyncIterator[str]:
        """A streamed text body, line by line (a log that is being followed)."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=3, sock_read=idle_timeout)
        try:
            async with self._http().get(self.url + path, params=params,
                                        timeout=timeout) as reply:
                if reply.status >= 400:
                    raise _error(reply.status, await reply.read())
                async for raw in reply.content:
                    yield raw.decode(errors="replace").rstrip("\r\n")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ApiError(0, f"lost {self.url}: {_reason(exc)}") from None


async def sse_events(content: aiohttp.StreamReader) -> AsyncIterator[tuple[str, Any]]:
    """Server-Sent Events, parsed: `event:` names and JSON `data:` (comments skipped)."""
    event, data = "message", []
    async for raw in content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


def _error(status: int, raw: bytes) -> ApiError:
    try:
        error = json.loads(raw)["error"]
        return ApiError(status, error["message"], error.get("code"))
    except (ValueError, KeyError, TypeError):
        return ApiError(status, f"HTTP {status}")


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
