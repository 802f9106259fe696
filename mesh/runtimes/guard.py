"""The process guard: every engine process gpumesh starts runs under one.

    python -m gpumesh.mesh.runtimes.guard --log FILE -- ENGINE ARGV...

Why a guard: an engine must die with its daemon, even on kill -9, and an engine is often
several processes (vLLM: API server, engine core, workers — killing the API server leaves
the others running, holding the GPU). The daemon starts the guard as the leader of a new
process group; the engine and everything it spawns stay in that group. The guard:

1. asks the kernel for SIGHUP when the daemon dies (`PR_SET_PDEATHSIG`; also polls
   `getppid()`, and refuses to start when the daemon named in GPUMESH_SUPERVISOR_PID is
   already gone) and answers it by SIGKILLing its whole process group, itself included;
2. starts the engine with its output piped through it into the instance's log, rotated by
   size (engines write ~2 KB per request);
3. passes SIGTERM/SIGINT on to the engine's main process only (one graceful stop, as
   `docker stop` does for PID 1; a group-wide signal would hit vLLM's workers mid-shutdown);
4. exits with the engine's status (128+N when a signal N ended it), after which the daemon
   SIGKILLs whatever is left of the group.

The standard library only, and nothing heavy: it starts in ~30 ms beside every engine.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

from gpumesh.mesh.runtimes.logfile import DEFAULT_KEEP, DEFAULT_MAX_BYTES, RotatingLog

__all__ = ["main", "GUARD_MODULE", "EXIT_NOT_STARTED", "redacted"]

GUARD_MODULE = "gpumesh.mesh.runtimes.guard"
SUPERVISOR_PID_ENV = "GPUMESH_SUPERVISOR_PID"   # = gpumesh.backends.base.SUPERVISOR_PID_ENV
EXIT_NOT_STARTED = 127
_PARENT_POLL_S = 0.5
_PR_SET_PDEATHSIG = 1
_PREFIX = "gpumesh guard:"
_SECRET_FLAGS = ("--api-key", "--api_key")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    engine_argv = args.engine[1:] if args.engine[:1] == ["--"] else args.engine
    if not engine_argv:
        print(f"{_PREFIX} no engine command given", file=sys.stderr)
        return 2
    log = RotatingLog(Path(args.log), args.log_max_bytes, args.log_keep)
    _die_with_parent()
    parent = os.getppid()
    supervisor = os.environ.get(SUPERVISOR_PID_ENV)
    if supervisor is not None and int(supervisor) != parent:
        _note(log, f"supervisor {supervisor} is gone before start, not starting")
        return 1
    _note(log, "starting: " + " ".join(redacted(engine_argv)))
    try:
        engine = subprocess.Popen(engine_argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT,
                                  env={**os.environ, SUPERVISOR_PID_ENV: str(os.getpid())})
    except OSError as exc:
        _note(log, f"could not start {engine_argv[0]}: {exc.strerror or exc}")
        return EXIT_NOT_STARTED
    _forward_stop_signals(engine)
    threading.Thread(target=_pump, args=(engine, log), name="log-pump", daemon=True).start()
    threading.Thread(target=_watch_parent, args=(parent,), name="parent-watch", daemon=True).start()
    code = engine.wait()
    # Let the pump drain what the engine wrote last (its error line); a grandchild that
    # inherited the pipe may keep it open, so only briefly.
    time.sleep(0.2)
    _note(log, f"engine exited with status {code}")
    return code if code >= 0 else 128 - code


def redacted(argv: list[str]) -> list[str]:
    """argv with the value of every `--api-key` replaced: the log is readable by operators
    who must not learn the engine's key."""
    out, hide = [], False
    for arg in argv:
        if hide:
            out.append("***")
        elif arg.startswith(_SECRET_FLAGS) and "=" in arg:
            out.append(arg.split("=", 1)[0] + "=***")
        else:
            out.append(arg)
        hide = arg in _SECRET_FLAGS
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {GUARD_MODULE}")
    p.add_argument("--log", required=True, help="the instance's log file")
    p.add_argument("--log-max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    p.add_argument("--log-keep", type=int, default=DEFAULT_KEEP)
    p.add_argument("engine", nargs=argparse.REMAINDER, help="-- then the engine's argv")
    return p


def _die_with_parent() -> None:
    """SIGHUP when the daemon dies; the handler takes the whole group down."""
    signal.signal(signal.SIGHUP, _kill_group)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGHUP, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _kill_group(signum: int = 0, frame: types.FrameType | None = None) -> None:
    # No graceful stop: nobody is left to wait for one. SIGKILL reaches this process too.
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _watch_parent(parent: int) -> None:
    # A second line where PR_SET_PDEATHSIG does not exist; on Linux the signal comes first.
    while os.getppid() == parent:
        time.sleep(_PARENT_POLL_S)
    _kill_group()


def _forward_stop_signals(engine: subprocess.Popen[bytes]) -> None:
    def forward(signum: int, frame: types.FrameType | None) -> None:
        try:
            engine.send_signal(signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)


def _pump(engine: subprocess.Popen[bytes], log: RotatingLog) -> None:
    assert engine.stdout is not None
    for line in iter(engine.stdout.readline, b""):
        log.write(line)


def _note(log: RotatingLog, message: str) -> None:
    log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {_PREFIX} {message}\n".encode())


if __name__ == "__main__":
    sys.exit(main())
