"""The process runtime: the engine runs under the guard (`guard.py`), in its own process
group, its output rotated into the instance's log.

Stop: SIGTERM to the guard, which passes it to the engine; after the grace period, SIGKILL
to the whole group. After the guard exits for any reason, whatever is left of its group
(vLLM's engine core and workers when its API server crashed) is SIGKILLed too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from gpumesh.backends.base import SUPERVISOR_PID_ENV

from .base import EngineHandle, EngineStartError, Runtime, StartRequest
from .guard import GUARD_MODULE

__all__ = ["ProcessRuntime"]

log = logging.getLogger("gpumesh.agent")


class ProcessRuntime(Runtime):
    name = "process"

    async def start(self, request: StartRequest) -> EngineHandle:
        argv = [sys.executable, "-m", GUARD_MODULE, "--log", str(request.log_file), "--",
                *request.spec.argv]
        env = {**os.environ, **request.spec.env, SUPERVISOR_PID_ENV: str(os.getpid())}
        try:
            # Started from the event loop's thread, which lives as long as the daemon: the
            # guard's parent-death signal fires when the *thread* that forked it ends.
            process = await asyncio.create_subprocess_exec(
                *argv, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True)     # its own process group: stop takes all of it
        except OSError as exc:
            raise EngineStartError(f"could not start the engine guard: {exc}") from None
        return ProcessHandle(process)


class ProcessHandle(EngineHandle):
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        self.pid = process.pid          # = its process group id

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    async def wait(self) -> int:
        code = await self._process.wait()
        _signal_group(self._process.pid, signal.SIGKILL)     # leftovers of a dead engine
        return code

    async def stop(self, grace: float) -> None:
        if self._process.returncode is None:
            try:
                self._process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(self._process.wait(), grace)
            except asyncio.TimeoutError:
                log.warning("engine %d ignored SIGTERM for %.0f s; killing it",
                            self._process.pid, grace)
        _signal_group(self._process.pid, signal.SIGKILL)
        await self._process.wait()

    def kill_now(self) -> None:
        _signal_group(self._process.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)       # start_new_session made the guard's pid the group id
    except (ProcessLookupError, PermissionError):
        pass                       # nothing left in the group
