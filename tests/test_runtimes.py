"""The process runtime and its guard, for real: engines die with their daemon (the whole
process group, grandchildren included), a stop reaches the engine once, logs rotate; and
the engine's own error line is what users see."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness import pid_alive

from gpumesh.backends.base import LaunchSpec
from gpumesh.mesh.runtimes.logfile import engine_error_line
from gpumesh.mesh.runtimes.base import StartRequest
from gpumesh.mesh.runtimes.guard import EXIT_NOT_STARTED, redacted
from gpumesh.mesh.runtimes.logfile import RotatingLog, log_files
from gpumesh.mesh.runtimes.process import ProcessRuntime

# An engine with a child of its own (as vLLM has its engine core and workers): prints both
# pids, passes SIGTERM on as "stopping", and otherwise waits.
FAMILY = """
import os, signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
print(f"engine {os.getpid()} child {child.pid}", flush=True)
def stop(signum, frame):
    print("stopping", flush=True)
    sys.exit(3)
signal.signal(signal.SIGTERM, stop)
time.sleep(300)
"""


def _wait_for_line(path: Path, prefix: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line
        time.sleep(0.05)
    raise AssertionError(f"no line starting {prefix!r} in {path} after {timeout} s")


def _gone(pids: list[int], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(pid_alive(p) for p in pids)


def test_kill_9_of_the_daemon_takes_the_engine_and_its_children(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    # A stand-in daemon: starts the engine through the process runtime, then waits.
    daemon_code = (
        "import asyncio, sys\n"
        "from gpumesh.backends.base import LaunchSpec\n"
        "from gpumesh.mesh.runtimes.base import StartRequest\n"
        "from gpumesh.mesh.runtimes.process import ProcessRuntime\n"
        "async def main():\n"
        f"    h = await ProcessRuntime().start(StartRequest(LaunchSpec((sys.executable, '-c', {FAMILY!r})), 'i1', __import__('pathlib').Path({str(log)!r})))\n"
        "    print(h.pid, flush=True)\n"
        "    await asyncio.sleep(300)\n"
        "asyncio.run(main())\n")
    daemon = subprocess.Popen([sys.executable, "-c", daemon_code], stdout=subprocess.PIPE)
    try:
        guard = int(daemon.stdout.readline())  # type: ignore[union-attr]
        words = _wait_for_line(log, "engine ").split()
        engine, child = int(words[1]), int(words[3])
        assert os.getpgid(engine) == os.getpgid(child) == guard   # one group, led by the guard
        daemon.kill()                                              # no clean shutdown at all
        daemon.wait()
        assert _gone([guard, engine, child]), "an engine process outlived its daemon"
    finally:
        daemon.kill()
        daemon.wait()


def test_stop_reaches_the_engine_once_and_nothing_of_it_is_left(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"

    async def main() -> tuple[int | None, list[int]]:
        handle = await ProcessRuntime().start(StartRequest(
            LaunchSpec((sys.executable, "-c", FAMILY)), "i1", log))
        words = (await asyncio.to_thread(_wait_for_line, log, "engine ")).split()
        await handle.stop(grace=10)
        return handle.returncode, [handle.pid or 0, int(words[1]), int(words[3])]

    code, pids = asyncio.run(main())
    assert code == 3                                  # the engine's own exit status
    assert log.read_text().splitlines().count("stopping") == 1   # SIGTERM reached it once
    assert _gone(pids, timeout=5), "a child of the engine survived its stop"
    text = log.read_text()
    assert "gpumesh guard: starting: " in text and "engine exited with status 3" in text


def test_a_command_that_does_not_exist_says_so_in_the_log(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"

    async def main() -> int:
        handle = await ProcessRuntime().start(StartRequest(
            LaunchSpec(("/nonexistent/engine", "--port", "1")), "i1", log))
        return await handle.wait()

    assert asyncio.run(main()) == EXIT_NOT_STARTED
    assert "could not start /nonexistent/engine: No such file or directory" in log.read_text()


def test_the_engine_key_never_reaches_the_log() -> None:
    assert redacted(["sglang", "--api-key", "s3cret", "--port", "1", "--api-key=s3cret"]) == [
        "sglang", "--api-key", "***", "--port", "1", "--api-key=***"]


def test_logs_rotate_by_size_and_keep_two_old_files(tmp_path: Path) -> None:
    path = tmp_path / "i.log"
    log = RotatingLog(path, max_bytes=1000, keep=2)
    for i in range(100):
        log.write(f"line {i:04d} {'x' * 40}\n".encode())
    log.close()
    files = log_files(path)
    assert [f.name for f in files] == ["i.log.2", "i.log.1", "i.log"]
    assert all(f.stat().st_size <= 1000 for f in files)
    text = "".join(f.read_text() for f in files)
    assert text.endswith(f"line 0099 {'x' * 40}\n")      # the newest lines are all there
    assert "line 0000" not in text                       # the oldest have been dropped


def test_the_engines_own_error_line_beats_its_usage_text() -> None:
    argparse_output = [
        "--- 2026-11-30 10:00:00 gpumesh guard: starting: python -m engine --bogus",
        "usage: api_server.py [-h] [--host HOST] [--port PORT]",
        "                     [--model MODEL] [--served-model-name NAME ...]",
        "api_server.py: error: unrecognized arguments: --bogus",
        "--- 2026-11-30 10:00:01 gpumesh guard: engine exited with status 2",
    ]
    assert engine_error_line(argparse_output) == (
        "api_server.py: error: unrecognized arguments: --bogus")
    traceback = ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
                 "    main()", "(EngineCore pid=17) ValueError: head size 16 is not supported"]
    assert engine_error_line(traceback) == "(EngineCore pid=17) ValueError: head size 16 is not supported"
    assert engine_error_line(["loading model", "done"]) == "done"
    assert engine_error_line([]) == "(no output)"


def test_signals_are_passed_on_not_acted_on_by_the_guard(tmp_path: Path) -> None:
    """SIGINT to the guard alone (not the group) still stops the engine gracefully."""
    log = tmp_path / "engine.log"

    async def main() -> int:
        handle = await ProcessRuntime().start(StartRequest(
            LaunchSpec((sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)")),
            "i1", log))
        await asyncio.to_thread(_wait_for_line, log, "up")
        os.kill(handle.pid or 0, signal.SIGINT)
        return await asyncio.wait_for(handle.wait(), 10)

    assert asyncio.run(main()) == 128 + signal.SIGINT   # the engine died of it, not the guard
