"""The daemon behind `gpumesh up`: wires the parts together and owns their lifecycle.

Reads top-down: `serve → start-up (app.cleanup_ctx, in order) → wait for a signal →
shutdown (the same contexts, in reverse)`. Each part is an async generator that starts
something, yields, and stops it; aiohttp enters them in order and, whatever happens, exits
the ones it entered in reverse, so a start-up that fails half-way undoes only what it did.

Before the parts: `membership.establish` decides whether this node founds a cluster,
joins one (token: a member's `hello` gives the secret and the members) or rejoins the one
its data dir names; the store is built from that. Discovery (mDNS) runs around everything,
so a joiner can find a member, and advertises this node once its API is up.

Order matters for shutdown: the engines stop before the state store (so nothing writes to
a closed store), and the HTTP site stops first of all (no new requests while draining).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import signal
import socket
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Coroutine

import aiohttp
from aiohttp import web

from gpumesh.backends.registry import describe_backends, node_backends
from gpumesh.backends.versions import BackendVersions, backends_dir

from .activation import ACTIVATION, Activation
from .architectures import ArchitectureReporter
from .agent import NodeAgent
from .api import ManagementApi
from .api_access import AccessApi
from .api_usage import UsageApi
from .auth import Authenticator, forward_key
from .api_events import EventStream
from .banner import print_banner
from .cluster_api import ClusterApi, ClusterContext
from .config import Config
from .datadir import DataDir, DataDirInUse, DataDirLock
from .errors import error_middleware_with
from .events import log_state_changes
from .gateway import Gateway, GatewaySettings, RouteTable
from .limits import Limiter
from .metering import Meter
from .metrics import GatewayMetrics
from .discovery import Discovery, DiscoveryError, mdns_address
from .joining import JoinError
from .liveness import LivenessMonitor
from .membership import (ClusterIdentity, JoinPlan, NodePresence, bootstrap_admin_key,
                         confirm_join, establish)
from .instance import Timings
from .logs_api import InstanceLogs
from .probes import Probe, ProbeUnavailable, open_probe
from .reconciler import ReplicaReconciler
from .scheduler import Scheduler
from .scheduler.routes import SCHEDULER, EvaluateApi
from .sources.reporter import reporter_part
from .sources.routes import MODEL_CACHE, SourcesApi
from .startup import bind_socket, owned_task, port_problem
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
        self.store: ClusterStore | None = None         # built once the cluster is known
        self.identity: ClusterIdentity | None = None
        self.join_plan: JoinPlan | None = None
        self.discovery: Discovery | None = None
        self.probe: Probe | None = None
        self.backends: list[dict[str, object]] = []   # this node's engines, described once
        self.versions = BackendVersions(backends_dir(data.root))
        self.session: aiohttp.ClientSession | None = None
        self.agent: NodeAgent | None = None
        self.architectures: ArchitectureReporter | None = None
        self.telemetry = TelemetrySampler()
        self._stop = asyncio.Event()
        self._signals = 0
        self._api_socket: socket.socket | None = None

    # --- top level -------------------------------------------------------------------------

    async def serve(self) -> int:
        # The API port is bound now and held until the site listens on it: joining and
        # starting Raft take seconds, and a port only checked could be taken meanwhile (then
        # a joiner would be a member that never serves).
        try:
            self._api_socket = bind_socket(self.config.host, self.config.api_port)
        except OSError as exc:
            log.error("cannot listen on %s:%d (--api-port): %s", self.config.host,
                      self.config.api_port, exc.strerror or exc)
            return 1
        try:
            return await self._serve()
        finally:
            self._api_socket.close()

    async def _serve(self) -> int:
        if problem := port_problem(self.config.raft_host, self.config.raft_port):
            log.error("cannot listen on %s:%d (--raft-port): %s", self.config.raft_host,
                      self.config.raft_port, problem)
            return 1
        # One connection pool for engine calls and health probes: keep-alive, no pool limit
        # (engines bound their own concurrency), no total timeout (generations are long).
        # It outlives every part that uses it, so serve() owns it.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
        # Handlers first: a Ctrl-C during start-up (a join included) must stop it.
        self._install_signal_handlers()
        try:
            await self._start_discovery()
            if not await self._until_stopped(self._establish(), "joining"):
                return 1 if not self._stop.is_set() else 0
            return await self._run_app()
        finally:
            if self.discovery is not None:
                await self.discovery.close()
            self._remove_signal_handlers()
            await self.session.close()

    async def _start_discovery(self) -> None:
        if self.config.discovery != "mdns":
            return
        try:
            discovery = Discovery(mdns_address(self.config.mdns_interface, self.config.advertise))
            await discovery.start()
        except (DiscoveryError, OSError) as exc:
            log.warning("mDNS discovery is off: %s", exc)
            return
        self.discovery = discovery

    async def _establish(self) -> None:
        """Found, join or rejoin; then the store this node's cluster needs."""
        assert self.session is not None
        discover = self.discovery.find_members if self.discovery else None
        self.identity, self.join_plan = await establish(
            self.config, self.data, self.node_id, self.session, discover)
        self.store = ClusterStore(
            self_address=self.config.raft_address, partners=self.identity.partners,
            journal_file=self.data.journal_file, snapshot_file=self.data.snapshot_file,
            secret=self.identity.secret, bind_host=self.config.raft_host)

    async def _run_app(self) -> int:
        # aiohttp would wait 60 s for requests in flight (an open stream never ends by
        # itself): bounded by --drain-seconds, so a stop fits systemd's TimeoutStopSec.
        runner = web.AppRunner(self.build_app(), handle_signals=False, access_log=None,
                               shutdown_timeout=self.config.drain_seconds)
        try:
            if not await self._until_stopped(self._setup_and_bind(runner), "start-up"):
                return 1 if not self._stop.is_set() else 0
            freeze_startup_heap()
            # The CLI reads where this node listens from its data dir (any --api-port).
            self.data.write_endpoint(self.config.api_url, self.config.local_api_url,
                                     self.config.raft_address)
            self._announce()
            # mDNS registration probes the name for ~1 s first: never hold the node up for it.
            async with owned_task(self._advertise(), "mdns-advertise"):
                await self._stop.wait()
            log.info("shutting down: stopping engines (Ctrl-C again to force)")
            return 0
        finally:
            await runner.cleanup()                  # site, then the entered parts in reverse
            log.info("stopped")

    async def _until_stopped(self, work: Coroutine[Any, Any, None], what: str) -> bool:
        """Run `work` raced against the stop flag; False if it failed or was interrupted."""
        starting = asyncio.create_task(work, name=what)
        stop = asyncio.create_task(self._stop.wait(), name=f"stop-during-{what}")
        await asyncio.wait({starting, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not starting.done():
            log.info("interrupted during %s; undoing what was started", what)
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return False
        try:
            starting.result()
        except (StateUnavailable, ProbeUnavailable, JoinError, OSError) as exc:
            log.error("gpumesh could not start: %s", exc)
            return False
        return True

    async def _setup_and_bind(self, runner: web.AppRunner) -> None:
        await runner.setup()                        # enters every cleanup_ctx part, in order
        assert self._api_socket is not None
        await web.SockSite(runner, self._api_socket).start()

    def build_app(self) -> web.Application:
        assert self.session is not None and self.store is not None and self.identity
        context = ClusterContext(self.identity.cluster_id, self.identity.secret,
                                 self.config.api_url, self.config.raft_address)
        app = http_app(self.store, self.node_id, self.session, self.started,
                       lambda: self.backends, cluster=context, log_dir=self.data.root / "logs",
                       node_secret=self.data.engine_secret(),
                       settings=self.config.gateway_settings(),
                       max_body_bytes=self.config.max_body_mib << 20)
        app[TELEMETRY] = self.telemetry             # routes read it; started by its part
        app[SCHEDULER] = Scheduler(reserved_memory_bytes=self.config.reserved_memory_mib << 20)
        app[ACTIVATION].wake_timeout_s = self.config.wake_timeout_s
        app[MODEL_CACHE] = self.data.root / "models"
        # The daemon's parts come before the one http_app registered (the gateway's meter
        # and stream watchdog): that one starts once the store runs and stops before it.
        for index, part in enumerate([
                self._probe_part, self._telemetry_part, self._store_part, self._membership_part,
                self._agent_part, self._reconciler_part, self._liveness_part,
                self._event_log_part, self._architectures_part, reporter_part(self.store, self.node_id, app[MODEL_CACHE])]):
            app.cleanup_ctx.insert(index, part)
        return app

    # --- the parts, in start-up order ------------------------------------------------------

    async def _probe_part(self, app: web.Application) -> AsyncIterator[None]:
        """What this machine has: GPUs (or none), and what each engine installed here can use
        (the GPUs decide which build of an engine gpumesh installs, so they come first)."""
        probe = await asyncio.to_thread(open_probe, self.config.gpu_probe, self.config.gpus)
        try:
            inventory = await asyncio.to_thread(probe.inventory)
            _check_gpu_labels(self.config.gpu_labels, [g.index for g in inventory.gpus])
            self.versions.gpu_vendors = frozenset(g.vendor for g in inventory.gpus)
            self.backends = await asyncio.to_thread(describe_backends, self.versions)
        except BaseException:
            await asyncio.to_thread(probe.close)     # opened, and nobody else will close it
            raise
        self.probe = probe
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
        assert self.store is not None and self.identity is not None
        await self.store.start()
        try:
            if self.join_plan is not None:          # Raft runs: now the leader may add us
                assert self.session is not None
                await confirm_join(self.join_plan, self.identity, self.data, self.session)
                log.info("joined cluster %s (found a member via %s)",
                         self.identity.cluster_id, self.join_plan.found_via)
            await self.store.wait_ready(_READY_TIMEOUT_S)
            yield
        finally:
            await self.store.stop()

    async def _membership_part(self, app: web.Application) -> AsyncIterator[None]:
        """The admin key on a cluster's first start, this node's record, its refresh."""
        assert self.store is not None and self.identity is not None and self.probe is not None
        await bootstrap_admin_key(self.store, self.data)
        presence = NodePresence(config=self.config, data=self.data, node_id=self.node_id,
                                store=self.store, identity=self.identity, probe=self.probe,
                                backends=self.backends, on_removed=self._stop.set,
                                gpu_usage=self.telemetry.gpu_memory_used)
        await presence.register("ready")
        async with owned_task(presence.run(), "node-presence"):
            yield
        if presence.removed:
            return                    # no record to update: re-creating it would be a ghost
        try:
            await presence.register("stopped", timeout=1.0)
        except (StateUnavailable, CommandRejected) as exc:
            log.warning("could not record this node as stopped: %s", exc)

    async def _agent_part(self, app: web.Application) -> AsyncIterator[None]:
        assert self.session is not None
        self.agent = NodeAgent(node_id=self.node_id, store=self.store, session=self.session,
                               model_cache=self.data.root / "models",
                               log_dir=self.data.root / "logs", versions=self.versions,
                               on_installed=self._refresh_backends,
                               advertise_host=self.config.advertise or self.config.host,
                               timings=Timings(
                                   health_interval_s=self.config.engine_health_interval_s,
                                   healthy_uptime_s=self.config.engine_healthy_uptime_s),
                               engine_secret=self.data.engine_secret())
        await self.agent.recover()                  # before the site binds: no stale "running"
        async with owned_task(self.agent.run(), "node-agent"):
            yield
        await self.agent.stop()

    async def _reconciler_part(self, app: web.Application) -> AsyncIterator[None]:
        scheduler = app[SCHEDULER]
        async with owned_task(ReplicaReconciler(self.store, scheduler).run(), "reconciler"):
            yield

    async def _liveness_part(self, app: web.Application) -> AsyncIterator[None]:
        """Leader only: nodes silent past the grace are unreachable; their instances move."""
        assert self.store is not None
        async with owned_task(LivenessMonitor(self.store).run(), "liveness"):
            yield

    async def _event_log_part(self, app: web.Application) -> AsyncIterator[None]:
        async with owned_task(log_state_changes(self.store), "event-log"):
            yield

    async def _architectures_part(self, app: web.Application) -> AsyncIterator[None]:
        """In the background: which model architectures this node's engines serve."""
        assert self.store is not None
        self.architectures = ArchitectureReporter(self.store, self.node_id,
                                                  lambda: self.backends, self.versions)
        async with owned_task(self.architectures.run(), "engine-architectures"):
            yield

    # --- after start-up --------------------------------------------------------------------

    async def _advertise(self) -> None:
        """mDNS, once the API answers: a joiner that finds this node can talk to it."""
        if self.discovery is None:
            return
        assert self.identity is not None
        try:
            await self.discovery.advertise(
                node_id=self.node_id, node_name=self.config.node_name,
                cluster_id=self.identity.cluster_id, api_port=self.config.api_port,
                raft_port=self.config.raft_port)
        except Exception as exc:  # noqa: BLE001 - discovery is a convenience, never fatal
            log.warning("mDNS advertisement failed: %s", exc)

    async def _refresh_backends(self) -> None:
        """An engine version was installed: the node record (and `gpumesh backends`) say so."""
        # In place: the node presence and the API hold this list.
        self.backends[:] = await asyncio.to_thread(describe_backends, self.versions)
        assert self.store is not None
        try:
            await self.store.submit({"op": "upsert_node", "node": {
                "id": self.node_id, "backends": node_backends(self.backends),
                "updated": time.time()}})
        except (StateUnavailable, CommandRejected) as exc:
            log.warning("could not record the installed engine versions: %s", exc)
        if self.architectures is not None:
            self.architectures.refresh()          # the new version's architectures

    def _announce(self) -> None:
        assert self.store is not None and self.identity is not None
        discovery = ("off" if self.config.discovery == "off" else
                     "mDNS unavailable (see the log)" if self.discovery is None else
                     f"mDNS on {mdns_address(self.config.mdns_interface, self.config.advertise)}")
        print_banner(config=self.config, node_id=self.node_id,
                     cluster_id=self.identity.cluster_id, store=self.store,
                     data_root=str(self.data.root), backends=self.backends,
                     discovery=discovery)

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
             started: float, backends: Callable[[], list[dict[str, object]]],
             cluster: ClusterContext | None = None,
             log_dir: Path | None = None, *, cluster_secret: str | None = None,
             node_secret: bytes | None = None,
             settings: GatewaySettings | None = None,
             max_body_bytes: int = 32 << 20) -> web.Application:
    """The HTTP surface of a node: errors in OpenAI's shape, one auth middleware for /v1 and
    /api, the management routes, the gateway and /metrics. The daemon adds its lifecycle
    parts; tests serve it as it is, in-process.

    The cluster's secret (`cluster.secret`, or `cluster_secret` without a cluster context)
    is what gateways show each other (as an HMAC); `node_secret` is this node's own: its
    engines' keys derive from it. Left out, each is random: a node alone, whose engines are
    started by this process.
    """
    if cluster is not None:
        cluster_secret = cluster.secret
    cluster_secret = cluster_secret or secrets.token_urlsafe(32)
    auth = Authenticator(lambda: store.view, cluster_secret)
    # One middleware: errors in OpenAI's shape, and the auth check before the handler.
    app = web.Application(middlewares=[error_middleware_with(auth.admit)],
                          client_max_size=max_body_bytes)
    ManagementApi(store, node_id, started, backends).add_routes(app)
    ClusterApi(store, node_id, started, session, cluster).add_routes(app)
    AccessApi(store).add_routes(app)
    UsageApi(store).add_routes(app)
    add_telemetry_routes(app, node_id)
    EventStream(store, node_id, session).add_routes(app)
    InstanceLogs(store, node_id, session, log_dir).add_routes(app)
    limiter = Limiter(node_id, lambda: store.view.rates)
    Gateway(store, node_id,
            routes=RouteTable(lambda: store.view, node_id,
                              node_secret or secrets.token_bytes(32)),
            forward_key=forward_key(cluster_secret),
            limiter=limiter, meter=Meter(store, node_id, limiter),
            metrics=GatewayMetrics(node_id, lambda: _latest_gpus(app)),
            settings=settings or GatewaySettings(),
            max_body_bytes=max_body_bytes).add_routes(app)
    app[ACTIVATION] = Activation(store, node_id)   # on-demand models: the gateway's hooks
    app.cleanup_ctx.append(app[ACTIVATION].part)
    EvaluateApi(store).add_routes(app)          # POST /api/models/evaluate (dry runs)
    SourcesApi(store, node_id).add_routes(app)  # /api/downloads, /api/cache
    return app


def freeze_startup_heap() -> None:
    """Tune the garbage collector for serving, once start-up is done.

    What start-up made (modules, the state, the app) lives as long as the process: it is
    moved out of the collector's sight, so a full collection no longer walks it (on the
    gateway's hot path one took ~25 ms, a stall for every request in flight). And the
    youngest generation is collected after 10,000 net new objects instead of 700: a request
    makes almost no reference cycles, but 32 requests in flight hold ~1,000 young objects,
    so at 700 the collector ran every ~25 requests and walked them all each time (~13 µs
    of CPU per request, 5-6 % of the gateway's). Cyclic garbage can now wait for at most
    10,000 objects (a few MB) before it is freed."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(10_000, older, oldest)


def _latest_gpus(app: web.Application) -> list[dict[str, Any]]:
    """The GPUs of the telemetry sampler's last sample (none when served without one)."""
    sampler = app.get(TELEMETRY)
    sample = sampler.latest() if sampler is not None else None
    return list(sample.get("gpus") or []) if sample else []


def _check_gpu_labels(labels: dict[str, dict[str, str]], offered: list[int]) -> None:
    """--gpu-label may name only GPUs this node offers: a typo must not label nothing."""
    unknown = sorted(set(labels) - {str(i) for i in offered}, key=int)
    if unknown:
        have = (f"GPUs {', '.join(map(str, offered))}" if offered else "no GPU")
        raise ProbeUnavailable(f"--gpu-label names GPU {', '.join(unknown)}, but this node "
                               f"offers {have}")
