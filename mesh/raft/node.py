"""RaftNode: one pysyncobj `SyncObj`, configured for gpumesh, and the thread that ticks it.

Everything pysyncobj does happens on that one thread (it is not thread-safe): ticks, message
handling, callbacks, and any `call()` handed in from outside. The thread owns the SyncObj
from construction to `destroy()`.

Ticking is event-driven (../RAFT-NOTES.md §3): each turn runs one tick without waiting, then
polls the sockets until the next thing pysyncobj has to do by itself: the leader's next
heartbeat, or a follower's election deadline (at most `_MAX_WAIT_S`). A submitted command
or an arriving message wakes the poll at once (pysyncobj's pipe notifier and its sockets),
so commits follow acks, not a timer, and an idle node sleeps ~100 ms at a time.

One case has no event to wake on: a leader with no peer to ack (a 1-node cluster) commits an
entry on the tick *after* the one that appended it. For that, a leader with writes in flight
ticks every 1 ms — but only for `_BUSY_WINDOW_S` after the last submit or answer, so a
write stuck in an outage never keeps a core busy.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pysyncobj import SyncObj, SyncObjConf, SyncObjConsumer
from pysyncobj.transport import TCPTransport

from . import internals
from .internals import clock
from .errors import StartupRefused
from .members import MemberFile

__all__ = ["RaftNode", "RaftStatus", "PeerStatus"]

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
# After start, a node with peers waits this long before it may campaign, so a restarted node
# hears the sitting leader before it can depose it with a higher term (no PreVote in pysyncobj).
_QUIET_START_S = 1.5
_MAX_WAIT_S = 0.25
_BUSY_TICK_S = 0.001
_BUSY_WINDOW_S = 0.05
# When the leader's connection closes (its process died, the kernel sent FIN), followers hold
# an election at once instead of waiting out the timeout: the first in address order after
# this delay, the next one a step later, so their requests do not split the vote.
_FIN_ELECTION_DELAY_S = 0.02
_FIN_RANK_STEP_S = 0.08


@dataclass(frozen=True)
class PeerStatus:
    """One other member as this node sees it."""

    address: str
    connected: bool
    # time.monotonic() when this node last heard from it. None: never, or not known here.
    # On the leader this is refreshed by every heartbeat answer (10 per second), so a leader
    # can tell an unreachable node from what Raft already exchanges, with no extra writes.
    last_heard: float | None = None

    def silent_for(self, now: float | None = None) -> float | None:
        """Seconds since this node last heard from the peer, or None if it never did."""
        if self.last_heard is None:
            return None
        return max(0.0, (time.monotonic() if now is None else now) - self.last_heard)


@dataclass(frozen=True)
class RaftStatus:
    """What this node knows of the Raft group, published by the tick thread after each tick."""

    self_address: str
    leader: str | None
    is_leader: bool
    term: int
    commit_index: int
    last_applied: int
    has_quorum: bool
    ready: bool
    members: tuple[str, ...]                       # sorted, this node included
    peers: tuple[PeerStatus, ...] = field(default=())
    storage_error: str | None = None               # why this node cannot persist, if it cannot

    def to_dict(self) -> dict[str, Any]:
        now = time.monotonic()
        data = {k: v for k, v in self.__dict__.items() if k != "peers"}
        data["members"] = list(self.members)
        data["peers"] = {p.address: {"connected": p.connected,
                                     "silent_s": _round(p.silent_for(now))}
                         for p in self.peers}
        return data


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class _Transport(TCPTransport):
    """pysyncobj's TCP transport plus the leader-FIN hook (notes §2)."""

    def _onNodeDisconnected(self, node: Any) -> None:
        super()._onNodeDisconnected(node)
        raft = self._syncObj
        if raft._getLeader() == node and not raft._isLeader():
            others = sorted(n.id for n in raft.otherNodes if n != node)
            rank = sorted([*others, raft.selfNode.id]).index(raft.selfNode.id)
            delay = _FIN_ELECTION_DELAY_S + rank * _FIN_RANK_STEP_S + random.uniform(0, 0.02)
            internals.set_election_deadline(raft, clock() + delay)


class RaftNode:
    """A SyncObj and its tick thread. Blocking methods say so; the rest are thread-safe."""

    def __init__(self, *, self_address: str, partners: list[str], bind_host: str,
                 secret: str, journal_file: Path, snapshot_file: Path,
                 consumers: list[SyncObjConsumer],
                 on_status: Callable[[RaftStatus], None]) -> None:
        internals.check_version()
        self.self_address = self_address
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
            password=secret,
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
        self.ticks = 0          # ticks run so far (tests and benchmarks read it)

    # --- lifecycle (blocking: call from a worker thread) ------------------------------------

    def open(self) -> None:
        """Read the journal, bind the Raft port, and start the tick thread. Blocking."""
        members = self._starting_members()
        others = [m for m in members if m != self.self_address]
        try:
            raft = SyncObj(self.self_address, others, self._conf, self._consumers,
                           transportClass=_Transport)
        except Exception as exc:
            if "BindError" in str(exc):
                raise StartupRefused(f"cannot listen on the Raft address "
                                     f"{self._conf.bindAddress}: it is in use or not "
                                     f"this machine's") from None
            raise
        if others:
            internals.set_election_deadline(
                raft, clock() + _QUIET_START_S
                + random.uniform(0, _RAFT_MAX_TIMEOUT_S - _RAFT_MIN_TIMEOUT_S))
        self._raft = raft
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
        raft = self._raft
        assert raft is not None
        try:
            while not self._stopping.is_set():
                self._run_calls(raft)
                self.ticks += 1
                try:
                    raft.doTick(0.0)
                    self._publish(raft)
                    raft._poller.poll(self._wait_seconds(raft))
                except Exception:  # noqa: BLE001 - one bad tick must not stop replication
                    log.exception("Raft tick failed; continuing")
                    self._stopping.wait(0.05)
        finally:
            self._fail_calls()
            raft.destroy()          # autoTick=False: synchronous, in this (the owning) thread

    def _wait_seconds(self, raft: SyncObj) -> float:
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
        heard = internals.last_response_times(raft) if is_leader else {}
        # pysyncobj's times are on its own clock; PeerStatus speaks time.monotonic().
        shift = time.monotonic() - clock()
        peers = tuple(sorted(
            (PeerStatus(n.id, raft.isNodeConnected(n),
                        heard[n] + shift if n in heard else None) for n in others),
            key=lambda p: p.address))
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
