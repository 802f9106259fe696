"""A Ctrl-C that lands while Python imports can vanish: an extension module that clears
whatever error its import of an optional dependency raised clears a KeyboardInterrupt too,
and the process runs on as if never interrupted (`gpumesh up` interrupted 0.3-1.6 s after
its start kept running about once in 240 tries, with neither asyncio's nor the daemon's
SIGINT handler ever called). So while the CLI imports, SIGINT goes to a handler that notes
it before raising KeyboardInterrupt as Python's own does, and the CLI asks afterwards."""

from __future__ import annotations

import signal
from types import FrameType

__all__ = ["interrupted", "remember_interrupts"]

_seen = False


def _note_and_raise(signum: int, frame: FrameType | None) -> None:
    global _seen
    _seen = True
    raise KeyboardInterrupt


def remember_interrupts() -> None:
    """Note every SIGINT from now on (only where SIGINT has Python's own handler: an
    ignored SIGINT stays ignored, and an embedding program's handler stays)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _note_and_raise)


def interrupted() -> bool:
    """Whether a SIGINT came since `remember_interrupts`. Gives SIGINT back to Python's
    own handler, which asyncio.run needs to see to turn a Ctrl-C into a cancellation."""
    if signal.getsignal(signal.SIGINT) is _note_and_raise:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return _seen
