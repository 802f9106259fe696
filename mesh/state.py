"""ClusterStore: the Raft-replicated cluster state, and the one bridge from asyncio to it.

Layers, bottom up (the shape Patroni gives its pysyncobj module):

* `replicated.ReplicatedDocument` is a pysyncobj consumer holding the state collections. Its
  single replicated method takes a msgpack-encoded command; `commands.apply_command` does
  the work. Only plain data is stored, so snapshots hold nothing but dicts, lists and
  scalars. Readers get a `replicated.StateView` of it.
* `raft.node.RaftNode` owns pysyncobj's `SyncObj` and the thread that ticks it
  (event-driven, see its docstring), and publishes a `RaftStatus` after every tick.
* `ClusterStore.submit()` is the only way the asyncio side writes: it hands the command to
  pysyncobj's thread-safe queue and awaits an `asyncio.Future` that pysyncobj's callback
  completes through `loop.call_soon_threadsafe`. Every write has a deadline.
* Callbacks from the Raft thread only signal (`_notify_changed`); readers re-read
  `ClusterStore.view`, an immutable snapshot, from the event loop.
* Membership (`add_member`, `remove_member`, `transfer_leadership`) goes through the
  leader, one change at a time, and every node keeps the committed member list beside its
  journal, so a plain restart rejoins with every member.

The Raft port is protected by the cluster secret and bound to the configured host.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import threading
from pathlib import Path
from typing import Any

import msgpack
from pysyncobj import FAIL_REASON

from .raft.errors import (CommandRejected, NotLeader, StartupRefused, StateUnavailable,
                          StorageFull, WriteOutcomeUnknown)
from .raft.node import RaftNode
from .raft.status import PeerStatus, RaftStatus
from .replicated import ReplicatedDocument, StateView

__all__ = ["ClusterStore", "RaftStatus", "PeerStatus", "StateUnavailable",
           "WriteOutcomeUnknown", "StorageFull", "NotLeader", "StartupRefused",
           "CommandRejected"]

log = logging.getLogger("gpumesh.state")

_MEMBERSHIP_RETRY_S = 0.05
# A command is one Raft log entry, sent whole to every follower: keep entries small.
MAX_COMMAND_BYTES = 1 << 20
_RETRY_FIRST_S = 0.01
_RETRY_MAX_S = 0.2


class ClusterStore:
    """The asyncio side's door to the replicated state and to the Raft membership.

    Founding a cluster: `partners=[]`. Joining one: start the store with `partners` set to
    every current member's Raft address (the list the leader's `add_member` returns, or its
    `status.members`) — never an empty or partial list, which can split the cluster — and
    have the leader call `add_member(this node's address)`. Restarting: the member list this
    node last saw committed is kept in `<journal_file>.members` and wins over `partners`,
    so a plain restart rejoins with every member.
    """

    def __init__(self, *, self_address: str, partners: list[str], journal_file: Path,
                 snapshot_file: Path, secret: str, bind_host: str) -> None:
        self._self_address = self_address
        self._loop: asyncio.AbstractEventLoop | None = None
        self._document = ReplicatedDocument(self._signal_applied)
        self._node = RaftNode(self_address=self_address, partners=list(partners),
                              bind_host=bind_host, secret=secret, journal_file=journal_file,
                              snapshot_file=snapshot_file, consumers=[self._document],
                              on_status=self._on_status, on_write_lost=self._on_write_lost)
        self._attempts: dict[str, asyncio.Future] = {}   # rid -> the attempt in flight
        self._started = False
        self._changed = asyncio.Event()
        self._change_pending = threading.Event()
        self._membership_lock = asyncio.Lock()
        self._version = 0
        self._view: StateView | None = None
        self._status = RaftStatus(self_address, None, False, 0, 0, 0, False, False,
                                  (self_address,))

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the journal, bind the Raft port, and start the tick thread.

        Raises StartupRefused (with the operator's next step in the message) when the
        journal or member list is damaged, or the port cannot be bound."""
        self._loop = asyncio.get_running_loop()
        # SyncObj's constructor reads the journal and binds: blocking, so off the loop.
        opening = asyncio.ensure_future(asyncio.to_thread(self._node.open))
        try:
            await asyncio.shield(opening)
        except asyncio.CancelledError:
            # Cancelled (a Ctrl-C during start-up) while the worker thread opens: it goes on
            # and starts the tick thread, which is not a daemon thread and would keep the
            # process alive after everything else stopped. Close what it opened.
            await asyncio.gather(opening, return_exceptions=True)
            await asyncio.to_thread(self._node.close)
            raise
        self._started = True

    async def stop(self) -> None:
        """Stop ticking, join the thread, close the journal and sockets. Harmless twice."""
        await asyncio.to_thread(self._node.close)

    async def wait_ready(self, timeout: float) -> None:
        """Wait until this node has a leader and has applied the committed log."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not (self._status.ready and self._status.leader):
            if asyncio.get_running_loop().time() > deadline:
                raise StateUnavailable(
                    f"the Raft group did not become ready within {timeout:.0f} s "
                    f"(leader: {self._status.leader or 'none'})")
            await asyncio.sleep(0.05)

    def _on_status(self, status: RaftStatus) -> None:
        # Raft thread, after a tick that changed something.
        changed_leader = status.leader != self._status.leader
        changed_members = status.members != self._status.members
        self._status = status   # one reference swap: readers see old or new, never half
        if changed_leader or changed_members:
            self._signal_applied()

    # --- reading ---------------------------------------------------------------------------

    @property
    def status(self) -> RaftStatus:
        return self._status

    @property
    def running(self) -> bool:
        """Between start() and stop(): writes can be attempted."""
        return self._node.running

    @property
    def view(self) -> StateView:
        # One StateView per version, not per call: the gateway reads it several times per
        # request. (It is made anew whenever the state or the version moved.)
        view = self._view
        state = self._document.state
        if view is None or view._state is not state or view.version != self._version:
            view = self._view = StateView(state, self._version)
        return view

    async def wait_changed(self, version: int, timeout: float | None = None) -> StateView:
        """Return a view newer than `version`, waiting for a change (or the timeout) if needed.

        Leader and membership changes count as changes too (the view's version moves)."""
        if self._version == version:
            event = self._changed
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancel that
            # arrives as the event is set (it returns instead), and the agent's and the
            # reconciler's loops around this call then never stopped (a stop that hung).
            try:
                async with asyncio.timeout(timeout):
                    await event.wait()
            except TimeoutError:
                pass                     # no change in time: the caller re-checks anyway
        return self.view

    def _signal_applied(self) -> None:
        # Raft thread. Many commands may apply in one tick: schedule one wake-up, not many.
        if self._loop is None or self._change_pending.is_set():
            return
        self._change_pending.set()
        try:
            self._loop.call_soon_threadsafe(self._wake_watchers)
        except RuntimeError:  # loop closed during shutdown
            pass

    def _wake_watchers(self) -> None:
        self._change_pending.clear()
        self._version += 1
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    # --- writing ---------------------------------------------------------------------------

    async def submit(self, command: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """Replicate one command and return its result once committed and applied here.

        The command gets a request id (`"rid"`, unless the caller set one: to retry a write
        across submits, pass its rid again) and applies at most once however often it is
        sent. Until the deadline, attempts that were certainly not applied (no leader yet,
        sent to a node that had stopped leading, queue full) are retried with the same rid.

        Raises:
          CommandRejected: the state machine refused it; nothing changed.
          WriteOutcomeUnknown: it reached the Raft group but no answer came in time (or the
            leader changed under it): it may still apply. Re-read the state; resubmitting
            with the same rid is safe.
          StorageFull: this node cannot write its journal (disk full).
          StateUnavailable: it was not applied (no leader within the deadline, not running).
        """
        if not self._node.running or self._loop is None:
            if self._status.storage_error:
                raise StorageFull(f"this node cannot write: {self._status.storage_error}")
            raise StateUnavailable("the state store is not running")
        if not isinstance(command.get("rid"), str):
            command = {**command, "rid": secrets.token_hex(8)}
        payload = msgpack.packb(command, use_bin_type=True)
        op = command.get("op")
        if len(payload) > MAX_COMMAND_BYTES:
            raise CommandRejected("too_large", f"the {op} command is {len(payload)} bytes; the "
                                  f"limit is {MAX_COMMAND_BYTES} bytes")
        loop = self._loop
        deadline = loop.time() + timeout
        uncertain = False
        pause = _RETRY_FIRST_S
        while True:
            self._refuse_if_storage_failed(op)
            result, error = await self._attempt(command["rid"], payload, deadline)
            if error == FAIL_REASON.SUCCESS:
                break
            if error == _NOT_PERSISTED:
                raise StorageFull(f"{op} was not applied: the leader could not write it to "
                                  f"its Raft journal ({self._status.storage_error or 'disk full'})")
            uncertain = uncertain or error is None or error in _UNCERTAIN
            if error is None or loop.time() + pause >= deadline:
                why = ("no answer came" if error is None
                       else _FAIL_WORDS.get(error, "pysyncobj refused it"))
                if uncertain:
                    raise WriteOutcomeUnknown(
                        f"{op}: outcome unknown — it reached the Raft group but was not "
                        f"confirmed within {timeout:g} s ({why}; leader: "
                        f"{self._status.leader or 'none'}, quorum: {self._status.has_quorum}). "
                        f"It may still be applied: re-read before retrying")
                raise StateUnavailable(f"{op} was not applied: {why} (for {timeout:g} s)")
            await asyncio.sleep(pause)
            pause = min(pause * 2, _RETRY_MAX_S)
        if "error" in result:
            raise CommandRejected(result.get("code", "rejected"), result["error"])
        return result

    async def _attempt(self, rid: str, payload: bytes,
                       deadline: float) -> tuple[Any, int | None]:
        """Hand one copy of the command to pysyncobj; (result, error code), or (None, None)
        if no answer came before `deadline`."""
        assert self._loop is not None
        loop, node = self._loop, self._node
        future: asyncio.Future[tuple[Any, int]] = loop.create_future()
        self._attempts[rid] = future

        def on_done(result: Any, error: int) -> None:  # called on the Raft thread
            node.write_finished()
            loop.call_soon_threadsafe(_resolve, future, result, error)

        node.write_started()
        try:
            self._document._apply(payload, callback=on_done)
        except OSError:
            pass    # the wake-up pipe is full: the command is queued and a wake-up pending
        try:
            return await asyncio.wait_for(future, max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            return None, None
        finally:
            if self._attempts.get(rid) is future:
                del self._attempts[rid]

    def _on_write_lost(self, payload: bytes) -> None:
        # Raft thread: this node, leading, could not persist the command carrying `payload`.
        try:
            rid = msgpack.unpackb(payload, raw=False).get("rid")
        except (ValueError, AttributeError):
            return
        if self._loop is not None and isinstance(rid, str):
            self._loop.call_soon_threadsafe(self._fail_attempt, rid)

    def _fail_attempt(self, rid: str) -> None:
        future = self._attempts.get(rid)
        if future is not None:
            _resolve(future, None, _NOT_PERSISTED)

    def _refuse_if_storage_failed(self, op: Any) -> None:
        if self._status.storage_error:
            raise StorageFull(f"{op} was not applied: this node cannot write its Raft journal "
                              f"({self._status.storage_error}); free disk space on it")

    # --- membership ------------------------------------------------------------------------

    async def add_member(self, address: str, timeout: float = 10.0) -> tuple[str, ...]:
        """Add the node at Raft `address` ("host:port") to the membership; return the member
        list once the change is committed and applied on this node.

        Runs on the leader only (NotLeader otherwise; `exc.leader` says where to forward).
        Changes are serialised here, one at a time (pysyncobj's own guard does not work).
        Adding a member that is already one returns at once.

        The change counts towards the quorum as soon as the leader appends it, so: in a
        1-member cluster it can only commit once the new node runs (start the joiner first,
        with `partners` = the current members, then add it); in larger clusters a node added
        but never started weakens the quorum — remove it if it is not up by a deadline.
        Raises WriteOutcomeUnknown if the change was appended but not committed in time (it
        may still commit), StateUnavailable if it was refused before that.
        """
        _check_address(address)
        async with self._membership_lock:
            self._require_leader("add a member")
            if address in self._status.members:
                return self._status.members
            await self._change_membership("add", address, timeout)
            return await self._wait_members(lambda m: address in m, timeout)

    async def remove_member(self, address: str, timeout: float = 10.0) -> tuple[str, ...]:
        """Take the node at Raft `address` out of the membership; return the member list
        once committed. Leader only (NotLeader otherwise). The leader cannot remove itself:
        call `transfer_leadership()` first and remove it through the new leader.

        The removed node is not told (it never receives the entry): stop it, and wipe its
        data dir before it joins again. Removing a non-member returns at once."""
        _check_address(address)
        async with self._membership_lock:
            self._require_leader("remove a member")
            if address == self._self_address:
                raise CommandRejected(
                    "cannot_remove_leader",
                    f"{address} is the leader and cannot remove itself: transfer the "
                    f"leadership first, then remove it through the new leader")
            if address not in self._status.members:
                return self._status.members
            await self._change_membership("rem", address, timeout)
            return await self._wait_members(lambda m: address not in m, timeout)

    async def transfer_leadership(self, target: str | None = None,
                                  timeout: float = 3.0) -> str:
        """Hand the leadership to `target` (or the most caught-up connected follower) and
        return the new leader's address once this node sees it. Leader only."""
        if target is not None:
            _check_address(target)
        async with self._membership_lock:
            self._require_leader("transfer the leadership")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                error = await self._raft_call(
                    lambda raft, cb: raft.transferLeadership(target, cb), deadline)
                if error == FAIL_REASON.SUCCESS:
                    break
                if loop.time() >= deadline or error == FAIL_REASON.NOT_LEADER:
                    raise StateUnavailable(
                        f"could not transfer the leadership: "
                        f"{'no follower is connected and caught up' if error == FAIL_REASON.REQUEST_DENIED else _FAIL_WORDS.get(error, 'failed')}")
                await asyncio.sleep(_MEMBERSHIP_RETRY_S)
            while loop.time() < deadline:
                leader = self._status.leader
                if leader is not None and leader != self._self_address:
                    return leader
                await asyncio.sleep(0.01)
            raise WriteOutcomeUnknown(
                f"the leadership transfer was requested but no new leader was seen within "
                f"{timeout:g} s (outcome unknown)")

    def _require_leader(self, what: str) -> None:
        if not self._node.running:
            raise StateUnavailable("the state store is not running")
        if not self._status.is_leader:
            raise NotLeader(f"only the leader can {what}; the leader is "
                            f"{self._status.leader or 'unknown (election in progress)'}",
                            self._status.leader)

    async def _change_membership(self, kind: str, address: str, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        word = "adding" if kind == "add" else "removing"
        while True:
            if kind == "add":
                error = await self._raft_call(
                    lambda raft, cb: raft.addNodeToCluster(address, cb), deadline)
            else:
                error = await self._raft_call(
                    lambda raft, cb: raft.removeNodeFromCluster(address, cb), deadline)
            if error == FAIL_REASON.SUCCESS:
                return
            if error is None:
                raise WriteOutcomeUnknown(
                    f"{word} {address}: outcome unknown — the change was handed to the leader "
                    f"but not committed within {timeout:g} s; it may still commit (a new "
                    f"member must be running for a 1-member cluster to commit it)")
            if error == FAIL_REASON.REQUEST_DENIED and loop.time() < deadline:
                # A new leader must apply its term's no-op before a membership change.
                await asyncio.sleep(_MEMBERSHIP_RETRY_S)
                self._require_leader(f"{'add' if kind == 'add' else 'remove'} a member")
                continue
            raise StateUnavailable(f"{word} {address} failed: "
                                   f"{_FAIL_WORDS.get(error, 'the leader refused it')}")

    async def _raft_call(self, start: Any, deadline: float) -> int | None:
        """Run `start(syncobj, callback)` on the tick thread and wait for the callback's
        error code until `deadline` (None if it did not come in time)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[Any, int]] = loop.create_future()

        def callback(result: Any, error: int) -> None:   # Raft thread
            loop.call_soon_threadsafe(_resolve, future, result, error)

        await asyncio.wrap_future(self._node.call(lambda raft: start(raft, callback)))
        try:
            _, error = await asyncio.wait_for(future, max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            return None
        return error

    async def _wait_members(self, done: Any, timeout: float) -> tuple[str, ...]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done(self._status.members):
            if loop.time() > deadline:
                break
            await asyncio.sleep(0.005)
        return self._status.members


def _check_address(address: str) -> None:
    host, _, port = address.rpartition(":")
    try:
        ipaddress.ip_address(host)
        valid = 0 < int(port) < 65536
    except ValueError:
        valid = False
    if not valid:
        raise CommandRejected("bad_address",
                              f"a Raft address is IP:port (e.g. 10.0.0.5:8471), got {address!r}")


def _resolve(future: asyncio.Future, result: Any, error: int) -> None:
    if not future.done():
        future.set_result((result, error))


# Not a pysyncobj code: the leader (this node) could not write the entry to its journal.
_NOT_PERSISTED = -1

# Failures after which the command may still be applied: a follower lost track of a
# command it had forwarded when the leader changed, or the answer refers to an entry already
# applied. The others say for sure that this copy was not applied.
_UNCERTAIN = {FAIL_REASON.LEADER_CHANGED, FAIL_REASON.UNKNOWN_OUTCOME}

_FAIL_WORDS = {
    FAIL_REASON.QUEUE_FULL: "the command queue is full",
    FAIL_REASON.MISSING_LEADER: "there is no Raft leader (an election, or no quorum)",
    FAIL_REASON.DISCARDED: "the command was discarded by a leader change",
    FAIL_REASON.NOT_LEADER: "the node it was sent to is not the leader",
    FAIL_REASON.LEADER_CHANGED: "the leader changed before it committed",
    FAIL_REASON.REQUEST_DENIED: "the request was denied",
    FAIL_REASON.UNKNOWN_OUTCOME: "its outcome is unknown",
}
