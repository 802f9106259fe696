"""What the daemon needs around its parts: listening sockets bound, or checked, before
anything starts (`gpumesh doctor` checks the same way), tasks owned by the block that
starts them, and the process's log format."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from typing import Any, AsyncIterator, Coroutine

__all__ = ["bind_socket", "configure_logging", "owned_task", "port_problem"]

log = logging.getLogger("gpumesh")


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, not yet listening (connections are refused until the
    site listens, not queued)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                         socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def port_problem(host: str, port: int) -> str | None:
    """Say why `port` cannot be bound, before anything is started (uvicorn checks late and
    has to undo; checking first gives the common mistake a one-line answer)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


@contextlib.asynccontextmanager
async def owned_task(coro: Coroutine[Any, Any, None], name: str) -> AsyncIterator[None]:
    """The task lives exactly as long as the `async with` block that owns it."""
    task = asyncio.create_task(coro, name=name)
    task.add_done_callback(_log_crash)
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s stopped unexpectedly", task.get_name(), exc_info=task.exception())


def configure_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=level.upper(),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # pysyncobj logs every reconnect attempt at INFO; our own lines say what matters.
    logging.getLogger("pysyncobj").setLevel(logging.WARNING)
