"""An engine's log file, rotated by size: `<instance>.log`, then `.log.1` … `.log.<keep>`.

Engines write ~2 KB per request; without rotation a busy instance fills the disk. Used by
the process guard (the engine's stdout goes through it) and by the container runtime (the
container's log stream), so the standard library only.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

__all__ = ["DEFAULT_KEEP", "DEFAULT_MAX_BYTES", "RotatingLog", "engine_error_line", "log_files"]

DEFAULT_MAX_BYTES = 10 << 20
DEFAULT_KEEP = 2


def log_files(path: Path, keep: int = DEFAULT_KEEP) -> list[Path]:
    """The current log and its rotated predecessors that exist, oldest first."""
    candidates = [path.with_name(f"{path.name}.{i}") for i in range(keep, 0, -1)] + [path]
    return [p for p in candidates if p.exists()]


class RotatingLog:
    """Append bytes to `path`; when it would pass `max_bytes`, shift it to `path.1` first."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES,
                 keep: int = DEFAULT_KEEP) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "ab")
        self._size = self._handle.tell()
        self._lock = threading.Lock()     # the engine's output and our own notes interleave

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
            self._handle.write(data)
            self._handle.flush()          # readers (`gpumesh logs -f`) see each line at once
            self._size += len(data)

    def close(self) -> None:
        with self._lock:
            self._handle.close()

    def _rotate(self) -> None:
        self._handle.close()
        for i in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.keep > 0:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._handle = open(self.path, "ab")
        self._size = 0


# Lines that say what went wrong, in engines' own words, strongest first.
_ERROR_PATTERNS = (
    re.compile(r"\berror: .+", re.IGNORECASE),                # argparse, llama.cpp
    re.compile(r"^\s*(?:\(\w+ pid=\d+\)\s*)?(?:[\w.]+\.)?[A-Z]\w*(?:Error|Exception): .+"),
    re.compile(r"\b(?:ERROR|CRITICAL|FATAL)\b.+"),
    re.compile(r"\b(?:error|failed|cannot|could not)\b.+", re.IGNORECASE),
)
_NOISE = re.compile(r"^(?:usage:|\s+[-\[]|--- .*gpumesh guard: engine exited)")


def engine_error_line(lines: list[str]) -> str:
    """The most telling line of an engine's output: its own error line, not the usage text
    around it (argparse prints a usage block before `prog: error: ...`), else its last line."""
    useful = [ln.strip() for ln in lines if ln.strip() and not _NOISE.match(ln)]
    for pattern in _ERROR_PATTERNS:
        for line in reversed(useful):
            if pattern.search(line):
                return line[:500]
    return useful[-1][:500] if useful else "(no output)"
