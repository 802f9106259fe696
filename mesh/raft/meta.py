"""The Raft term, vote and commit index, in a small file that is never grown once made.

Raft needs the term and vote on disk before a vote goes out, and pysyncobj updates them in
memory first: a write that failed here (a full disk) would leave the node acting on a term
it never stored. So the file is created once with two fixed 512-byte slots, and each save
overwrites the older slot in place (its blocks already allocated: a full disk cannot
refuse it on ordinary file systems) and fdatasyncs. A slot is `MAGIC, u64 sequence,
u32 length, u32 crc32, JSON`; loading takes the valid slot with the higher sequence, so a
save torn by a crash leaves the previous one.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

from .durable import write_atomically
from .errors import StartupRefused

__all__ = ["TermFile"]

_MAGIC = b"gmraftm1"
_HEAD = struct.Struct("<8sQII")
_SLOT = 512


class TermFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._sequence = 0

    def load(self) -> dict[str, Any] | None:
        """The last saved values, or None if the file does not exist (a new node)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        slots = [self._decode(data[i * _SLOT:(i + 1) * _SLOT]) for i in range(2)]
        valid = [s for s in slots if s is not None]
        if len(data) != 2 * _SLOT or not valid:
            raise StartupRefused(
                f"the Raft term and vote file {self.path} is damaged (no readable copy); "
                f"without it this node could vote twice in one term. Remove this node's "
                f"raft/ folder and join the cluster again with a fresh token")
        self._sequence, values = max(valid, key=lambda s: s[0])
        return values

    def save(self, values: dict[str, Any]) -> None:
        """Durable on return; raises OSError if it could not be written."""
        if self._fd is None:
            if not self.path.exists():
                write_atomically(self.path, self._encode(0, values) + bytes(_SLOT))
                self._sequence = 0
                self._fd = os.open(self.path, os.O_RDWR)
                return
            self._fd = os.open(self.path, os.O_RDWR)
        self._sequence += 1
        os.pwrite(self._fd, self._encode(self._sequence, values), (self._sequence % 2) * _SLOT)
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def _encode(sequence: int, values: dict[str, Any]) -> bytes:
        body = json.dumps(values, separators=(",", ":")).encode()
        slot = _HEAD.pack(_MAGIC, sequence, len(body), zlib.crc32(body)) + body
        if len(slot) > _SLOT:
            raise ValueError("the Raft term record does not fit its slot")
        return slot + bytes(_SLOT - len(slot))

    @staticmethod
    def _decode(slot: bytes) -> tuple[int, dict[str, Any]] | None:
        if len(slot) < _HEAD.size:
            return None
        magic, sequence, length, crc = _HEAD.unpack_from(slot)
        body = slot[_HEAD.size:_HEAD.size + length]
        if magic != _MAGIC or len(body) != length or zlib.crc32(body) != crc:
            return None
        try:
            values = json.loads(body)
        except ValueError:
            return None
        if not (isinstance(values, dict) and isinstance(values.get("term"), int)
                and isinstance(values.get("commit_index"), int)
                and (values.get("voted_for") is None or isinstance(values["voted_for"], str))):
            return None
        return sequence, values
