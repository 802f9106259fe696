"""Engine logs over HTTP: `GET /api/instances/{id}/logs[?tail=N][&follow=1]`, on every node.

The node that runs the instance serves it from its log files (the current one and its
rotated predecessors, `runtimes/logfile.py`); any other node proxies the request to that
node's API with the caller's key, so `gpumesh logs` works against whichever node the CLI
talks to. The answer is plain text. With `follow=1` it stays open and sends what the
engine writes next (a rotation is followed onto the new file) until the client leaves or
the instance is removed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from aiohttp import web

from .auth import key_from_request
from .errors import openai_error
from .runtimes.logfile import log_files
from .state import ClusterStore

__all__ = ["InstanceLogs", "DEFAULT_TAIL_LINES"]

DEFAULT_TAIL_LINES = 200
MAX_TAIL_LINES = 100_000
_FOLLOW_POLL_S = 0.25
_CHUNK = 64 * 1024


class InstanceLogs:
    def __init__(self, store: ClusterStore, node_id: str, session: aiohttp.ClientSession,
                 log_dir: Path | None) -> None:
        self._store = store
        self._node_id = node_id
        self._session = session
        self._log_dir = log_dir

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/api/instances/{id}/logs", self.logs)

    async def logs(self, request: web.Request) -> web.StreamResponse:
        instance_id = request.match_info["id"]
        instance = self._store.view.instances.get(instance_id)
        if instance is None:
            return openai_error(404, f"no instance {instance_id!r}", code="instance_not_found")
        try:
            tail = int(request.query.get("tail", DEFAULT_TAIL_LINES))
        except ValueError:
            tail = -1
        if not 0 <= tail <= MAX_TAIL_LINES:
            return openai_error(400, f"tail must be a whole number from 0 to {MAX_TAIL_LINES}",
                                param="tail")
        follow = request.query.get("follow", "0").lower() in ("1", "true", "yes")
        if instance["node_id"] != self._node_id:
            return await self._proxy(request, instance["node_id"])
        if self._log_dir is None:
            return openai_error(503, "this node serves no engine logs", type_="server_error")
        path = self._log_dir / f"{instance_id}.log"
        # Where "now" is, fixed before the client sees the answer begin: the tail ends there
        # and follow starts there, so a line written once the stream is open is never lost.
        position, inode = _where(path)
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        data = await asyncio.to_thread(_last_lines, path, tail, position)
        await response.write(data)
        if follow:
            try:
                await self._follow(response, path, instance_id, position, inode)
            except ConnectionResetError:        # the client left: how a follow usually ends
                return response
        await response.write_eof()
        return response

    async def _follow(self, response: web.StreamResponse, path: Path, instance_id: str,
                      position: int, inode: int) -> None:
        while instance_id in self._store.view.instances:
            await asyncio.sleep(_FOLLOW_POLL_S)
            size, now_inode = _where(path)
            if now_inode != inode or size < position:      # rotated (or truncated)
                position, inode = 0, now_inode
            if size > position:
                chunk = await asyncio.to_thread(_read_from, path, position)
                position += len(chunk)
                await response.write(chunk)         # raises once the client has gone

    async def _proxy(self, request: web.Request, node_id: str) -> web.StreamResponse:
        node = self._store.view.nodes.get(node_id) or {}
        url = node.get("api_url")
        if not url:
            return openai_error(502, f"node {node_id} of this instance has no API address",
                                type_="server_error", code="node_unreachable")
        headers = {"Authorization": f"Bearer {key_from_request(request)}"}
        response: web.StreamResponse | None = None
        try:
            async with self._session.get(url + request.path_qs, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=None,
                                                                       sock_connect=5)) as reply:
                response = web.StreamResponse(status=reply.status, headers={
                    "Content-Type": reply.headers.get("Content-Type", "text/plain")})
                await response.prepare(request)
                async for chunk in reply.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            if response is not None and response.prepared:
                return response     # the answer has begun (our client left, say): no 502 now
            return openai_error(502, f"node {node.get('name', node_id)} ({url}) did not answer "
                                f"for its logs: {type(exc).__name__}", type_="server_error",
                                code="node_unreachable")


def _last_lines(path: Path, count: int, end: int) -> bytes:
    """The last `count` lines over the log (up to byte `end`) and its rotated files."""
    if count == 0:
        return b""
    lines: list[bytes] = []
    for file in reversed(log_files(path)):            # newest first
        try:
            lines = _tail_of(file, count - len(lines), end if file == path else None) + lines
        except OSError:
            continue
        if len(lines) >= count:
            break
    return b"".join(lines[-count:])


def _tail_of(file: Path, count: int, end: int | None = None) -> list[bytes]:
    with open(file, "rb") as handle:
        size = handle.seek(0, 2)
        end = size if end is None else min(end, size)
        data, start = b"", end
        while start > 0 and data.count(b"\n") <= count:
            start = max(0, start - _CHUNK)
            handle.seek(start)
            data = handle.read(end - start)
    lines = data.splitlines(keepends=True)
    return lines[-count:] if start > 0 or len(lines) > count else lines


def _where(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError:
        return 0, 0
    return stat.st_size, stat.st_ino


def _read_from(path: Path, position: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            handle.seek(position)
            return handle.read(_CHUNK * 16)
    except OSError:
        return b""
