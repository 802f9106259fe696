"""The Raft journal: an append-only file of checksummed records, fsynced before they count.

pysyncobj's own journal is a memory-mapped file that is never fsynced: a full disk killed
the daemon with SIGBUS, and a crash could lose entries a majority had counted as stored
(../RAFT-NOTES.md §5). This one implements the same interface (pysyncobj's `Journal`) with
plain writes:

* File: a 16-byte header (`MAGIC`), then records `<u32 length><u32 crc32><u64 index>
  <u64 term><command>`, the CRC over index, term and command. `add` writes the record at
  the end; `sync()` fdatasyncs whatever was added since the last one. The node calls it
  before anything leaves for a peer and before each tick (whose commit scan counts this
  node's own log), so an entry is acked or counted only once it is on disk, and a burst
  of entries costs one fdatasync (group commit), not one each.
* Start-up reads every record. A record cut short at the end (a crash mid-write) is
  truncated away and reported; a bad record *followed by more data* is damage, and the
  journal refuses to open, naming the file and the byte — guessing would risk the log.
* `deleteEntriesFrom` (a follower dropping a conflicting tail) truncates and fsyncs — but
  only on a real conflict. pysyncobj truncates whenever a leader's append overlaps the
  tail it already has, which pipelining does all the time (a stale ack sends the leader's
  next index back, and it resends); with a resend cut short by the batch size that would
  drop entries this node had acked. Raft truncates only on a conflict, so while the
  transport delivers an append (`begin_message`), entries of the sender's own term are
  kept and a resent copy of one is skipped (entries of one term match the leader's log).
  `deleteEntriesTo` (compaction) writes the kept records to a new file, fsyncs it and
  renames it over the old one, after fsyncing the snapshot that replaces what is dropped.
* `<journal>.meta` (`meta.TermFile`: term, vote, commit index as JSON in two preallocated
  slots, overwritten in place and fdatasynced): term and vote synchronously (Raft needs
  them durable before any vote is sent), the commit index once a second. A damaged meta
  file refuses to start rather than reading as "term 0, no vote"; a term that cannot be
  saved is fatal for the node (`JournalWriteError.fatal`), because pysyncobj has already
  taken it in memory.
* A write that fails (ENOSPC, EDQUOT, EIO) rolls the file back to its last good length and
  raises `JournalWriteError`; `failure` says why until `probe()` finds room for 64 KiB
  again (a small write into an already allocated block proves nothing). Nothing is
  memory-mapped, so a full disk is an exception, never SIGBUS.

All entries are also kept in memory, as pysyncobj's journal does (the log is compacted).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Any

from pysyncobj.journal import Journal

from .durable import fsync_dir, write_atomically
from .errors import StartupRefused
from .meta import TermFile

__all__ = ["DurableJournal", "JournalWriteError", "MAGIC"]

log = logging.getLogger("gpumesh.raft")

MAGIC = b"gpumesh-raft-j1\n"
_delivering = threading.local()
_RECORD = struct.Struct("<IIQQ")
_MAX_RECORD = 64 << 20


class JournalWriteError(OSError):
    """The journal could not persist an entry (the file is back at its last good length),
    or, if `fatal`, the term and vote: then the node must stop taking part."""

    def __init__(self, errno_: int, message: str, command: bytes | None,
                 fatal: bool = False) -> None:
        super().__init__(errno_, message)
        self.command = command
        self.fatal = fatal


class DurableJournal(Journal):
    def __init__(self, path: Path, snapshot: Path | None = None) -> None:
        self.path = path
        self._terms = TermFile(Path(f"{path}.meta"))
        self._snapshot = snapshot
        self.failure: str | None = None
        self.repaired: str | None = None         # what start-up cut off, for the log
        self._meta = self._terms.load() or {}
        self._meta_dirty = False
        if not path.exists():
            self._refuse_if_missing()
            write_atomically(path, MAGIC)
        self._entries: list[tuple[bytes, int, int]] = []
        self._offsets: list[int] = []            # where each entry's record starts
        self._unsynced = False
        self._message_term: int | None = None    # the term of the append being handled
        self._kept_from: int | None = None       # a deferred truncation point (see above)
        self._fd = os.open(path, os.O_RDWR)
        try:
            self._end = self._load()
        except BaseException:
            os.close(self._fd)
            raise

    # --- start-up --------------------------------------------------------------------------

    def _refuse_if_missing(self) -> None:
        members = Path(f"{self.path}.members")
        evidence = [p for p in (self._terms.path, members) if p.exists()]
        if evidence:
            raise StartupRefused(
                f"the Raft journal at {self.path} is missing, but {evidence[0]} says this "
                f"node has been a member of a cluster (term {self._meta.get('term', '?')}). "
                f"Starting with an empty journal could undo entries the cluster counted as "
                f"stored here. Restore the file, or remove this node's raft/ folder and join "
                f"the cluster again with a fresh token")

    def _load(self) -> int:
        data = self.path.read_bytes()
        if data[:len(MAGIC)] != MAGIC:
            raise StartupRefused(
                f"the Raft journal at {self.path} is damaged at byte 0: it does not start "
                f"with gpumesh's journal header (a file from another program or an older "
                f"gpumesh?). Move it aside, remove the node's raft/ folder and join again")
        offset = len(MAGIC)
        while offset < len(data):
            torn = self._torn_at(data, offset)
            if torn is not None:
                self._cut_tail(offset, len(data), torn)
                return offset
            length, crc, idx, term = _RECORD.unpack_from(data, offset)
            body = offset + _RECORD.size
            command = bytes(data[body:body + length])
            if self._entries and idx != self._entries[-1][1] + 1:
                raise self._damaged(offset, f"entry {idx} follows entry {self._entries[-1][1]}")
            self._entries.append((command, idx, term))
            self._offsets.append(offset)
            offset = body + length
        return offset

    def _torn_at(self, data: bytes, offset: int) -> str | None:
        """Why the record at `offset` is unusable, if it is; raises if that is damage."""
        if len(data) - offset < _RECORD.size:
            return "a record header cut short"
        length, crc, idx, term = _RECORD.unpack_from(data, offset)
        end = offset + _RECORD.size + length
        if length > _MAX_RECORD or end > len(data):
            return "a record cut short"
        if zlib.crc32(data[offset + 8:end]) != crc:
            if end == len(data):
                return "a last record with a bad checksum"
            raise self._damaged(offset, "a record's checksum does not match")
        return None

    def _cut_tail(self, offset: int, size: int, why: str) -> None:
        self.repaired = (f"the Raft journal at {self.path} ended in {why} at byte {offset} "
                         f"(an interrupted write); the last {size - offset} bytes were cut off")
        log.warning("%s", self.repaired)
        os.ftruncate(self._fd, offset)
        os.fsync(self._fd)

    def _damaged(self, offset: int, what: str) -> StartupRefused:
        return StartupRefused(
            f"the Raft journal at {self.path} is damaged at byte {offset} ({what}, with more "
            f"records after it). It is not repaired automatically: entries after the damage "
            f"may be ones the cluster counted as stored here. Remove this node's raft/ folder "
            f"and join the cluster again with a fresh token (the other members hold the log)")

    # --- pysyncobj's Journal interface -----------------------------------------------------

    def begin_message(self, append_term: int | None) -> None:
        """The transport is delivering a message; for an append, the sender's term."""
        self._message_term, self._kept_from = append_term, None
        _delivering.journal = self

    def end_message(self) -> None:
        self._message_term, self._kept_from = None, None
        _delivering.journal = None

    @staticmethod
    def delivering() -> "DurableJournal | None":
        """The journal whose node is handling a message on this thread, if any."""
        return getattr(_delivering, "journal", None)

    def keeps_from(self, index: int) -> bool:
        """Would a truncation from log index `index` be kept (deferred) now?"""
        if self._message_term is None or not self._entries:
            return False
        position = index - self._entries[0][1]
        return 0 <= position < len(self._entries) and \
            all(entry[2] == self._message_term for entry in self._entries[position:])

    def add(self, command: bytes, idx: int, term: int) -> None:
        if self._kept_from is not None:
            position = self._kept_from
            if position < len(self._entries) and self._entries[position] == (command, idx, term):
                self._kept_from += 1                 # a resent entry this node already has
                return
            self._kept_from = None
            if position < len(self._entries):        # a real conflict after all
                self._drop_from(position)
        body = struct.pack("<QQ", idx, term) + command
        record = struct.pack("<II", len(command), zlib.crc32(body)) + body
        self._write_at(self._end, record, command, sync=False)
        self._entries.append((command, idx, term))
        self._offsets.append(self._end)
        self._end += len(record)
        self._unsynced = True

    def sync(self) -> None:
        """Make every added entry durable. A failed fdatasync is fatal: which entries
        reached the disk is then unknown, and the node must stop acking anything."""
        if not self._unsynced:
            return
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            self._failed(exc)
            raise JournalWriteError(exc.errno or 0, self.failure or str(exc), None,
                                    fatal=True) from None
        self._unsynced = False

    def clear(self) -> None:
        self._truncate(len(MAGIC))
        self._entries, self._offsets = [], []

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        if entryFrom >= len(self._entries):
            return
        if self._message_term is not None and \
                all(entry[2] == self._message_term for entry in self._entries[entryFrom:]):
            self._kept_from = entryFrom              # no conflict possible: see the docstring
            return
        self._drop_from(entryFrom)

    def _drop_from(self, entryFrom: int) -> None:
        log.info("Raft journal: dropping %d entries from index %d that the leader's log "
                 "replaces", len(self._entries) - entryFrom, self._entries[entryFrom][1])
        self._truncate(self._offsets[entryFrom])
        del self._entries[entryFrom:]
        del self._offsets[entryFrom:]

    def deleteEntriesTo(self, entryTo: int) -> None:
        # The snapshot now holds what is dropped: make sure it is on disk first.
        if self._snapshot is not None and self._snapshot.exists():
            fd = os.open(self._snapshot, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(self._snapshot.parent)
        kept = self._entries[entryTo:]
        records = bytearray(MAGIC)
        offsets = []
        for command, idx, term in kept:
            offsets.append(len(records))
            body = struct.pack("<QQ", idx, term) + command
            records += struct.pack("<II", len(command), zlib.crc32(body)) + body
        try:
            write_atomically(self.path, bytes(records))
        except OSError as exc:
            self._failed(exc)
            raise JournalWriteError(exc.errno or 0, f"could not compact {self.path}: "
                                    f"{exc.strerror or exc}", None) from None
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_RDWR)
        self._entries, self._offsets, self._end = kept, offsets, len(records)
        self._unsynced = False

    def __getitem__(self, item: Any) -> Any:
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        if self._meta.get("commit_index") != raftCommitIndex:
            self._meta["commit_index"] = raftCommitIndex
            self._meta_dirty = True

    def getRaftCommitIndex(self) -> int:
        return self._meta.get("commit_index", 1)

    def setCurrentTerm(self, term: int, votedForNodeId: str | None) -> None:
        self._meta["term"] = term
        self._meta["voted_for"] = votedForNodeId
        self._save_meta(fatal=True)          # durable before any vote goes out

    def getCurrentTerm(self) -> int:
        return self._meta.get("term", 0)

    def getVotedForNodeId(self) -> str | None:
        return self._meta.get("voted_for")

    def onOneSecondTimer(self) -> None:
        if self._meta_dirty:
            known = self.failure
            try:
                self._save_meta()
            except JournalWriteError as exc:
                if known is None:            # say it once, not every second
                    log.error("could not save the Raft commit index: %s", exc)

    def probe(self) -> bool:
        """After a failure: is there room again? Writes and removes a 64 KiB block past the
        end; clears `failure` if that worked."""
        known = self.failure
        try:
            self._write_at(self._end, bytes(64 << 10), None)
        except JournalWriteError:
            self.failure = known
            return False
        os.ftruncate(self._fd, self._end)
        self.failure = None
        return True

    def _destroy(self) -> None:
        try:
            self.sync()
            self.onOneSecondTimer()
        finally:
            os.close(self._fd)
            self._terms.close()

    # --- writing ---------------------------------------------------------------------------

    def _write_at(self, offset: int, data: bytes, command: bytes | None,
                  sync: bool = True) -> None:
        try:
            view = memoryview(data)
            position = offset
            while view:
                written = os.pwrite(self._fd, view, position)
                view, position = view[written:], position + written
            if sync:
                os.fdatasync(self._fd)
        except OSError as exc:
            try:
                os.ftruncate(self._fd, offset)       # never leave half a record behind
            except OSError:
                pass
            self._failed(exc)
            raise JournalWriteError(exc.errno or 0, self.failure or str(exc), command) from None

    def _truncate(self, length: int) -> None:
        os.ftruncate(self._fd, length)
        os.fsync(self._fd)
        self._end = length
        self._unsynced = False

    def _save_meta(self, fatal: bool = False) -> None:
        self._meta.setdefault("term", 0)
        self._meta.setdefault("voted_for", None)
        self._meta.setdefault("commit_index", 1)
        try:
            self._terms.save(self._meta)
        except OSError as exc:
            self._failed(exc, self._terms.path)
            raise JournalWriteError(exc.errno or 0, self.failure or str(exc), None,
                                    fatal) from None
        self._meta_dirty = False

    def _failed(self, exc: OSError, path: Path | None = None) -> None:
        self.failure = f"{exc.strerror or exc}, writing {path or self.path}"
