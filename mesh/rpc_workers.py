"""llama.cpp RPC workers: this node lends its devices to an instance that runs elsewhere.

The scheduler spreads one llama.cpp model over nodes by giving the instance (on its head
node) an allocation with `mechanism: "llama.cpp-rpc"` and `workers: [{node_id, device,
gpu_indices, memory_bytes}]`. The contract, by side:

- Each worker node's agent keeps one `RpcWorker` per such instance that names it: an
  `rpc-server` (llama.cpp's, under the process guard like any engine) on the node's
  advertised address and a free port, recorded in the instance as
  `rpc_endpoints[node_id] = "host:port"` (command `set_rpc_endpoint`; None when it stops).
- The head's supervisor waits until every worker has an endpoint, then starts llama-server
  with `--rpc host:port,...` in the allocation's worker order and the plan's layer split
  (`layer_split`), and restarts it when a worker's endpoint changes or goes (`instance.py`):
  llama-server does not reconnect to an rpc-server that went away.
- A worker node that goes away (unreachable, stopped, drained) takes the whole instance
  with it (`commands/nodes.py`), and the scheduler plans it again on the nodes left.

rpc-server has no authentication: it binds the advertised (cluster) address only, never all
interfaces. It restarts with a backoff when it exits, and goes when the instance does.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import Any

from gpumesh.backends.base import BackendUnavailable
from gpumesh.backends.llama_cpp import LlamaCppBackend

from .runtimes.base import EngineHandle, EngineStartError, StartRequest
from .runtimes.process import ProcessRuntime
from .state import ClusterStore, CommandRejected, StateUnavailable

__all__ = ["RpcWorker", "layer_split", "rpc_duties"]

log = logging.getLogger("gpumesh.agent")

_MAX_BACKOFF_S = 60.0
_LISTEN_TIMEOUT_S = 60.0


def rpc_duties(instances: Any, node_id: str) -> dict[str, dict[str, Any]]:
    """Instance id -> this node's worker entry, for every instance that asks this node for
    an rpc-server."""
    duties = {}
    for instance in instances:
        allocation = instance.get("allocation") or {}
        if allocation.get("mechanism") != "llama.cpp-rpc" or instance["node_id"] == node_id:
            continue
        for worker in allocation.get("workers") or []:
            if worker.get("node_id") == node_id:
                duties[instance["id"]] = {**worker, "gpu_vendor": allocation.get("gpu_vendor")}
    return duties


def layer_split(instance: dict[str, Any]) -> tuple[int, ...]:
    """The plan's bytes of weights + KV cache per device, in llama.cpp's device order (each
    worker's devices in the allocation's worker order, then the head's GPUs, or its CPU):
    what `LaunchRequest.rpc_layer_split` asks for. () for plans that carry no split."""
    allocation = instance.get("allocation") or {}
    bookings = allocation.get("bookings") or []
    shares = allocation.get("split_bytes") or []
    if not shares or len(shares) != len(bookings):
        return ()
    by_node: dict[str, list[tuple[int, int]]] = {}
    for booking, share in zip(bookings, shares):
        index = booking.get("gpu_index") if booking.get("device") == "gpu" else -1
        by_node.setdefault(booking["node_id"], []).append((index, int(share)))
    order = [w["node_id"] for w in allocation.get("workers") or []] + [instance["node_id"]]
    return tuple(share for node in order for _, share in sorted(by_node.get(node, [])))


class RpcWorker:
    def __init__(self, instance_id: str, worker: dict[str, Any], *, node_id: str, host: str,
                 store: ClusterStore, log_file: Path) -> None:
        self.instance_id = instance_id
        self._worker = worker
        self._node_id = node_id
        self._host = host
        self._store = store
        self._log_file = log_file
        self._engine: EngineHandle | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"rpc-{self.instance_id}")

    async def stop(self, grace: float = 5.0) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._engine is not None:
            await self._engine.stop(grace)
            self._engine = None
        await self._record(None)

    def kill_now(self) -> None:
        if self._engine is not None:
            self._engine.kill_now()

    async def _run(self) -> None:
        failures = 0
        while True:
            port = _free_port(self._host)
            on_gpu = self._worker.get("device") == "gpu" and self._worker.get("gpu_indices")
            try:
                spec = LlamaCppBackend().rpc_server_launch(
                    self._host, port, self._worker.get("gpu_vendor") if on_gpu else None,
                    tuple(self._worker.get("gpu_indices") or ()) if on_gpu else ())
                self._engine = await ProcessRuntime().start(StartRequest(
                    spec, f"{self.instance_id}.rpc", self._log_file))
            except (BackendUnavailable, EngineStartError) as exc:
                log.warning("instance %s: cannot lend this node's devices: %s",
                            self.instance_id, exc)
                await asyncio.sleep(_MAX_BACKOFF_S)
                continue
            if await self._listening(port):      # recorded once it accepts connections
                await self._record(f"{self._host}:{port}")
            code = await self._engine.wait()
            self._engine = None
            await self._record(None)
            failures += 1
            delay = min(_MAX_BACKOFF_S, 2.0 ** (failures - 1))
            log.warning("instance %s: rpc-server exited with status %s; again in %.0f s",
                        self.instance_id, code, delay)
            await asyncio.sleep(delay)

    async def _listening(self, port: int) -> bool:
        assert self._engine is not None
        deadline = asyncio.get_running_loop().time() + _LISTEN_TIMEOUT_S
        while asyncio.get_running_loop().time() < deadline and self._engine.returncode is None:
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(self._host, port), timeout=1)
                writer.close()
                return True
            except (OSError, asyncio.TimeoutError):
                await asyncio.sleep(0.1)
        return False

    async def _record(self, endpoint: str | None) -> None:
        try:
            await self._store.submit({"op": "set_rpc_endpoint", "id": self.instance_id,
                                      "node_id": self._node_id, "endpoint": endpoint})
        except CommandRejected:
            pass                 # the instance is gone (or moved): the agent stops us next
        except StateUnavailable as exc:
            log.warning("could not record the rpc-server of %s: %s", self.instance_id, exc)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
