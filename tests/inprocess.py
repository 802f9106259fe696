"""A node's HTTP surface served in-process, on a real single-node Raft store.

`InProcessNode` runs `daemon.http_app` (the daemon's own app, without the agent and the
reconciler) in aiohttp's TestServer on loopback, on an event loop in a background thread.
Starting a Raft group costs about a second (its first election), so a test module starts
one node and its tests talk to it over HTTP; `submit` seeds the state the way the daemon's
parts would.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from harness import free_port
from gpumesh.mesh.daemon import http_app
from gpumesh.mesh.state import ClusterStore

READY_TIMEOUT = 10.0


def raft_threads() -> list[threading.Thread]:
    """The Raft tick threads alive now: a stopped store must leave none behind."""
    return [t for t in threading.enumerate() if t.name == "gpumesh-raft"]


CLUSTER_SECRET = "test-cluster-secret"


def new_store(directory: Path) -> ClusterStore:
    return ClusterStore(self_address=f"127.0.0.1:{free_port()}", partners=[],
                        journal_file=directory / "raft.journal",
                        snapshot_file=directory / "raft.snapshot",
                        secret=CLUSTER_SECRET, bind_host="127.0.0.1")


def node_secret(node_id: str) -> bytes:
    """The engine secret of an in-process node (tests start engines with its keys)."""
    return hashlib.sha256(b"test-engine-secret:" + node_id.encode()).digest()


class InProcessNode:
    """One store, one HTTP app per node id in `node_ids` (all sharing the store, as the
    gateways of several nodes share one replicated state), and any extra apps a test adds."""

    def __init__(self, directory: Path, node_ids: tuple[str, ...],
                 backends: list[dict[str, Any]] | None = None, started: float | None = None,
                 **app_options: Any):
        self.directory = directory
        self.node_ids = node_ids
        self.backends = backends or []
        self.started = time.time() if started is None else started
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-node-loop",
                                       daemon=True)
        self.store: ClusterStore | None = None
        self.servers: list[TestServer] = []
        self.urls: list[str] = []
        self.apps: list[web.Application] = []
        self.app_options = app_options      # more http_app keywords (settings …)

    @property
    def url(self) -> str:
        return self.urls[0]

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.thread.start()
        self.call(self._start())

    def stop(self) -> None:
        try:
            self.call(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            # Say what the node's loop was doing (a bare TimeoutError says nothing).
            raise TimeoutError(f"not done after {timeout} s; tasks on the node's loop:\n"
                               + self._tasks_now()) from None

    def _tasks_now(self) -> str:
        """Each task on the node's loop and where it waits, outermost call first."""
        lines = []
        for task in asyncio.all_tasks(self.loop):
            where, coro = [], task.get_coro()
            while coro is not None and hasattr(coro, "cr_frame"):
                if coro.cr_frame is not None:
                    where.append(f"{coro.cr_code.co_name} ({Path(coro.cr_code.co_filename).name}"
                                 f":{coro.cr_frame.f_lineno})")
                coro = coro.cr_await
            lines.append(f"  {task.get_name()}: {' -> '.join(where) or repr(task)}")
        return "\n".join(sorted(lines))

    def submit(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.store is not None
        return self.call(self.store.submit(command))

    def serve(self, app: web.Application) -> int:
        """Serve another app (a stand-in peer, say) on this node's loop; returns its port."""
        return self.call(self._serve(app)).port

    async def _serve(self, app: web.Application) -> TestServer:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        self.servers.append(server)
        return server

    async def _start(self) -> None:
        self.store = new_store(self.directory)
        await self.store.start()
        await self.store.wait_ready(READY_TIMEOUT)
        self.session = aiohttp.ClientSession()
        for node_id in self.node_ids:
            app = http_app(self.store, node_id, self.session, self.started,
                           lambda: self.backends, cluster_secret=CLUSTER_SECRET,
                           node_secret=node_secret(node_id), **self.app_options)
            self.apps.append(app)
            server = await self._serve(app)
            self.urls.append(f"http://127.0.0.1:{server.port}")

    async def _stop(self) -> None:
        try:
            for server in self.servers:
                await server.close()
            await self.session.close()
        finally:
            assert self.store is not None
            await self.store.stop()


class Reply:
    """One HTTP answer: status, headers, raw bytes, and the body parsed on demand."""

    def __init__(self, status: int, headers: Any, raw: bytes) -> None:
        self.status = status
        self.headers = headers
        self.raw = raw

    @property
    def body(self) -> Any:
        return json.loads(self.raw)

    @property
    def error(self) -> dict[str, Any]:
        """The error object, after checking the body is exactly OpenAI's error shape."""
        body = self.body
        assert list(body) == ["error"], body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        return body["error"]

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.raw[:300]!r})"


async def http_request(url: str, method: str, *, key: str | None = None,
                       json_body: Any = None, data: bytes | None = None,
                       headers: dict[str, str] | None = None) -> Reply:
    headers = dict(headers or {})
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    kwargs: dict[str, Any] = {"headers": headers}
    if json_body is not None:
        kwargs["json"] = json_body
    if data is not None:
        kwargs["data"] = data
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        async with session.request(method, url, **kwargs) as response:
            return Reply(response.status, response.headers, await response.read())


def instance_record(instance_id: str, model: str, state: str, node_id: str, *,
                    port: int | None = None) -> dict[str, Any]:
    """An instance as the reconciler creates it (the agent then updates state and port)."""
    now = time.time()
    return {"id": instance_id, "model": model, "node_id": node_id, "state": state,
            "allocation": {"device": "cpu", "memory_bytes": 1 << 20, "gpu_vendor": None,
                           "gpu_indices": []},
            "port": port, "pid": None, "reason": None, "restarts": 0,
            "created": now, "updated": now}
