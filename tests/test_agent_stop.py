"""Stopping the node agent: a second Ctrl-C (kill_now) reaches engines already stopping.

A real child process that ignores SIGTERM stands in for an engine slow to stop; the agent is
asked to stop (SIGTERM, then a 10 s grace), and kill_now must end the child at once.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

from gpumesh.mesh.agent import NodeAgent
from gpumesh.mesh.instance import InstanceSupervisor

STUBBORN = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)")


def test_kill_now_reaches_an_engine_that_is_already_stopping(tmp_path: Path) -> None:
    async def main() -> tuple[int | None, float]:
        engine = await asyncio.create_subprocess_exec(
            sys.executable, "-c", STUBBORN, stdout=asyncio.subprocess.PIPE,
            start_new_session=True)
        assert engine.stdout is not None
        await engine.stdout.readline()
        agent = NodeAgent(node_id="n1", store=None, session=None,  # type: ignore[arg-type]
                          model_cache=tmp_path, log_dir=tmp_path)
        supervisor = InstanceSupervisor("i1", node_id="n1", store=None,  # type: ignore[arg-type]
                                        session=None, model_cache=tmp_path,  # type: ignore[arg-type]
                                        log_file=tmp_path / "i1.log")
        supervisor._process = engine            # as if it had launched it
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
                engine.kill()
                await engine.wait()

    code, elapsed = asyncio.run(main())
    assert code == -signal.SIGKILL
    assert elapsed < 5
