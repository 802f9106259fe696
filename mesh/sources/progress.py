"""Download progress, shared by the download threads, the API and the instance reporter.

One `DownloadBoard` per process (`BOARD`), keyed by the snapshot folder being filled, so two
instances waiting on one download see the same progress. Threads write; the event loop
reads copies (`snapshot`), under a lock held for microseconds.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

__all__ = ["BOARD", "DownloadBoard", "DownloadProgress"]

_RATE_WINDOW_S = 5.0        # the rate is the bytes of the last few seconds, not since start
_KEEP_FINISHED = 64         # finished downloads stay visible (the last ones) for the API


@dataclass
class DownloadProgress:
    key: str                        # the snapshot folder (absolute path)
    source: str                     # hf://owner/name:file …
    state: str = "checking"         # checking, downloading, retrying, verifying, done, failed
    bytes_total: int = 0
    bytes_done: int = 0
    files_total: int = 0
    files_done: int = 0
    current_file: str | None = None
    rate_bytes_per_s: float = 0.0
    eta_s: float | None = None
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    _samples: deque = field(default_factory=deque, repr=False)

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out.pop("_samples", None)
        out["percent"] = round(100 * self.bytes_done / self.bytes_total, 1) if self.bytes_total else None
        return out


class DownloadBoard:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[str, DownloadProgress] = {}
        self._finished: deque[DownloadProgress] = deque(maxlen=_KEEP_FINISHED)

    def begin(self, key: str, source: str, bytes_total: int, bytes_done: int,
              files_total: int, files_done: int) -> None:
        with self._lock:
            entry = DownloadProgress(key, source, "downloading", bytes_total, bytes_done,
                                     files_total, files_done)
            entry._samples.append((time.monotonic(), bytes_done))
            self._active[key] = entry

    def advance(self, key: str, count: int, current_file: str | None = None,
                state: str = "downloading") -> None:
        now = time.monotonic()
        with self._lock:
            entry = self._active.get(key)
            if entry is None:
                return
            entry.bytes_done += count
            entry.state = state
            if current_file is not None:
                entry.current_file = current_file
            samples = entry._samples
            samples.append((now, entry.bytes_done))
            while len(samples) > 2 and now - samples[0][0] > _RATE_WINDOW_S:
                samples.popleft()
            elapsed = now - samples[0][0]
            if elapsed > 0.2:
                entry.rate_bytes_per_s = (entry.bytes_done - samples[0][1]) / elapsed
                left = max(entry.bytes_total - entry.bytes_done, 0)
                entry.eta_s = round(left / entry.rate_bytes_per_s, 1) if entry.rate_bytes_per_s > 0 else None
            entry.updated_at = time.time()

    def set_state(self, key: str, state: str, files_done: int | None = None) -> None:
        with self._lock:
            entry = self._active.get(key)
            if entry is not None:
                entry.state = state
                if files_done is not None:
                    entry.files_done = files_done
                entry.updated_at = time.time()

    def finish(self, key: str, error: str | None = None) -> None:
        with self._lock:
            entry = self._active.pop(key, None)
            if entry is None:
                return
            entry.state = "failed" if error else "done"
            entry.error = error
            entry.eta_s = None if error else 0.0
            if not error:
                entry.files_done = entry.files_total
            entry.updated_at = time.time()
            self._finished.append(entry)

    def get(self, key: str) -> dict[str, object] | None:
        with self._lock:
            entry = self._active.get(key)
            if entry is None:
                entry = next((e for e in reversed(self._finished) if e.key == key), None)
            return entry.to_dict() if entry else None

    def snapshot(self, under: str | None = None) -> list[dict[str, object]]:
        """Active downloads, then the last finished ones (optionally below one cache root)."""
        with self._lock:
            entries = list(self._active.values()) + list(reversed(self._finished))
            return [e.to_dict() for e in entries if under is None or e.key.startswith(under)]


BOARD = DownloadBoard()
