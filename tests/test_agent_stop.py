"""Stopping the node agent: a second Ctrl-C (kill_now) reaches engines already stopping.

A real child process that ignores SIGTERM stands in for an engine slow to stop (started by the
process runtime, under its guard, as engines are); the agent is asked to stop (SIGTERM, then a
10 s grace), and kill_now must end the child at once.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

from gpumesh.backends.base import LaunchSpec
from gpumesh.backends.versions import BackendVersions
from gpumesh.mesh.agent import NodeAgent
from gpumesh.mesh.instance import InstanceSupervisor
from gpumesh.mesh.runtimes.base import StartRequest
from gpumesh.mesh.runtimes.process import ProcessRuntime

STUBBORN = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)")


def test_kill_now_reaches_an_engine_that_is_already_stopping(tmp_path: Path) -> None:
    async def main() -> tuple[int | None, float]:
        log_file = tmp_path / "i1.log"
        engine = await ProcessRuntime().start(StartRequest(
            LaunchSpec(argv=(sys.executable, "-c", STUBBORN)), "i1", log_file))
        # The line it prints, not the guard's "starting: ..." line that quotes its code.
        while b"\nready\n" not in (log_file.read_bytes() if log_file.exists() else b""):
            await asyncio.sleep(0.05)
        versions = BackendVersions(tmp_path / "backends")
        agent = NodeAgent(node_id="n1", store=None, session=None,  # type: ignore[arg-type]
                          model_cache=tmp_path, log_dir=tmp_path, versions=versions)
        supervisor = InstanceSupervisor("i1", node_id="n1", store=None,  # type: ignore[arg-type]
                                        session=None, model_cache=tmp_path,  # type: ignore[arg-type]
                                        log_file=log_file, versions=versions,
                                        runtimes=lambda spec: ProcessRuntime())
        supervisor._engine = engine             # as if it had launched it
        agent._supervisors["i1"] = supervisor
        try:
            stopping = asyncio.create_task(agent.stop())   # first Ctrl-C: SIGTERM, 10 s grace
            await asyncio.sleep(0.3)
            assert engine.returncode is None and agent.running == []
            started = time.monotonic()
            agent.kill_now()                               # second Ctrl-C
            await asyncio.wait_for(stopping, 5)
            return engine.returncode, time.monotonic() - started
        finally:
            if engine.returncode is None:
                engine.kill_now()
                await engine.wait()

    code, elapsed = asyncio.run(main())
    assert code == -signal.SIGKILL
    assert elapsed < 5
