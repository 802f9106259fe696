"""Downloading a selection of a repo's files into a cache folder: resumable, checked.

- Free disk is checked first: the bytes still to fetch must fit, with a margin, or nothing
  starts and the error says how much is missing where.
- Each file arrives as `NAME.part`; a cut connection (or a restarted daemon) resumes from
  the part's size with an HTTP range; a server that ignores ranges starts the file over.
- The SHA-256 the hub lists (LFS files, every ModelScope file) is checked, hashing as the
  bytes arrive (a resumed part is hashed once first); only then is the part renamed into
  place. A mismatch deletes the part.
- A full disk mid-way stops with what was done and where; the part stays, so freeing space
  and starting again resumes.
Progress (bytes, rate, ETA) goes to `progress.BOARD` as it happens.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import logging
import os
import shutil
import socket
import time
import urllib.error
from pathlib import Path
from typing import Any

from ..sizes import format_bytes
from .hubs import Hub, RemoteFile
from .progress import BOARD
from .select import Selection
from .spec import SourceError, describe_source

__all__ = ["download_selection"]

log = logging.getLogger("gpumesh.sources")

_CHUNK = 1 << 20
_ATTEMPTS = 5                    # per file, resuming each time
_MARGIN_BYTES = 64 << 20         # left free on the disk beyond the download itself …
_MARGIN_SHARE = 0.05             # … or this share of a small disk
_RETRYABLE = (http.client.IncompleteRead, http.client.RemoteDisconnected, ConnectionError,
              socket.timeout, TimeoutError, urllib.error.URLError)


def download_selection(hub: Hub, source: dict[str, Any], selection: Selection,
                       folder: Path) -> None:
    """Blocking: make every file of `selection` complete in `folder`."""
    key = str(folder)
    pending = [f for f in selection.files if not _complete(folder / f.path, f)]
    done_bytes = sum(_part_size(folder / f.path) for f in pending)
    already = selection.total_bytes - sum(f.size for f in pending) + done_bytes
    _check_disk(folder, sum(f.size for f in pending) - done_bytes)
    BOARD.begin(key, describe_source(source), selection.total_bytes, already,
                len(selection.files), len(selection.files) - len(pending))
    try:
        for n, remote in enumerate(pending):
            _fetch(hub, source, remote, folder / remote.path, key)
            BOARD.set_state(key, "downloading", len(selection.files) - len(pending) + n + 1)
    except SourceError as exc:
        BOARD.finish(key, str(exc))
        raise
    BOARD.finish(key)


def _fetch(hub: Hub, source: dict[str, Any], remote: RemoteFile, dest: Path, key: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    hasher = hashlib.sha256() if remote.sha256 else None
    hashed = 0                               # bytes of the part already fed to the hasher
    for attempt in range(1, _ATTEMPTS + 1):
        offset = _part_size(dest)
        if remote.size and offset > remote.size:
            part.unlink()
            offset, hasher, hashed = 0, hashlib.sha256() if remote.sha256 else None, 0
        if hasher is not None and hashed < offset:
            hashed = _hash_into(hasher, part, hashed, offset)
        if remote.size and offset == remote.size:
            break
        try:
            stream, _, ranged = hub.open_file(source["repo"], source["revision"], remote.path, offset)
            if offset and not ranged:        # the server sends the whole file again
                BOARD.advance(key, -offset)
                offset, hashed = 0, 0
                hasher = hashlib.sha256() if remote.sha256 else None
            with stream, open(part, "ab" if offset else "wb") as out:
                while chunk := stream.read(_CHUNK):
                    out.write(chunk)
                    if hasher is not None:
                        hasher.update(chunk)
                        hashed += len(chunk)
                    BOARD.advance(key, len(chunk), remote.path)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SourceError(
                    f"the disk holding {dest.parent} is full: {format_bytes(_part_size(dest))} "
                    f"of {format_bytes(remote.size)} of {remote.path} downloaded; free space "
                    "(`gpumesh models cache rm`) and the download resumes from there") from None
            if not isinstance(exc, _RETRYABLE):
                raise SourceError(f"downloading {remote.path} failed: {exc}") from None
            _retry_later(key, remote, attempt, exc)
            continue
        except _RETRYABLE as exc:            # a cut connection: resume from the part
            _retry_later(key, remote, attempt, exc)
            continue
        if not remote.size or _part_size(dest) >= remote.size:
            break
        _retry_later(key, remote, attempt, ConnectionError("the connection ended early"))
    else:
        raise SourceError(f"downloading {remote.path} from {source['repo']} failed after "
                          f"{_ATTEMPTS} attempts ({format_bytes(_part_size(dest))} of "
                          f"{format_bytes(remote.size)}); it resumes on the next start")
    _verify(part, remote, hasher, key)
    os.replace(part, dest)


def _verify(part: Path, remote: RemoteFile, hasher: Any, key: str) -> None:
    size = part.stat().st_size
    if remote.size and size != remote.size:
        part.unlink()
        raise SourceError(f"{remote.path} arrived with {size:,} bytes, the hub lists "
                          f"{remote.size:,}; the partial file was deleted")
    if hasher is None:
        return
    BOARD.set_state(key, "verifying")
    digest = hasher.hexdigest()
    if digest != remote.sha256:
        part.unlink()
        raise SourceError(f"{remote.path} failed its checksum (SHA-256 {digest[:12]}…, the hub "
                          f"lists {str(remote.sha256)[:12]}…); the file was deleted and the "
                          "next start downloads it again")


def _retry_later(key: str, remote: RemoteFile, attempt: int, exc: BaseException) -> None:
    delay = min(8.0, 0.5 * 2 ** (attempt - 1))
    log.warning("download of %s interrupted (%s); resuming in %.1f s", remote.path, exc, delay)
    BOARD.set_state(key, "retrying")
    time.sleep(delay)


def _hash_into(hasher: Any, part: Path, start: int, end: int) -> int:
    with open(part, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0 and (chunk := f.read(min(_CHUNK, left))):
            hasher.update(chunk)
            left -= len(chunk)
    return end - left


def _complete(path: Path, remote: RemoteFile) -> bool:
    # Only verified files are renamed into place, so the size check is enough.
    return path.is_file() and (not remote.size or path.stat().st_size == remote.size)


def _part_size(dest: Path) -> int:
    try:
        return dest.with_name(dest.name + ".part").stat().st_size
    except FileNotFoundError:
        return 0


def _check_disk(folder: Path, needed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    usage = shutil.disk_usage(folder)
    margin = min(_MARGIN_BYTES, int(usage.total * _MARGIN_SHARE))
    if needed + margin > usage.free:
        free = usage.free
        raise SourceError(f"not enough disk for the download: it needs {format_bytes(needed)} "
                          f"more (plus {format_bytes(margin)} kept free) on the disk "
                          f"holding {folder}, which has {format_bytes(free)} free; free space "
                          "(`gpumesh models cache rm`) and start again")
