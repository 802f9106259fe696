"""The daemon behind `gpumesh up`: wires the parts together and owns their lifecycle.

Reads top-down: `serve → start-up (app.cleanup_ctx, in order) → wait for a signal →
shutdown (the same contexts, in reverse)`. Each part is an async generator that starts
something, yields, and stops it; aiohttp enters them in order and, whatever happens, exits
the ones it entered in reverse, so a start-up that fails half-way undoes only what it did.

Order matters for shutdown: the engines stop before the state store (so nothing writes to
a closed store), and the HTTP site stops first of all (no new requests while draining).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from typing import Any, AsyncIterator, Callable, Coroutine

import aiohttp
from aiohttp import web

from gpumesh import __version__
from gpumesh.backends.registry import describe_backends

from .agent import NodeAgent
from .api import ManagementApi
from .api_events import EventStream
from .auth import ADMIN, new_api_key
from .config import Config
from .datadir import DataDir, DataDirInUse, DataDirLock
from .errors import error_middleware
from .events import log_state_changes
from .gateway import Gateway
from .probes import Probe, ProbeUnavailable, open_probe
from .reconciler import ReplicaReconciler
from .scheduler import Scheduler, format_bytes
from .state import ClusterStore, CommandRejected, StateUnavailable
from .telemetry import TELEMETRY, TelemetrySampler, add_telemetry_routes

__all__ = ["Daemon", "http_app", "run_daemon"]

log = logging.getLogger("gpumesh")

_READY_TIMEOUT_S = 30.0


async def run_daemon(config: Config) -> int:
    """`gpumesh up`: run until SIGINT/SIGTERM. Returns the process exit status."""
    os.umask(0o077)   # the journal, logs and keys the daemon writes are for its owner only
    data = DataDir.open(config.data_dir)
    lock = DataDirLock(data.root)
    try:
        lock.acquire()
    except DataDirInUse as exc:
        log.error("gpumesh could not start: %s", exc)
        return 1
    try:
        return await Daemon(config, data).serve()
    finally:
        lock.release()


class Daemon:
    def __init__(self, config: Config, data: DataDir) -> None:
        self.config = config
        self.data = data
        self.node_id = data.node_id()
        self.started = time.time()
        self.store = ClusterStore(
            self_address=config.raft_address, partners=[], journal_file=data.journal_file,
            snapshot_file=data.snapshot_file, secret=data.cluster_secret(),
            bind_host=config.raft_host)
        self.probe: Probe | None = None
        self.backends: list[dict[str, object]] = []   # this node's engines, described once
        self.session: aiohttp.ClientSession | None = None
        self.agent: NodeAgent | None = None
        self.telemetry = TelemetrySampler()
        self._stop = asyncio.Event()
        self._signals = 0

    # --- top level -------------------------------------------------------------------------

    async def serve(self) -> int:
        for flag, host, port in (("--api-port", self.config.host, self.config.api_port),
                                 ("--raft-port", self.config.raft_host, self.config.raft_port)):
            if problem := _port_problem(host, port):
                log.error("cannot listen on %s:%d (%s): %s", host, port, flag, problem)
                return 1
        # One connection pool for engine calls and health probes: keep-alive, no pool limit
        # (engines bound their own concurrency), no total timeout (generations are long).
        # It outlives every part that uses it, so serve() owns it.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
        try:
            return await self._run_app()
        finally:
            await self.session.close()

    async def _run_app(self) -> int:
        runner = web.AppRunner(self.build_app(), handle_signals=False, access_log=None)
        # Handlers first: a Ctrl-C during start-up must stop it, not be lost.
        self._install_signal_handlers()
        try:
            if not await self._start(runner):
                return 1 if not self._stop.is_set() else 0
            # The CLI reads where this node listens from its data dir (any --api-port).
            self.data.write_endpoint(self.config.api_url, self.config.local_api_url,
                                     self.config.raft_address)
            self._announce()
            await self._stop.wait()
            log.info("shutting down: stopping engines (Ctrl-C again to force)")
            return 0
        finally:
            await runner.cleanup()                  # site, then the entered parts in reverse
            self._remove_signal_handlers()
            log.info("stopped")

    async def _start(self, runner: web.AppRunner) -> bool:
        """Enter every part and bind the site; False if that failed or was interrupted."""
        starting = asyncio.create_task(self._setup_and_bind(runner), name="start-up")
        stop = asyncio.create_task(self._stop.wait(), name="stop-during-start-up")
        await asyncio.wait({starting, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not starting.done():
            log.info("interrupted during start-up; undoing what was started")
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return False
        try:
            starting.result()
        except (StateUnavailable, ProbeUnavailable, OSError) as exc:
            log.error("gpumesh could not start: %s", exc)
            return False
        return True

    async def _setup_and_bind(self, runner: web.AppRunner) -> None:
        await runner.setup()                        # enters every cleanup_ctx part, in order
        await web.TCPSite(runner, self.config.host, self.config.api_port).start()

    def build_app(self) -> web.Application:
        assert self.session is not None
        app = http_app(self.store, self.node_id, self.session, self.started,
                       lambda: self.backends)
        app[TELEMETRY] = self.telemetry             # routes read it; started by its part
        app.cleanup_ctx.extend([
            self._probe_part, self._telemetry_part, self._store_part, self._membership_part,
            self._agent_part, self._reconciler_part, self._event_log_part,
        ])
        return app

    # --- the parts, in start-up order ------------------------------------------------------

    async def _probe_part(self, app: web.Application) -> AsyncIterator[None]:
        """What this machine has: GPUs (or none), and what each engine installed here can use."""
        probe, backends = await asyncio.gather(
            asyncio.to_thread(open_probe, self.config.gpu_probe, self.config.gpus),
            asyncio.to_thread(describe_backends), return_exceptions=True)
        if isinstance(backends, BaseException):
            if not isinstance(probe, BaseException):
                await asyncio.to_thread(probe.close)     # opened, and nobody else will close it
            raise backends
        if isinstance(probe, BaseException):
            raise probe
        self.probe, self.backends = probe, backends
        try:
            yield
        finally:
            await asyncio.to_thread(probe.close)

    async def _telemetry_part(self, app: web.Application) -> AsyncIterator[None]:
        """Per-second readings of this node, from start-up until the probe closes."""
        assert self.probe is not None
        self.telemetry.start(self.probe)
        try:
            yield
        finally:
            await asyncio.to_thread(self.telemetry.stop)

    async def _store_part(self, app: web.Application) -> AsyncIterator[None]:
        await self.store.start()
        try:
            await self.store.wait_ready(_READY_TIMEOUT_S)
            yield
        finally:
            await self.store.stop()

    async def _membership_part(self, app: web.Application) -> AsyncIterator[None]:
        await self._bootstrap_admin_key()
        await self._register_node("ready")
        yield
        try:
            await self._register_node("stopped", timeout=1.0)
        except (StateUnavailable, CommandRejected) as exc:
            log.warning("could not record this node as stopped: %s", exc)

    async def _agent_part(self, app: web.Application) -> AsyncIterator[None]:
        assert self.session is not None
        self.agent = NodeAgent(node_id=self.node_id, store=self.store, session=self.session,
                               model_cache=self.data.root / "models",
                               log_dir=self.data.root / "logs")
        await self.agent.recover()                  # before the site binds: no stale "running"
        async with _owned_task(self.agent.run(), "node-agent"):
            yield
        await self.agent.stop()

    async def _reconciler_part(self, app: web.Application) -> AsyncIterator[None]:
        scheduler = Scheduler(reserved_memory_bytes=self.config.reserved_memory_mib << 20)
        async with _owned_task(ReplicaReconciler(self.store, scheduler).run(), "reconciler"):
            yield

    async def _event_log_part(self, app: web.Application) -> AsyncIterator[None]:
        async with _owned_task(log_state_changes(self.store), "event-log"):
            yield

    # --- start-up steps --------------------------------------------------------------------

    async def _bootstrap_admin_key(self) -> None:
        """First start of a cluster: mint the admin key, store only its hash, show it once."""
        if any(k["role"] == ADMIN for k in self.store.view.api_keys.values()):
            return
        if not self.store.status.is_leader:
            return
        key, record = new_api_key("admin", ADMIN)
        try:
            await self.store.submit({"op": "create_api_key", "key": record,
                                     "only_if_no_admin": True})
        except CommandRejected:
            return                                  # another start minted it first
        path = self.data.write_admin_key(key)
        print(f"\n  Admin API key (shown once; also saved to {path}, mode 0600):\n"
              f"    {key}\n", flush=True)

    async def _register_node(self, status: str, timeout: float = 5.0) -> None:
        assert self.probe is not None
        inventory = await asyncio.to_thread(self.probe.inventory)
        node = {"id": self.node_id, "name": self.config.node_name, "status": status,
                "api_url": self.config.api_url, "raft_address": self.config.raft_address,
                "version": __version__, "inventory": inventory.to_dict(),
                "backends": {b["name"]: {"version": b["version"], "runs_on_cpu": b["runs_on_cpu"],
                                         "gpu_vendors": b["gpu_vendors"]}
                             for b in self.backends if b["available"]},
                "updated": time.time()}
        await self.store.submit({"op": "upsert_node", "node": node}, timeout=timeout)

    def _announce(self) -> None:
        node = self.store.view.nodes[self.node_id]
        inv = node["inventory"]
        gpus = ", ".join(f"{g['name']} ({format_bytes(g['memory_total_bytes'])})"
                         for g in inv["gpus"]) or "none"
        members = len(self.store.status.members)
        print(f"gpumesh {__version__} · node {self.node_id} ({self.config.node_name}) · "
              f"cluster of {members}, leader: "
              f"{'this node' if self.store.status.is_leader else self.store.status.leader}\n"
              f"  OpenAI API   {self.config.api_url}/v1\n"
              f"  management   {self.config.api_url}/api\n"
              f"  Raft         {self.config.raft_address}\n"
              f"  data dir     {self.data.root}\n"
              f"  resources    {inv['cpu_cores']} CPU cores, "
              f"{format_bytes(inv['memory_total_bytes'])} RAM, GPUs: {gpus} "
              f"(probe: {inv['probe']})\n"
              f"  backends     {_backend_summary(self.backends)}\n"
              f"  Press Ctrl-C to stop.", flush=True)

    # --- signals (uvicorn's way: handlers only set flags) ----------------------------------

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)

    def _remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

    def _on_signal(self) -> None:
        self._signals += 1
        self._stop.set()
        if self._signals > 1 and self.agent is not None:
            log.warning("forced: killing every engine now")
            self.agent.kill_now()


def http_app(store: ClusterStore, node_id: str, session: aiohttp.ClientSession,
             started: float, backends: Callable[[], list[dict[str, object]]]) -> web.Application:
    """The HTTP surface of a node: errors in OpenAI's shape, the admin check on /api, the
    management routes and the gateway. The daemon adds its lifecycle parts; tests serve it
    as it is, in-process."""
    api = ManagementApi(store, node_id, started, backends)
    app = web.Application(middlewares=[error_middleware, api.require_admin],
                          client_max_size=16 << 20)
    api.add_routes(app)
    add_telemetry_routes(app, node_id)
    EventStream(store, node_id, session).add_routes(app)
    Gateway(store, node_id, session).add_routes(app)
    return app


@contextlib.asynccontextmanager
async def _owned_task(coro: Coroutine[Any, Any, None], name: str) -> AsyncIterator[None]:
    """The task lives exactly as long as the `async with` block that owns it."""
    task = asyncio.create_task(coro, name=name)
    task.add_done_callback(_log_crash)
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s stopped unexpectedly", task.get_name(), exc_info=task.exception())


def _backend_summary(backends: list[dict[str, object]]) -> str:
    """"llama.cpp 0.2 (cpu)" per engine, or why it is unavailable, for the start-up banner."""
    parts = []
    for b in backends:
        if b["available"]:
            devices = (["cpu"] if b["runs_on_cpu"] else []) + list(b["gpu_vendors"])  # type: ignore[arg-type]
            parts.append(f"{b['name']} {b['version']} ({', '.join(devices)})")
        else:
            parts.append(f"{b['name']} unavailable: {b['problem']}")
    return "; ".join(parts) or "none"


def _port_problem(host: str, port: int) -> str | None:
    """Say why `port` cannot be bound, before anything is started (uvicorn checks late and
    has to undo; checking first gives the common mistake a one-line answer)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def configure_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=level.upper(),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # pysyncobj logs every reconnect attempt at INFO; our own lines say what matters.
    logging.getLogger("pysyncobj").setLevel(logging.WARNING)
