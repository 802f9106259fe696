"""NodeAgent: make this node run exactly the instances the state assigns to it.

The agent watches the replicated state. For every instance assigned to this node it keeps
one `InstanceSupervisor`; when an instance disappears from the state (model deleted,
scaled down, moved) its supervisor is stopped and its logs removed. The agent owns the
supervisors and the runtimes they start engines with, and the daemon owns the agent:
`stop()` ends every engine this node started.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp

from gpumesh.backends.base import LaunchSpec
from gpumesh.backends.versions import BackendVersions

from .instance import InstanceSupervisor, Timings, restart_generation
from .rpc_workers import RpcWorker, rpc_duties
from .runtimes.base import Runtime
from .runtimes.container import ContainerRuntime
from .runtimes.process import ProcessRuntime
from .replicated import StateView
from .state import ClusterStore, CommandRejected

__all__ = ["NodeAgent"]

log = logging.getLogger("gpumesh.agent")

_RESYNC_S = 5.0   # re-check even without a change notification (belt and braces)


class NodeAgent:
    def __init__(self, *, node_id: str, store: ClusterStore, session: aiohttp.ClientSession,
                 model_cache: Path, log_dir: Path, versions: BackendVersions,
                 on_installed: Callable[[], Awaitable[None]] | None = None,
                 timings: Timings = Timings(), engine_secret: bytes | None = None,
                 advertise_host: str = "127.0.0.1") -> None:
        self._node_id = node_id
        self._engine_secret = engine_secret   # engines' per-instance keys derive from it
        self._store = store
        self._session = session
        self._model_cache = model_cache
        self._log_dir = log_dir
        self._versions = versions
        self._on_installed = on_installed
        self._timings = timings
        self._process_runtime = ProcessRuntime()
        self._container_runtime = ContainerRuntime(node_id)
        self._advertise_host = advertise_host    # where this node's rpc-servers listen
        self._rpc_workers: dict[str, RpcWorker] = {}
        self._stopping_rpc: set[asyncio.Task[None]] = set()
        self._rpc_stopping_now: list[RpcWorker] = []
        self._supervisors: dict[str, InstanceSupervisor] = {}
        # Supervisors told to stop whose engines may still be exiting: a second Ctrl-C
        # (kill_now) must still reach them.
        self._stopping: dict[InstanceSupervisor, asyncio.Task[None]] = {}

    def log_file(self, instance_id: str) -> Path:
        return self._log_dir / f"{instance_id}.log"

    def _runtime_for(self, spec: LaunchSpec) -> Runtime:
        return self._container_runtime if spec.image else self._process_runtime

    async def recover(self) -> None:
        """Before serving: this process has just started, so none of this node's instances
        runs, whatever the journal recorded before a restart or a crash. Saying so first
        keeps the gateway off dead ports and `deploy --wait` from trusting an old "running".
        Containers are not our children: those a crash left behind are removed here.
        """
        reaped = await self._container_runtime.reap_orphans()
        if reaped:
            log.info("removed %d engine container(s) left by an earlier run", reaped)
        self._remove_stale_logs()
        for instance in list(self._store.view.instances_on(self._node_id)):
            if instance["state"] == "scheduled":
                continue
            try:
                await self._store.submit({
                    "op": "update_instance", "id": instance["id"], "node_id": self._node_id,
                    "changes": {"state": "scheduled", "port": None, "pid": None,
                                "reason": "node restarted", "updated": time.time()}})
            except CommandRejected:
                pass                     # removed meanwhile: nothing to recover

    def _remove_stale_logs(self) -> None:
        """Logs of instances removed while this node was down."""
        mine = {i["id"] for i in self._store.view.instances_on(self._node_id)}
        for path in self._log_dir.glob("*.log*") if self._log_dir.is_dir() else ():
            if path.name.split(".log")[0] not in mine:
                path.unlink(missing_ok=True)

    async def run(self) -> None:
        """Reconcile on every state change until cancelled."""
        version = -1
        while True:
            view = await self._store.wait_changed(version, timeout=_RESYNC_S)
            version = view.version
            self.reconcile(view)

    def reconcile(self, view: StateView) -> None:
        mine = {i["id"]: i for i in view.instances_on(self._node_id)}
        wanted = mine.keys()
        for instance_id in wanted - self._supervisors.keys():
            supervisor = InstanceSupervisor(
                instance_id, node_id=self._node_id, store=self._store, session=self._session,
                model_cache=self._model_cache, log_file=self.log_file(instance_id),
                versions=self._versions, runtimes=self._runtime_for, timings=self._timings,
                on_installed=self._on_installed, engine_secret=self._engine_secret,
                restart_generation=restart_generation(mine[instance_id]))
            self._supervisors[instance_id] = supervisor
            supervisor.start()
        for instance_id, supervisor in self._supervisors.items():
            if instance_id in mine:
                supervisor.observe(mine[instance_id])      # a restart asked for anywhere
        self._reconcile_rpc_workers(view)
        for instance_id in self._supervisors.keys() - wanted:
            log.info("instance %s is no longer assigned here; stopping it", instance_id)
            self._begin_stop(instance_id, remove_logs=True)

    def _begin_stop(self, instance_id: str, remove_logs: bool = False) -> None:
        supervisor = self._supervisors.pop(instance_id)
        task = asyncio.create_task(self._retire(supervisor, remove_logs),
                                   name=f"stop-{instance_id}")
        self._stopping[supervisor] = task
        task.add_done_callback(lambda _: self._stopping.pop(supervisor, None))

    def _reconcile_rpc_workers(self, view: StateView) -> None:
        """rpc-servers this node runs for instances on other nodes (llama.cpp over RPC)."""
        duties = rpc_duties(view.instances.values(), self._node_id)
        for instance_id, worker in duties.items():
            if instance_id not in self._rpc_workers:
                rpc = RpcWorker(instance_id, worker, node_id=self._node_id,
                                host=self._advertise_host, store=self._store,
                                log_file=self._log_dir / f"{instance_id}.rpc.log")
                self._rpc_workers[instance_id] = rpc
                rpc.start()
        for instance_id in self._rpc_workers.keys() - duties.keys():
            rpc = self._rpc_workers.pop(instance_id)
            task = asyncio.create_task(rpc.stop(), name=f"stop-rpc-{instance_id}")
            self._stopping_rpc.add(task)
            task.add_done_callback(self._stopping_rpc.discard)

    async def _retire(self, supervisor: InstanceSupervisor, remove_logs: bool) -> None:
        await supervisor.stop()
        if remove_logs:                 # gone from the state; on shutdown they stay
            supervisor.remove_logs()

    async def stop(self) -> None:
        """Stop every engine this node runs and wait until they are gone."""
        for instance_id in list(self._supervisors):
            self._begin_stop(instance_id)
        rpc_workers = list(self._rpc_workers.values())
        self._rpc_workers.clear()
        self._rpc_stopping_now = rpc_workers        # a second Ctrl-C still reaches them
        await asyncio.gather(*self._stopping.values(), *(r.stop() for r in rpc_workers),
                             *self._stopping_rpc, return_exceptions=True)

    def kill_now(self) -> None:
        """The user insisted (second Ctrl-C): SIGKILL every engine without waiting, those
        already stopping included."""
        for supervisor in [*self._supervisors.values(), *self._stopping]:
            supervisor.kill_now()
        for rpc in [*self._rpc_workers.values(), *self._rpc_stopping_now]:
            rpc.kill_now()

    @property
    def running(self) -> list[str]:
        return sorted(self._supervisors)
