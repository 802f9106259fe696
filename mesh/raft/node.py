"""RaftNode: one pysyncobj `SyncObj`, configured for gpumesh, and the thread that ticks it.

Everything pysyncobj does happens on that one thread (it is not thread-safe): ticks, message
handling, callbacks, and any `call()` handed in from outside. The thread owns the SyncObj
from construction to `destroy()`.

Ticking is event-driven (../RAFT-NOTES.md §3): each turn runs one tick without waiting, then
polls the sockets until the next thing pysyncobj has to do by itself: the leader's next
heartbeat, or a follower's election deadline (at most `_MAX_WAIT_S`). A submitted command
or an arriving message wakes the poll at once (pysyncobj's pipe notifier and its sockets),
so commits follow acks, not a timer. A message is handled (and answered) inside the poll;
only one that leaves work for a tick (something to commit or apply, a command, a new
leader or term, an election due) is followed by one, so an idle leader ticks on its
heartbeat timer alone and an idle follower every `_MAX_WAIT_S`, not after each message.

One case has no event to wake on: a leader with no peer to ack (a 1-node cluster) commits an
entry on the tick *after* the one that appended it. For that, a leader with writes in flight
ticks every 1 ms — but only for `_BUSY_WINDOW_S` after the last submit or answer, so a
write stuck in an outage never keeps a core busy.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import gzip
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pysyncobj import SyncObj, SyncObjConf, SyncObjConsumer
from pysyncobj.journal import MemoryJournal

from . import codec, internals
from .errors import StartupRefused
from .internals import clock
from .journal import DurableJournal, JournalWriteError
from .members import MemberFile
from .poller import CountingPoller
from .prevote import PreVote
from .status import PeerStatus, RaftStatus
from .transport import GmTransport
from .wire import MIN_SECRET_LENGTH

__all__ = ["RaftNode"]

log = logging.getLogger("gpumesh.raft")

# Timers (../RAFT-NOTES.md §2, measured there): election timeout U(0.4, 0.8) s, heartbeats
# every 0.1 s, failover after kill -9 ~0.1 s (FIN hook) and ~0.5 s after a silent death.
_RAFT_MIN_TIMEOUT_S = 0.4
_RAFT_MAX_TIMEOUT_S = 0.8
_HEARTBEAT_S = 0.1
# A leader that hears from no majority for this long steps down (pysyncobj's default is 30 s,
# during which an isolated leader keeps accepting writes that can only time out).
_LEADER_FALLBACK_S = 1.5
_RETRY_DIAL_S = 1.0
# PreVote (prevote.py): a peer that heard its leader this recently will not help anyone
# campaign. One election timeout, as in the Raft thesis.
_LEADER_LEASE_S = _RAFT_MIN_TIMEOUT_S
_MAX_WAIT_S = 0.25
_BUSY_TICK_S = 0.001
_BUSY_WINDOW_S = 0.05
# Wakes that need no tick (heartbeat answers) handled in a row before ticking anyway: a
# bound, so a stream of them can never starve the tick's own duties.
_MAX_QUIET_WAKES = 64
# A leader that cannot write its journal asks a caught-up follower to take over, this often.
_HANDOFF_RETRY_S = 1.0


class _ResendNotice(logging.Filter):
    """pysyncobj logs CRITICAL whenever a resent append overlaps applied entries. When the
    journal will keep them (same term, no conflict: journal.py) it is not news; a real
    conflict with applied entries still gets through."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("truncating already-applied log entries"):
            return True
        journal = DurableJournal.delivering()
        return not (journal is not None and isinstance(record.args, tuple)
                    and journal.keeps_from(record.args[0]))


logging.getLogger("pysyncobj.syncobj").addFilter(_ResendNotice())

# pysyncobj builds its journal from the path alone; the snapshot beside it (fsynced before
# compaction drops entries) is registered here by the node about to be constructed.
_SNAPSHOT_OF: dict[str, Path] = {}


def _create_journal(path: str | None) -> Any:
    if path is None:
        return MemoryJournal()
    return DurableJournal(Path(path), _SNAPSHOT_OF.get(path))


class RaftNode:
    """A SyncObj and its tick thread. Blocking methods say so; the rest are thread-safe."""

    def __init__(self, *, self_address: str, partners: list[str], bind_host: str,
                 secret: str, journal_file: Path, snapshot_file: Path,
                 consumers: list[SyncObjConsumer],
                 on_status: Callable[[RaftStatus], None],
                 on_write_lost: Callable[[bytes], None] = lambda payload: None) -> None:
        internals.install(codec, _create_journal, lambda kind: CountingPoller())
        self.self_address = self_address
        self._secret = secret
        self._journal_file = journal_file
        self._snapshot_file = snapshot_file
        self._on_write_lost = on_write_lost
        self._member_file = MemberFile(Path(f"{journal_file}.members"))
        self._partners = partners
        self._conf = SyncObjConf(
            autoTick=False,
            # Send each command at once instead of on the next heartbeat, which also turns on
            # pysyncobj's pipe notifier: a submit wakes the tick thread.
            appendEntriesUseBatch=False,
            raftMinTimeout=_RAFT_MIN_TIMEOUT_S,
            raftMaxTimeout=_RAFT_MAX_TIMEOUT_S,
            appendEntriesPeriod=_HEARTBEAT_S,
            # Idle links between followers must not time out: the first vote request on one
            # would be dropped and the election split (notes §2, pitfall 1). Dead peers are
            # found by FIN/RST and TCP keepalive instead.
            connectionTimeout=30.0,
            connectionRetryTime=_RETRY_DIAL_S,
            leaderFallbackTimeout=_LEADER_FALLBACK_S,
            journalFile=str(journal_file),
            fullDumpFile=str(snapshot_file),
            # No `password`: gpumesh's transport authenticates and encrypts (transport.py).
            bindAddress=f"{bind_host}:{self_address.rsplit(':', 1)[1]}",
            maxBindRetries=1,
            dynamicMembershipChange=True,
            # Log compaction serialises in the tick thread: never fork a threaded asyncio process.
            useFork=False,
            # Without a leader a command fails at once (certainly not applied) and submit
            # retries it with the same rid, instead of waiting in a queue where it could
            # still commit after its submitter gave up.
            commandsWaitLeader=False,
        )
        self._consumers = consumers
        self._on_status = on_status
        self._raft: SyncObj | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._calls: queue.SimpleQueue[tuple[Callable[[SyncObj], Any],
                                             concurrent.futures.Future]] = queue.SimpleQueue()
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self._busy_until = 0.0
        self._recorded_members: tuple[str, ...] = ()
        self._pending_members: tuple[tuple[str, ...], int] | None = None
        self._status: RaftStatus | None = None
        self._journal: DurableJournal | None = None
        self._transport: GmTransport | None = None
        self._storage_error: str | None = None
        self._next_handoff = 0.0
        self._next_probe = 0.0
        self.ticks = 0          # ticks run so far (tests and benchmarks read it)
        self.prevote = PreVote(lease_s=_LEADER_LEASE_S, retry_min_s=_RAFT_MIN_TIMEOUT_S,
                               retry_max_s=_RAFT_MAX_TIMEOUT_S)

    # --- lifecycle (blocking: call from a worker thread) ------------------------------------

    def open(self) -> None:
        """Read the journal, bind the Raft port, and start the tick thread. Blocking.

        Raises StartupRefused for a short cluster secret, a damaged or missing journal or
        snapshot, a changed address, or a port that cannot be bound."""
        if len(self._secret) < MIN_SECRET_LENGTH:
            raise StartupRefused(
                f"the cluster secret is {'empty' if not self._secret else 'too short'} "
                f"({len(self._secret)} characters; at least {MIN_SECRET_LENGTH}): it is what "
                f"keeps strangers off the Raft port. Use the cluster.secret gpumesh generated")
        members = self._starting_members()
        others = [m for m in members if m != self.self_address]
        self._check_snapshot()
        _SNAPSHOT_OF[str(self._journal_file)] = self._snapshot_file
        try:
            raft = SyncObj(self.self_address, others, self._conf, self._consumers,
                           transportClass=functools.partial(GmTransport, secret=self._secret))
        except Exception as exc:
            if "BindError" in str(exc):
                raise StartupRefused(f"cannot listen on the Raft address "
                                     f"{self._conf.bindAddress}: it is in use or not "
                                     f"this machine's") from None
            raise
        self._raft = raft
        self._journal = internals.journal_of(raft)
        self._transport = internals.transport_of(raft)
        self._transport.prevote = self.prevote
        self._transport.before_flush = self._journal.sync
        self._transport.journal = self._journal
        self._record_members(tuple(sorted(members)))
        self._thread = threading.Thread(target=self._run, name="gpumesh-raft", daemon=False)
        self._thread.start()

    def close(self) -> None:
        """Stop ticking, close sockets and the journal. Blocking; harmless twice."""
        self._stopping.set()
        if self._raft is not None:
            internals.wake(self._raft)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _check_snapshot(self) -> None:
        """pysyncobj logs a snapshot it cannot read and starts empty: refuse instead."""
        path = self._snapshot_file
        if not path.exists():
            return
        try:
            with gzip.open(path, "rb") as handle:
                data = codec.load(handle)
            if not (isinstance(data, tuple) and len(data) == 4):
                raise ValueError("not a pysyncobj snapshot")
        except (OSError, EOFError, ValueError) as exc:
            raise StartupRefused(
                f"the Raft snapshot at {path} is damaged or from an older gpumesh ({exc}). "
                f"Remove this node's raft/ folder and join the cluster again with a fresh "
                f"token (the other members hold the state)") from None

    def _starting_members(self) -> list[str]:
        record = self._member_file.load()
        if record is None:
            return sorted({self.self_address, *self._partners})
        if record.self_address != self.self_address:
            raise StartupRefused(
                f"this node joined the cluster as {record.self_address} "
                f"({self._member_file.path}) but now starts as {self.self_address}; a member's "
                f"Raft address cannot change. Start it with its old address, or remove it from "
                f"the cluster and join again with a fresh data dir")
        return list(record.members)

    # --- the tick thread --------------------------------------------------------------------

    def _run(self) -> None:
        raft, transport = self._raft, self._transport
        assert raft is not None and transport is not None
        try:
            while not self._stopping.is_set():
                self._run_calls(raft)
                self.ticks += 1
                try:
                    handled = raft._poller.dispatched
                    self.prevote.before_tick(raft, transport)
                    raft.doTick(0.0)
                    transport.flush()        # journal durable, then every message queued
                    self._publish(raft)
                    # Messages the tick's own final poll took may leave work for a next tick.
                    late = raft._poller.dispatched != handled
                    self._wait_for_work(raft, late)
                except JournalWriteError as exc:
                    self._journal_failed(exc)
                except Exception:  # noqa: BLE001 - one bad tick must not stop replication
                    log.exception("Raft tick failed; continuing")
                    self._stopping.wait(0.05)
        finally:
            self._fail_calls()
            raft.destroy()          # autoTick=False: synchronous, in this (the owning) thread
            if self._status is not None:
                self._status = dataclasses.replace(
                    self._status, leader=None, is_leader=False, has_quorum=False, ready=False,
                    storage_error=self._storage_error)
                self._on_status(self._status)

    def _journal_failed(self, exc: JournalWriteError) -> None:
        """An entry could not be persisted (disk full): it was not appended. Tell the
        submitter that much, and let the storage check hand the leadership over. A term or
        vote that could not be saved is worse (pysyncobj already acts on it): this node
        leaves the Raft group until it is restarted."""
        if exc.fatal:
            self._storage_error = (f"{exc.strerror or exc}; this node left the Raft group "
                                   f"(restart it once the disk is fixed)")
            log.critical("the Raft term and vote cannot be saved (%s): this node stops taking "
                         "part in the cluster; inference on running instances goes on",
                         exc.strerror or exc)
            self._stopping.set()
            return
        if self._storage_error is None:
            log.error("the Raft journal cannot be written (%s): this node refuses writes and "
                      "gives up the leadership until space is freed", exc.strerror or exc)
        self._next_probe = clock() + _HANDOFF_RETRY_S
        if exc.command and exc.command[:1] == b"\x00":
            try:
                call = codec.loads(exc.command[1:])
                self._on_write_lost(call[1][0])
            except (codec.CodecError, IndexError, TypeError):
                pass

    def _check_storage(self, raft: SyncObj) -> str | None:
        assert self._journal is not None
        failure = self._journal.failure
        now = clock()
        if failure is not None and now >= self._next_probe:
            # Nothing is written while writes are refused: test whether space came back.
            self._next_probe = now + _HANDOFF_RETRY_S
            if self._journal.probe():
                failure = None
        if failure is None:
            if self._storage_error is not None:
                log.info("the Raft journal can be written again")
            return None
        if raft._isLeader() and now >= self._next_handoff:
            # A leader that cannot persist stalls every write: hand over to a caught-up
            # follower (best effort; without one it stays, refusing writes).
            self._next_handoff = now + _HANDOFF_RETRY_S
            raft.transferLeadership(None, None)
        return failure

    def _wait_for_work(self, raft: SyncObj, late: bool) -> None:
        """Poll the sockets until the next tick has something to do.

        Handling a message happens inside the poll (the handler also sends the answer, once
        the journal is durable: transport.flush), so most messages need no tick after them.
        An idle leader is woken by every heartbeat answer (two per round in a 3-node
        cluster) and a follower by every heartbeat; ticking after each of those tripled the
        leader's ticks for nothing. A wake that leaves the node idle (`_idle`) goes back to
        the poll; a timer that fires (the poll returns with no event), a wake that brings
        work (a write, something to commit or apply, an election), or `_MAX_WAIT_S` since
        this tick (a follower's heartbeats alone would postpone its ticks for ever) ticks."""
        if late and not self._idle(raft):
            return
        poller = raft._poller
        # pysyncobj does its housekeeping (redials, the once-a-second journal timer,
        # handshake deadlines) only in ticks, and a follower's heartbeats keep arriving
        # before its own timer fires: tick at least every _MAX_WAIT_S whatever wakes it.
        latest = clock() + _MAX_WAIT_S
        for _ in range(_MAX_QUIET_WAKES):
            timeout = min(self._wait_seconds(raft), latest - clock())
            if timeout <= 0.0 or self._stopping.is_set():
                return
            before = poller.dispatched
            poller.poll(timeout)
            if poller.dispatched == before or not self._idle(raft):
                return

    def _idle(self, raft: SyncObj) -> bool:
        """Nothing for a tick to do before its timer: no command or call queued, the log
        committed and applied, the same leader and term as at the last tick, and (on a
        follower) no election due or asked for."""
        if not self._calls.empty() or internals.commands_pending(raft):
            return False
        if not (internals.last_log_index(raft) == raft.raftCommitIndex == raft.raftLastApplied):
            return False
        status = self._status
        leader = raft._getLeader()
        if status is None or leader is None or leader.id != status.leader \
                or raft.raftCurrentTerm != status.term or raft._isLeader() != status.is_leader:
            return False
        if not status.is_leader and (internals.election_deadline(raft) <= clock()
                                     or internals.transfer_in_progress(raft)):
            return False
        return True

    def _wait_seconds(self, raft: SyncObj) -> float:
        if internals.commands_pending(raft) or not self._calls.empty():
            # Queued after this tick looked, and its wake-up may have been consumed by the
            # tick's own poll: without this it would wait for the next message or timer.
            return 0.0
        now = clock()
        if raft._isLeader():
            if self._in_flight and now < self._busy_until:
                return _BUSY_TICK_S
            wait = internals.next_heartbeat(raft) - now
        else:
            wait = internals.election_deadline(raft) - now
            if wait <= 0:
                # Past the deadline but no election started: no peer is connected. A new
                # connection is a socket event and wakes the poll; redials need a tick.
                wait = _MAX_WAIT_S
        return min(max(wait, 0.0), _MAX_WAIT_S)

    def _run_calls(self, raft: SyncObj) -> None:
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(raft))
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                future.set_exception(exc)

    def _fail_calls(self) -> None:
        while True:
            try:
                _, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("the Raft node stopped"))

    def _publish(self, raft: SyncObj) -> None:
        leader = raft._getLeader()
        others = raft.otherNodes
        is_leader = raft._isLeader()
        assert self._transport is not None
        heard = self._transport.last_heard()
        # pysyncobj's clock is not time.monotonic(), which PeerStatus speaks.
        shift = time.monotonic() - clock()
        peers = tuple(sorted(
            (PeerStatus(n.id, raft.isNodeConnected(n),
                        heard[n.id] + shift if n.id in heard else None) for n in others),
            key=lambda p: p.address))
        self._storage_error = self._check_storage(raft)
        members = tuple(sorted([self.self_address, *(n.id for n in others)]))
        status = RaftStatus(
            self_address=self.self_address,
            leader=leader.id if leader is not None else None,
            is_leader=is_leader,
            term=raft.raftCurrentTerm,
            commit_index=raft.raftCommitIndex,
            last_applied=raft.raftLastApplied,
            has_quorum=raft.hasQuorum,
            ready=raft.isReady(),
            members=members,
            peers=peers,
            storage_error=self._storage_error,
        )
        self._track_members(raft, members)
        if status != self._status:
            self._status = status
            self._on_status(status)

    def _track_members(self, raft: SyncObj, members: tuple[str, ...]) -> None:
        """Record the member list once the log entries that produced it are committed.

        pysyncobj applies a membership change when it is appended and undoes it if the entry
        is truncated, so the live set may hold a change that never commits. Persisting it
        only once everything up to where it was seen is applied keeps the file committed."""
        if members == self._recorded_members:
            self._pending_members = None
            return
        if self._pending_members is None or self._pending_members[0] != members:
            self._pending_members = (members, internals.last_log_index(raft))
        if raft.raftLastApplied >= self._pending_members[1]:
            self._record_members(members)
            self._pending_members = None

    def _record_members(self, members: tuple[str, ...]) -> None:
        try:
            self._member_file.save(self.self_address, members)
        except OSError as exc:
            log.error("could not record the Raft member list in %s: %s",
                      self._member_file.path, exc)
            return
        if self._recorded_members and members != self._recorded_members:
            log.info("Raft members: %s", ", ".join(members))
        self._recorded_members = members

    # --- thread-safe doors ------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._raft is not None and self._thread is not None and not self._stopping.is_set()

    def call(self, fn: Callable[[SyncObj], Any]) -> concurrent.futures.Future:
        """Run `fn(syncobj)` on the tick thread; its result or exception lands in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not self.running:
            future.set_exception(RuntimeError("the Raft node is not running"))
            return future
        self._calls.put((fn, future))
        assert self._raft is not None
        internals.wake(self._raft)
        return future

    def write_started(self) -> None:
        """A write was handed to pysyncobj: lets a lone leader tick fast for a moment."""
        with self._in_flight_lock:
            self._in_flight += 1
        self._busy_until = clock() + _BUSY_WINDOW_S

    def write_finished(self) -> None:
        with self._in_flight_lock:
            self._in_flight -= 1
        self._busy_until = clock() + _BUSY_WINDOW_S
