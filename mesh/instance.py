"""InstanceSupervisor: runs one model instance on this node until told to stop.

One supervisor owns one engine at a time, and one asyncio task that drives it:

    fetch model files → engine version (installed on demand) → pick a port → launch
        → probe health → running (health probed all along) → it exits or stops
        answering → error, back off, start again

What runs comes from the backend (`LaunchSpec`), how it runs from a runtime: a guarded
process group (`runtimes/process.py`) or a container when the model names an image
(`runtimes/container.py`). Both die with the daemon: the guard on its parent's death, the
containers when the daemon stops or, after a crash, when it starts again.

Each transition is written to the replicated state (`update_instance`, conditional on the
instance still belonging to this node). A run that stayed healthy for `healthy_uptime_s`
resets the restart backoff, so an engine that crashes once a day restarts in a second, not
in a minute.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp

from gpumesh.backends.base import Backend, BackendUnavailable, LaunchRequest, LaunchSpec
from gpumesh.backends.registry import get_backend
from gpumesh.backends.versions import BackendVersions, InstallError
from gpumesh.modelfiles import ModelFileError, find_mmproj, resolve_model_file

from .rpc_workers import layer_split
from .runtimes.base import EngineHandle, EngineStartError, Runtime, StartRequest
from .runtimes.logfile import engine_error_line, log_files
from .auth import engine_key
from .sources import SourceError, fetch_source
from .state import ClusterStore, CommandRejected, StateUnavailable

__all__ = ["InstanceSupervisor", "Timings", "restart_generation"]

log = logging.getLogger("gpumesh.agent")

_HEALTH_POLL_S = 0.1          # while starting
_PROGRESS_EVERY_S = 1.0       # install progress written to the state at most this often


@dataclass(frozen=True)
class Timings:
    startup_timeout_s: float = 600.0   # large models take minutes to load; tiny ones < 1 s
    stop_grace_s: float = 10.0         # SIGTERM, then SIGKILL after this long
    health_interval_s: float = 5.0     # while running: one probe per interval …
    health_failures: int = 3           # … and this many failed probes in a row restart it
    healthy_uptime_s: float = 60.0     # a run this long resets the restart backoff
    max_backoff_s: float = 60.0


class InstanceFailed(Exception):
    """This attempt failed; the message is the reason users see."""


@dataclass
class _Engine:
    """What one attempt needs to know about the engine it chose."""
    backend: Backend
    version: str | None
    home: str | None


class InstanceSupervisor:
    def __init__(self, instance_id: str, *, node_id: str, store: ClusterStore,
                 session: aiohttp.ClientSession, model_cache: Path, log_file: Path,
                 versions: BackendVersions, runtimes: Callable[[LaunchSpec], Runtime],
                 timings: Timings = Timings(),
                 on_installed: Callable[[], Awaitable[None]] | None = None,
                 engine_secret: bytes | None = None, restart_generation: int = 0) -> None:
        self.instance_id = instance_id
        self._engine_secret = engine_secret
        self._node_id = node_id
        self._store = store
        self._session = session
        self._model_cache = model_cache
        self._log_file = log_file
        self._versions = versions
        self._runtime_for = runtimes
        self._timings = timings
        self._on_installed = on_installed
        self._engine: EngineHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._restarting: asyncio.Task[None] | None = None
        # Restart requests already served: the record's count when this supervisor began
        # (a node that restarts does not replay old requests), then each one acted on.
        self._restart_generation = restart_generation
        self._attempt_started_at = 0      # log offset where this attempt's output begins

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"instance-{self.instance_id}")

    def observe(self, instance: dict[str, Any]) -> None:
        """The instance's record changed: restart the engine if someone asked since."""
        generation = restart_generation(instance)
        if generation <= self._restart_generation:
            return
        self._restart_generation = generation
        if self._restarting is None or self._restarting.done():  # else one is under way
            self._restarting = asyncio.create_task(self._restart(),
                                                   name=f"restart-{self.instance_id}")

    async def _restart(self) -> None:
        """Stop the engine and supervise afresh (backoff from 1 s again). The record says
        "starting" first, so gateways stop routing to the port before the engine goes."""
        log.info("instance %s: restarting its engine on request", self.instance_id)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while True:            # a request that arrives meanwhile is answered by this one too
            handled = self._restart_generation
            await self._report("starting", reason="restarting on request", port=None,
                               pid=None, restart_handled=handled)
            await self._terminate(self._timings.stop_grace_s)
            if self._restart_generation == handled:
                break
        self._task = asyncio.create_task(self._supervise(), name=f"instance-{self.instance_id}")

    async def stop(self, grace: float | None = None) -> None:
        """Stop the engine (TERM, then KILL after `grace`) and end the supervising task."""
        if self._restarting is not None:
            self._restarting.cancel()
            await asyncio.gather(self._restarting, return_exceptions=True)
            self._restarting = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._terminate(self._timings.stop_grace_s if grace is None else grace)

    def kill_now(self) -> None:
        """Second Ctrl-C: no grace, no waiting."""
        if self._engine is not None:
            self._engine.kill_now()

    def remove_logs(self) -> None:
        """The instance is gone from the state: its logs go with it."""
        for path in log_files(self._log_file):
            path.unlink(missing_ok=True)

    # --- the supervising loop ---------------------------------------------------------------

    async def _supervise(self) -> None:
        failures = 0
        while True:
            started = time.monotonic()
            healthy_since: list[float] = []
            try:
                await self._run_once(healthy_since)
                return                          # the instance left the state: nothing to do
            except Exception as exc:
                if not isinstance(exc, InstanceFailed):   # a bug: keep the traceback
                    log.exception("instance %s: unexpected error", self.instance_id)
                if healthy_since and time.monotonic() - healthy_since[0] >= self._timings.healthy_uptime_s:
                    failures = 0                # a long healthy run: start over at 1 s
                failures += 1
                delay = min(self._timings.max_backoff_s, 2.0 ** (failures - 1))
                log.warning("instance %s failed (attempt %d, after %.0f s), retrying in %.0f s: %s",
                            self.instance_id, failures, time.monotonic() - started, delay, exc)
                await self._terminate(self._timings.stop_grace_s)
                await self._report("error", reason=str(exc), restarts=failures)
                await asyncio.sleep(delay)

    async def _run_once(self, healthy_since: list[float]) -> None:
        instance, model = self._records()
        if instance is None:
            return
        path = await self._fetch(model)
        engine = await self._choose_engine(model)
        rpc_servers = await self._rpc_servers(instance)
        request = self._launch_request(instance, model, path, engine, rpc_servers)
        try:
            # Off the loop: a backend may read the model's headers (llama.cpp reads the
            # GGUF context length; ~50 ms for a 150k-token vocabulary).
            spec = await asyncio.to_thread(engine.backend.launch, request)
        except (BackendUnavailable, ModelFileError, ValueError) as exc:
            raise InstanceFailed(str(exc)) from None
        runtime = self._runtime_for(spec)
        self._attempt_started_at = self._log_size()
        try:
            self._engine = await runtime.start(StartRequest(
                spec=spec, instance_id=self.instance_id, log_file=self._log_file,
                gpu_vendor=request.gpu_vendor, gpu_indices=request.gpu_indices))
        except EngineStartError as exc:
            raise InstanceFailed(str(exc)) from None
        await self._report("starting", port=request.port, pid=self._engine.pid, reason=None,
                           progress=None, engine={
                               "backend": engine.backend.name, "version": engine.version,
                               "runtime": runtime.name, "image": spec.image,
                               "container": self._engine.container_id})
        headers = _auth_headers(request.api_key)
        await self._until_rpc_lost(
            self._wait_healthy(request.port, engine.backend.health_path, headers), rpc_servers)
        await self._report("running", reason=None)
        healthy_since.append(time.monotonic())
        await self._watch(request.port, engine.backend.health_path, headers, rpc_servers)

    def _records(self) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        view = self._store.view
        instance = view.instances.get(self.instance_id)
        if instance is None or instance["node_id"] != self._node_id:
            return None, {}
        return instance, view.models[instance["model"]]

    async def _fetch(self, model: dict[str, Any]) -> Path:
        if model["source"]["kind"] != "local":
            await self._report("downloading")
        try:
            path = await asyncio.to_thread(fetch_source, model["source"], self._model_cache)
            if model["format"] == "gguf":
                path = await asyncio.to_thread(resolve_model_file, path)
        except (SourceError, ModelFileError) as exc:
            raise InstanceFailed(str(exc)) from None
        return path

    async def _choose_engine(self, model: dict[str, Any]) -> _Engine:
        """The engine version the model asks for: built in, installed, or installed now."""
        try:
            backend = get_backend(model["backend"])
        except KeyError as exc:
            raise InstanceFailed(f"backend {model['backend']} is not known on this node: {exc}") from None
        wanted = model.get("backend_version")
        if model.get("image"):
            return _Engine(backend, wanted, None)   # the image is the version
        builtin = await asyncio.to_thread(_builtin_version, backend)
        if builtin is not None and wanted in (None, builtin):
            return _Engine(backend, builtin, None)
        found = await asyncio.to_thread(self._versions.find, backend.name, wanted)
        if found is None:
            found = await self._install(backend, wanted)
        return _Engine(backend, found.version, str(found.home))

    async def _install(self, backend: Backend, version: str | None):  # -> InstalledVersion
        label = f"{backend.name}{'==' + version if version else ''}"
        await self._report("installing", reason=None,
                           progress={"step": f"installing {label}", "elapsed_s": 0})
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        last_sent = [0.0]

        def on_line(line: str) -> None:      # on the installer's thread
            now = time.monotonic()
            if now - last_sent[0] >= _PROGRESS_EVERY_S:
                last_sent[0] = now
                progress = {"step": line[:200], "elapsed_s": round(now - started, 1)}
                asyncio.run_coroutine_threadsafe(
                    self._report("installing", progress=progress), loop)

        log.info("instance %s: installing %s under %s", self.instance_id, label, self._versions.root)
        try:
            found = await asyncio.to_thread(self._versions.install, backend, version, on_line)
        except InstallError as exc:
            raise InstanceFailed(f"could not install {label}: {exc}") from None
        log.info("instance %s: installed %s %s in %.0f s", self.instance_id, backend.name,
                 found.version, time.monotonic() - started)
        if self._on_installed is not None:
            await self._on_installed()
        return found

    async def _rpc_servers(self, instance: dict[str, Any]) -> tuple[str, ...]:
        """For a model spread over nodes (llama.cpp RPC): the workers' rpc-servers, in the
        allocation's order, once every worker node has recorded one (rpc_workers.py)."""
        allocation = instance.get("allocation") or {}
        if allocation.get("mechanism") != "llama.cpp-rpc":
            return ()
        workers = [w["node_id"] for w in allocation.get("workers") or []]
        await self._report("starting", reason=f"waiting for rpc-servers on {len(workers)} "
                           "worker node(s)")
        deadline = time.monotonic() + self._timings.startup_timeout_s
        version = -1
        endpoints: dict[str, str] = {}
        while time.monotonic() < deadline:
            view = await self._store.wait_changed(version, timeout=1.0)
            version = view.version
            endpoints = (view.instances.get(self.instance_id) or {}).get("rpc_endpoints") or {}
            if all(node in endpoints for node in workers):
                return tuple(endpoints[node] for node in workers)
        missing = [node for node in workers if node not in endpoints]
        raise InstanceFailed(f"no rpc-server answered from worker node(s) {', '.join(missing)} "
                             f"within {self._timings.startup_timeout_s:.0f} s")

    def _launch_request(self, instance: dict[str, Any], model: dict[str, Any], path: Path,
                        engine: _Engine, rpc_servers: tuple[str, ...] = ()) -> LaunchRequest:
        allocation = instance.get("allocation", {})
        estimate = model.get("estimate") or {}
        kind = model.get("kind") or "llm"
        mmproj = find_mmproj(path) if kind == "vlm" and model["format"] == "gguf" else None
        return LaunchRequest(
            model_path=str(path), served_name=model["name"], port=_free_port(),
            gpu_vendor=allocation.get("gpu_vendor"),
            gpu_indices=tuple(allocation.get("gpu_indices", ())),
            context_length=model.get("context_length"), extra_args=tuple(model.get("args", ())),
            kind=kind, memory_bytes=allocation.get("memory_bytes"),
            device_memory_bytes=self._device_memory(allocation),
            weights_bytes=estimate.get("weights_bytes"),
            kv_cache_bytes=estimate.get("kv_cache_bytes"), engine_home=engine.home,
            image=model.get("image"), mmproj_path=str(mmproj) if mmproj else None,
            rpc_servers=rpc_servers,
            rpc_layer_split=layer_split(instance) if rpc_servers else (),
            # Only this node's gateway can compute it (mesh/auth.py): nothing else on the
            # host can call the engine.
            api_key=(engine_key(self._engine_secret, self.instance_id)
                     if self._engine_secret is not None else None))

    def _device_memory(self, allocation: dict[str, Any]) -> int | None:
        """The smallest total memory among this instance's GPUs (from the node's inventory)."""
        indices = set(allocation.get("gpu_indices") or ())
        node = self._store.view.nodes.get(self._node_id) or {}
        sizes = [g["memory_total_bytes"] for g in node.get("inventory", {}).get("gpus", [])
                 if g.get("index") in indices]
        return min(sizes) if sizes else None

    # --- health ---------------------------------------------------------------------------

    async def _wait_healthy(self, port: int, health_path: str, headers: dict[str, str]) -> None:
        assert self._engine is not None
        deadline = time.monotonic() + self._timings.startup_timeout_s
        while time.monotonic() < deadline:
            if self._engine.returncode is not None:
                raise InstanceFailed(f"the engine exited with status {self._engine.returncode} "
                                     f"while starting: {self._engine_error()}")
            if await self._probe(port, health_path, headers, timeout=2):
                return
            await asyncio.sleep(_HEALTH_POLL_S)
        raise InstanceFailed(f"the engine was not healthy within "
                             f"{self._timings.startup_timeout_s:.0f} s")

    async def _until_rpc_lost(self, step: Awaitable[None], rpc_servers: tuple[str, ...]) -> None:
        """Run `step`; for a model spread over nodes, fail as soon as a worker's rpc-server
        is gone or moved (llama-server cannot reconnect: it must start again)."""
        if not rpc_servers:
            await step
            return
        work = asyncio.ensure_future(step)
        lost = asyncio.ensure_future(self._rpc_lost(rpc_servers))
        try:
            done, _ = await asyncio.wait({work, lost}, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                work.result()
                return
            raise InstanceFailed(lost.result())
        finally:
            for task in (work, lost):
                task.cancel()
            await asyncio.gather(work, lost, return_exceptions=True)

    async def _rpc_lost(self, rpc_servers: tuple[str, ...]) -> str:
        """Returns (why) once the workers' recorded endpoints differ from `rpc_servers`."""
        version = -1
        while True:
            view = await self._store.wait_changed(version, timeout=5.0)
            version = view.version
            instance = view.instances.get(self.instance_id)
            if instance is None:
                continue                 # leaving the state: the agent stops us
            workers = [w["node_id"] for w in (instance.get("allocation") or {}).get("workers") or []]
            endpoints = instance.get("rpc_endpoints") or {}
            for node, was in zip(workers, rpc_servers):
                now = endpoints.get(node)
                if now != was:
                    return (f"the rpc-server on worker node {node} "
                            f"{'stopped' if now is None else f'moved to {now}'}; "
                            f"restarting with the workers' current rpc-servers")

    async def _watch(self, port: int, health_path: str, headers: dict[str, str],
                     rpc_servers: tuple[str, ...] = ()) -> None:
        """Until the engine exits or stops answering its health check (a stopped or wedged
        engine would otherwise hold every request routed to it), or a worker's rpc-server
        of a model spread over nodes goes away."""
        assert self._engine is not None
        exited = asyncio.ensure_future(self._engine.wait())
        lost = asyncio.ensure_future(self._rpc_lost(rpc_servers)) if rpc_servers else None
        failed = 0
        try:
            while True:
                done, _ = await asyncio.wait({exited, *([lost] if lost else [])},
                                             timeout=self._timings.health_interval_s)
                if lost is not None and lost in done:
                    raise InstanceFailed(lost.result())
                if done:
                    raise InstanceFailed(f"the engine exited with status {exited.result()}: "
                                         f"{self._engine_error()}")
                if await self._probe(port, health_path, headers,
                                     timeout=self._timings.health_interval_s):
                    failed = 0
                    continue
                failed += 1
                if failed >= self._timings.health_failures:
                    # It does not answer, so it would not answer SIGTERM either.
                    self._engine.kill_now()
                    raise InstanceFailed(
                        f"the engine stopped answering its health check ({failed} probes in a "
                        f"row, {self._timings.health_interval_s:g} s apart); restarting it")
        finally:
            exited.cancel()
            if lost is not None:
                lost.cancel()

    async def _probe(self, port: int, path: str, headers: dict[str, str], timeout: float) -> bool:
        url = f"http://127.0.0.1:{port}{path}"
        try:
            async with self._session.get(url, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    # --- stopping, reporting, logs -----------------------------------------------------------

    async def _terminate(self, grace: float) -> None:
        # `_engine` stays set until the engine is gone, so kill_now() (a second Ctrl-C)
        # still reaches an engine that is taking its grace period.
        engine = self._engine
        if engine is None:
            return
        try:
            await engine.stop(grace)
        finally:
            if self._engine is engine:
                self._engine = None

    async def _report(self, state: str, **changes: Any) -> None:
        command = {"op": "update_instance", "id": self.instance_id, "node_id": self._node_id,
                   "changes": {"state": state, "updated": time.time(), **changes}}
        try:
            await self._store.submit(command)
        except CommandRejected:
            pass        # deleted meanwhile: the agent is about to stop this supervisor
        except StateUnavailable as exc:
            log.warning("could not record instance %s as %s: %s", self.instance_id, state, exc)

    def _log_size(self) -> int:
        try:
            return self._log_file.stat().st_size
        except OSError:
            return 0

    def _engine_error(self) -> str:
        """The engine's own words for why this attempt ended (see engine_error_line)."""
        try:
            with open(self._log_file, "rb") as handle:
                size = handle.seek(0, 2)
                start = self._attempt_started_at if self._attempt_started_at <= size else 0
                handle.seek(max(start, size - 64 * 1024))
                text = handle.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        return engine_error_line(text.splitlines())


def restart_generation(instance: dict[str, Any]) -> int:
    """How many restarts were asked for this instance (`restart_instance`)."""
    return int(instance.get("restart_generation") or 0)


def _builtin_version(backend: Backend) -> str | None:
    try:
        return backend.version()
    except BackendUnavailable:
        return None


def _auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _free_port() -> int:
    """A port the kernel says is free on loopback now; the engine binds it right after."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
