"""Serve one GGUF model with llama.cpp's HTTP server, in this process, through xllamacpp.

    python -m gpumesh.backends.llama_cpp_runner -m MODEL.gguf --port 8081 --alias NAME

It takes `llama-server`'s own flags (the subset listed in `_parser`), so the llama.cpp
backend builds one argv for both this runner and a real `llama-server` binary. It imports
nothing of gpumesh, so another xllamacpp version's virtual env runs it as a file
(`python -I path/to/llama_cpp_runner.py ...`). The
`xllamacpp` wheel carries llama.cpp's server compiled into a Python extension, so a node
serves GGUF models on the CPU (or on the GPUs of a CUDA/HIP wheel) with nothing else installed.

Lifecycle, in order:

1. Ask the kernel for SIGKILL when the parent dies (Linux `PR_SET_PDEATHSIG`), and watch
   `getppid()` as a second line: an engine never outlives the gpumesh daemon that started
   it, even when the daemon is killed with SIGKILL. No graceful stop then: nobody waits
   for one, and llama.cpp's shutdown can take seconds.
2. Load the model and bind the port. Loading is one blocking C call that Python signal
   handlers cannot interrupt, so SIGTERM/SIGINT keep their default action (die at once)
   until the model is up: there is nothing to clean up yet. A stop in this phase ends
   the process with status -SIGTERM instead of 0; both mean "stopped as asked".
3. Print one line, `... listening on http://HOST:PORT ...`, to stdout.
4. Block until SIGTERM/SIGINT or the parent's death, stop the server and exit 0. A second
   signal during shutdown, or a shutdown that takes longer than SHUTDOWN_GRACE_S, kills
   the process at once.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import threading
import types
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import xllamacpp

__all__ = ["main", "request_parent_death_signal"]

# The same name as gpumesh.backends.base.SUPERVISOR_PID_ENV (a test keeps them equal): this
# file is run by interpreters that have no gpumesh to import it from.
SUPERVISOR_PID_ENV = "GPUMESH_SUPERVISOR_PID"
API_KEY_ENV = "LLAMA_API_KEY"    # llama-server's own name for it
PARENT_POLL_S = 0.5        # how often getppid() is compared with the parent we started under
SHUTDOWN_GRACE_S = 5       # after this, SIGALRM's default action ends a stuck shutdown
_PR_SET_PDEATHSIG = 1      # from <linux/prctl.h>
_PREFIX = "llama.cpp runner:"
_POOLING = ("none", "mean", "cls", "last", "rank")


def main(argv: list[str] | None = None) -> int:
    if "--list-devices" in (sys.argv[1:] if argv is None else argv):
        return _list_devices()
    args = _parser().parse_args(argv)
    request_parent_death_signal(signal.SIGKILL)
    parent_pid = os.getppid()
    # The supervisor names itself: if it died before the line above, our parent is already
    # someone else (init), and the death signal will never come.
    supervisor = os.environ.get(SUPERVISOR_PID_ENV)
    if supervisor is not None and int(supervisor) != parent_pid:
        print(f"{_PREFIX} supervisor {supervisor} is gone before start, not starting",
              file=sys.stderr, flush=True)
        return 1
    if not Path(args.model).is_file():
        print(f"{_PREFIX} model file not found: {args.model}", file=sys.stderr)
        return 1
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)   # see step 2 in the module doc
    server = _start_server(args)
    if server is None:
        return 1
    stop = _install_stop_handlers()   # as soon as possible: /health already answers
    _wait_for_main_loop(server)
    print(f"{_PREFIX} serving {args.model} as {_alias(args)!r}, listening on {server.listening_address}"
          f" (pid {os.getpid()})", flush=True)
    _wait_for_stop(stop, parent_pid)
    _arm_forced_exit()
    del server   # the only reference: the engine's destructor stops HTTP and joins its loop
    signal.alarm(0)
    return 0


def _list_devices() -> int:
    """Print the devices this xllamacpp build can use, as `llama-server --list-devices` does
    (the CPU is not listed), so the backend reads both engines with one parser."""
    import xllamacpp

    print("Available devices:")
    for device in xllamacpp.get_device_info():
        if device["type"] != xllamacpp.ggml_backend_dev_type.GGML_BACKEND_DEVICE_TYPE_CPU:
            print(f"  {device['name']}: {device['description']} "
                  f"({device['memory_total'] >> 20} MiB, {device['memory_free'] >> 20} MiB free)")
    return 0


def request_parent_death_signal(signum: int) -> bool:
    """Have the kernel send `signum` to this process when its parent exits (Linux only).

    The signal comes when the *thread* that forked us exits, so the supervisor must start
    engines from a thread that lives as long as it does (an asyncio loop's thread is fine).
    Returns False where the platform has no such call.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    return True


def _parser() -> argparse.ArgumentParser:
    # Flag names and defaults follow llama-server's, so one argv serves both.
    p = argparse.ArgumentParser(prog="python -m gpumesh.backends.llama_cpp_runner",
                                description="Serve one GGUF model with llama.cpp (xllamacpp).")
    p.add_argument("-m", "--model", required=True, help="path of the .gguf file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (0: any free port)")
    p.add_argument("-a", "--alias", help="model name clients send (default: the file name)")
    p.add_argument("-c", "--ctx-size", type=int, default=0, help="context length (0: the model's own)")
    p.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", type=int, default=-1,
                   help="layers to offload to GPUs (-1: as many as fit)")
    p.add_argument("--embeddings", "--embedding", action="store_true", help="serve /v1/embeddings")
    p.add_argument("--reranking", "--rerank", action="store_true", help="serve /v1/rerank")
    p.add_argument("--pooling", choices=_POOLING, help="embedding pooling (default: the model's own)")
    p.add_argument("--mmproj", help="multimodal projector file (GGUF) of a vision model")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"bearer key clients must send (default: ${API_KEY_ENV})")
    p.add_argument("-t", "--threads", type=int, default=-1, help="CPU threads (-1: automatic)")
    p.add_argument("-np", "--parallel", type=int, default=-1, help="request slots (-1: automatic)")
    p.add_argument("-lv", "--verbosity", "--log-verbosity", type=int, default=3,
                   help="llama.cpp log threshold on stderr (0: errors only … 4: debug)")
    return p


def _alias(args: argparse.Namespace) -> str:
    return args.alias or Path(args.model).name


def _params(args: argparse.Namespace) -> xllamacpp.CommonParams:
    import xllamacpp   # imported here so `--help` and argument errors stay instant

    p = xllamacpp.CommonParams()
    p.model.path = args.model
    p.model_alias = {_alias(args)}
    if hasattr(p, "hostnames"):
        p.hostnames = [args.host]
    else:
        p.hostname = args.host      # xllamacpp before 2026.10 (one address)
    p.port = args.port
    p.n_ctx = args.ctx_size
    p.n_gpu_layers = args.n_gpu_layers
    p.embedding = args.embeddings or args.reranking
    if args.reranking:
        p.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_RANK
    if args.mmproj:
        p.mmproj.path = args.mmproj
    if args.api_key:
        p.api_keys = [args.api_key]
    if args.pooling:
        # /v1/embeddings needs one vector per input: decoder models declare no pooling
        # of their own and need e.g. `--pooling mean`.
        p.pooling_type = getattr(xllamacpp.llama_pooling_type, f"LLAMA_POOLING_TYPE_{args.pooling.upper()}")
    p.n_parallel = args.parallel
    p.cpuparams.n_threads = args.threads
    p.cpuparams_batch.n_threads = args.threads
    p.verbosity = args.verbosity
    p.endpoint_metrics = True   # /metrics (Prometheus); _wait_for_main_loop relies on it
    return p


def _start_server(args: argparse.Namespace) -> xllamacpp.Server | None:
    """Load the model and start listening; None (with a message) when that fails."""
    import xllamacpp

    try:
        server = xllamacpp.Server(_params(args))
    except RuntimeError as exc:
        # xllamacpp's message is generic; llama.cpp has logged the real cause to stderr.
        print(f"{_PREFIX} could not start ({exc}); llama.cpp's log above says why"
              f" (model {args.model}, {args.host}:{args.port})", file=sys.stderr, flush=True)
        return None
    return server


def _wait_for_main_loop(server: xllamacpp.Server) -> None:
    """Return once the engine's task loop runs, so that a stop request cannot be lost.

    xllamacpp.Server returns before its loop thread has entered llama.cpp's
    `server_queue::start_loop`, which begins by setting `running = true`: a stop that
    lands in between is overwritten, and the destructor then waits forever (measured
    here: 11 of 40 runners stopped right after start hung, with default logging). A
    metrics request is answered by the loop itself, so once it returns the loop runs.
    """
    server.handle_metrics()


def _install_stop_handlers() -> threading.Event:
    """SIGTERM/SIGINT set the returned event.

    llama.cpp installs its own handlers for both signals while it starts; ours replace
    them so that this runner, not the engine, decides how to stop.
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: types.FrameType | None) -> None:
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    return stop


def _wait_for_stop(stop: threading.Event, parent_pid: int) -> None:
    # The signal handler runs in this (main) thread and wakes the wait at once; the
    # timeout only paces the parent check, which matters where PR_SET_PDEATHSIG does
    # not exist (macOS). A parent that died before main() read getppid() is caught in
    # main() through SUPERVISOR_PID_ENV.
    while not stop.wait(PARENT_POLL_S):
        if os.getppid() != parent_pid:
            print(f"{_PREFIX} parent process {parent_pid} is gone, exiting", file=sys.stderr,
                  flush=True)
            os._exit(1)    # as PR_SET_PDEATHSIG would: no graceful stop for nobody


def _arm_forced_exit() -> None:
    # From here a second signal, or a shutdown stuck past the grace time, ends the
    # process through the kernel's default actions: the engine's destructor runs with
    # the GIL held, so no Python handler (or timer thread) could run until it returns.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
        signal.signal(signum, signal.SIG_DFL)
    signal.alarm(SHUTDOWN_GRACE_S)


if __name__ == "__main__":
    sys.exit(main())
