"""InstanceSupervisor: runs one model instance on this node until told to stop.

One supervisor owns one engine process at a time, and one asyncio task that drives it:

    fetch model files → pick a port → launch (backend's LaunchSpec) → probe health
        → running → (process exits) → error, back off, start again

Each transition is written to the replicated state (`update_instance`, conditional on the
instance still belonging to this node). The engine runs in its own process group, so
stopping kills everything it spawned; the llama.cpp runner also dies with its parent (see
`backends/llama_cpp_runner.py`), so a kill -9 of the daemon leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp

from gpumesh.backends.base import SUPERVISOR_PID_ENV, BackendUnavailable, LaunchRequest
from gpumesh.backends.registry import get_backend

from gpumesh.modelfiles import ModelFileError, resolve_model_file
from .sources import SourceError, fetch_source
from .state import ClusterStore, CommandRejected, StateUnavailable

__all__ = ["InstanceSupervisor"]

log = logging.getLogger("gpumesh.agent")

STARTUP_TIMEOUT_S = 600.0     # large models take minutes to load; tiny ones well under 1 s
STOP_GRACE_S = 10.0           # SIGTERM, then SIGKILL after this long
_HEALTH_INTERVAL_S = 0.1
_MAX_BACKOFF_S = 60.0


class InstanceFailed(Exception):
    """This attempt failed; the message is the reason users see."""


class InstanceSupervisor:
    def __init__(self, instance_id: str, *, node_id: str, store: ClusterStore,
                 session: aiohttp.ClientSession, model_cache: Path, log_file: Path) -> None:
        self.instance_id = instance_id
        self._node_id = node_id
        self._store = store
        self._session = session
        self._model_cache = model_cache
        self._log_file = log_file
        self._process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"instance-{self.instance_id}")

    async def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Stop the engine (TERM, then KILL after `grace`) and end the supervising task."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._terminate(grace)

    def kill_now(self) -> None:
        """Second Ctrl-C: no grace, no waiting."""
        if self._process is not None and self._process.returncode is None:
            _signal_group(self._process.pid, signal.SIGKILL)

    # --- the supervising loop ---------------------------------------------------------------

    async def _supervise(self) -> None:
        failures = 0
        while True:
            try:
                await self._run_once()
                return                          # the instance left the state: nothing to do
            except Exception as exc:
                if not isinstance(exc, InstanceFailed):   # a bug: keep the traceback
                    log.exception("instance %s: unexpected error", self.instance_id)
                failures += 1
                delay = min(_MAX_BACKOFF_S, 2.0 ** (failures - 1))
                log.warning("instance %s failed (attempt %d), retrying in %.0f s: %s",
                            self.instance_id, failures, delay, exc)
                await self._terminate(STOP_GRACE_S)
                await self._report("error", reason=str(exc), restarts=failures)
                await asyncio.sleep(delay)

    async def _run_once(self) -> None:
        instance, model = self._records()
        if instance is None:
            return
        backend = _backend(model["backend"])
        if model["source"]["kind"] != "local":
            await self._report("downloading")
        try:
            path = await asyncio.to_thread(fetch_source, model["source"], self._model_cache)
            if model["format"] == "gguf":
                path = await asyncio.to_thread(resolve_model_file, path)
        except (SourceError, ModelFileError) as exc:
            raise InstanceFailed(str(exc)) from None
        port = _free_port()
        allocation = instance.get("allocation", {})
        request = LaunchRequest(
            model_path=str(path), served_name=model["name"], port=port,
            gpu_vendor=allocation.get("gpu_vendor"),
            gpu_indices=tuple(allocation.get("gpu_indices", ())),
            context_length=model.get("context_length"), extra_args=tuple(model.get("args", ())))
        try:
            # Off the loop: a backend may read the model's headers (llama.cpp reads the
            # GGUF context length; ~50 ms for a 150k-token vocabulary).
            spec = await asyncio.to_thread(backend.launch, request)
        except (BackendUnavailable, ModelFileError, ValueError) as exc:
            raise InstanceFailed(str(exc)) from None
        await self._launch(spec.argv, spec.env)
        assert self._process is not None
        await self._report("starting", port=port, pid=self._process.pid, reason=None)
        await self._wait_healthy(port, backend.health_path)
        await self._report("running", reason=None)
        code = await self._process.wait()
        raise InstanceFailed(f"the engine exited with status {code}: {self._log_tail()}")

    def _records(self) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        view = self._store.view
        instance = view.instances.get(self.instance_id)
        if instance is None or instance["node_id"] != self._node_id:
            return None, {}
        return instance, view.models[instance["model"]]

    async def _launch(self, argv: tuple[str, ...], env: dict[str, str]) -> None:
        self._log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self._log_file, "ab") as log_handle:
            log_handle.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} "
                             f"starting: {' '.join(argv)}\n".encode())
            log_handle.flush()
            try:
                self._process = await asyncio.create_subprocess_exec(
                    *argv, env={**os.environ, **env, SUPERVISOR_PID_ENV: str(os.getpid())},
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_handle, stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True)   # its own process group: stop kills all of it
            except OSError as exc:
                raise InstanceFailed(f"could not start {argv[0]}: {exc}") from None

    async def _wait_healthy(self, port: int, health_path: str) -> None:
        assert self._process is not None
        url = f"http://127.0.0.1:{port}{health_path}"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.returncode is not None:
                raise InstanceFailed(f"the engine exited with status {self._process.returncode} "
                                     f"while starting: {self._log_tail()}")
            try:
                async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass                             # not listening yet
            await asyncio.sleep(_HEALTH_INTERVAL_S)
        raise InstanceFailed(f"the engine was not healthy within {STARTUP_TIMEOUT_S:.0f} s")

    async def _terminate(self, grace: float) -> None:
        # `_process` stays set until the engine is gone, so kill_now() (a second Ctrl-C)
        # still reaches an engine that is taking its grace period.
        process = self._process
        if process is None or process.returncode is not None:
            self._process = None
            return
        _signal_group(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), grace)
        except asyncio.TimeoutError:
            log.warning("instance %s ignored SIGTERM for %.0f s; killing it",
                        self.instance_id, grace)
            _signal_group(process.pid, signal.SIGKILL)
            await process.wait()
        finally:
            if self._process is process:
                self._process = None

    async def _report(self, state: str, **changes: Any) -> None:
        command = {"op": "update_instance", "id": self.instance_id, "node_id": self._node_id,
                   "changes": {"state": state, "updated": time.time(), **changes}}
        try:
            await self._store.submit(command)
        except CommandRejected:
            pass        # deleted meanwhile: the agent is about to stop this supervisor
        except StateUnavailable as exc:
            log.warning("could not record instance %s as %s: %s", self.instance_id, state, exc)

    def _log_tail(self, lines: int = 5) -> str:
        try:
            with open(self._log_file, "rb") as handle:
                handle.seek(max(0, os.path.getsize(self._log_file) - 4096))
                tail = handle.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(tail[-lines:]) or "(empty log)"


def _backend(name: str):
    try:
        return get_backend(name)
    except KeyError as exc:
        raise InstanceFailed(f"backend {name} is not known on this node: {exc}") from None


def _free_port() -> int:
    """A port the kernel says is free on loopback now; the engine binds it right after."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)       # start_new_session made pid the group id
    except ProcessLookupError:
        pass                      # already gone: nothing left to signal
