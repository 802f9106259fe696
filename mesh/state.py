"""ClusterStore: the Raft-replicated cluster state, and the one bridge from asyncio to it.

Layers, bottom up (the shape Patroni gives its pysyncobj module):

* `_ReplicatedDocument` is a pysyncobj consumer holding the state collections. Its single
  replicated method takes a msgpack-encoded command; `commands.apply_command` does the work.
  Only plain data is stored, so snapshots hold nothing but dicts, lists and scalars.
* pysyncobj's `SyncObj` runs with `autoTick=False`: `ClusterStore` owns the tick thread,
  starts it, and joins it on `stop()`.
* `ClusterStore.submit()` is the only way the asyncio side writes: it hands the command to
  pysyncobj's thread-safe queue and awaits an `asyncio.Future` that pysyncobj's callback
  completes through `loop.call_soon_threadsafe`. Every write has a deadline.
* Callbacks from the Raft thread only signal (`_notify_changed`); readers re-read
  `ClusterStore.view`, an immutable snapshot, from the event loop.

The Raft port is protected by the cluster secret (pysyncobj's `password`: each message is an
authenticated Fernet token, checked before it is decoded) and bound to the configured host.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import msgpack
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjConsumer, replicated

from .commands import State, apply_command, empty_state

__all__ = ["ClusterStore", "RaftStatus", "StateUnavailable", "CommandRejected", "StateView"]

log = logging.getLogger("gpumesh.state")

# How long the tick thread may sleep when nothing happens. Submitting a command wakes it at
# once (pysyncobj's pipe notifier), so this bounds only timer-driven work: heartbeats,
# elections. 50 ms is pysyncobj's own default and costs well under 1% of a core when idle.
_TICK_SECONDS = 0.05
# While our own writes are in flight the commit index moves on a *later* tick than the one
# that appended the entry, so the thread ticks with a short wait until they are answered:
# latency follows events (appends, acks) instead of the 50 ms timer, and idle cost is unchanged.
_BUSY_TICK_SECONDS = 0.001


class StateUnavailable(Exception):
    """The write could not be committed: no leader, no quorum, or the deadline passed."""


class CommandRejected(Exception):
    """The state machine refused the command (its condition failed); nothing changed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class RaftStatus:
    """What this node knows of the Raft group, refreshed by the tick thread after each tick."""

    self_address: str
    leader: str | None
    is_leader: bool
    term: int
    commit_index: int
    last_applied: int
    has_quorum: bool
    ready: bool
    members: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


class StateView:
    """A read-only snapshot of the replicated state. Cheap to make; never changes."""

    def __init__(self, state: State, version: int) -> None:
        self._state = state
        self.version = version

    @property
    def nodes(self) -> dict[str, dict[str, Any]]:
        return self._state["nodes"]

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        return self._state["models"]

    @property
    def instances(self) -> dict[str, dict[str, Any]]:
        return self._state["instances"]

    def instances_of(self, model: str) -> list[dict[str, Any]]:
        return [i for i in self._state["instances"].values() if i["model"] == model]

    def instances_on(self, node_id: str) -> Iterator[dict[str, Any]]:
        return (i for i in self._state["instances"].values() if i["node_id"] == node_id)

    def api_key(self, key_hash: str) -> dict[str, Any] | None:
        return self._state["api_keys"].get(key_hash)

    @property
    def api_keys(self) -> dict[str, dict[str, Any]]:
        return self._state["api_keys"]


class _ReplicatedDocument(SyncObjConsumer):
    """The replicated collections. pysyncobj snapshots every attribute set after __init__."""

    def __init__(self, on_applied: Callable[[], None]) -> None:
        self._on_applied = on_applied   # set before super().__init__: not part of snapshots
        super().__init__()
        self.state: State = empty_state()

    @replicated
    def _apply(self, payload: bytes) -> dict[str, Any]:
        # Runs on the Raft thread, on every node, in log order.
        command = msgpack.unpackb(payload, raw=False)
        self.state, result = apply_command(self.state, command)
        self._on_applied()
        return result

    def _deserialize(self, data: dict[str, Any]) -> None:
        # A snapshot was loaded (restart, or a follower catching up): readers must re-read.
        super()._deserialize(data)
        self._on_applied()


class ClusterStore:
    """Owns the pysyncobj instance and its tick thread; the asyncio side's door to the state."""

    def __init__(self, *, self_address: str, partners: list[str], journal_file: Path,
                 snapshot_file: Path, secret: str, bind_host: str) -> None:
        self._self_address = self_address
        self._partners = partners
        self._conf = SyncObjConf(
            autoTick=False,
            # Send each command at once instead of batching on the next timer tick, which
            # also enables pysyncobj's pipe notifier: a submit wakes the tick thread.
            appendEntriesUseBatch=False,
            journalFile=str(journal_file),
            fullDumpFile=str(snapshot_file),
            password=secret,
            bindAddress=f"{bind_host}:{self_address.rsplit(':', 1)[1]}",
            # Log compaction serialises in the tick thread: never fork a threaded asyncio process.
            useFork=False,
            leaderFallbackTimeout=5.0,
            commandsWaitLeader=True,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._raft: SyncObj | None = None
        self._document = _ReplicatedDocument(self._signal_applied)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._changed = asyncio.Event()
        self._change_pending = threading.Event()
        self._in_flight = 0                     # writes awaiting their callback
        self._in_flight_lock = threading.Lock()
        self._version = 0
        self._status = RaftStatus(self_address, None, False, 0, 0, 0, False, False, ())

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the journal, bind the Raft port, and start the tick thread."""
        self._loop = asyncio.get_running_loop()
        # SyncObj's constructor reads the journal and binds: blocking, so off the loop.
        self._raft = await asyncio.to_thread(
            SyncObj, self._self_address, self._partners, self._conf, [self._document])
        self._thread = threading.Thread(target=self._tick_forever, name="gpumesh-raft",
                                        daemon=False)
        self._thread.start()

    async def stop(self) -> None:
        """Stop ticking, join the thread, close the journal and sockets."""
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._raft is not None:
            self._raft.destroy()   # autoTick=False: destroys synchronously, in this thread
            self._raft = None

    async def wait_ready(self, timeout: float) -> None:
        """Wait until this node has a leader and has applied the committed log."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not (self._status.ready and self._status.leader):
            if asyncio.get_running_loop().time() > deadline:
                raise StateUnavailable(
                    f"the Raft group did not become ready within {timeout:.0f} s "
                    f"(leader: {self._status.leader or 'none'})")
            await asyncio.sleep(0.05)

    def _tick_forever(self) -> None:
        assert self._raft is not None
        while not self._stopping.is_set():
            try:
                self._raft.doTick(_BUSY_TICK_SECONDS if self._in_flight else _TICK_SECONDS)
            except Exception:  # noqa: BLE001 - one bad tick must not kill replication
                log.exception("Raft tick failed; continuing")
                self._stopping.wait(_TICK_SECONDS)
            self._publish_status()

    def _publish_status(self) -> None:
        raft = self._raft
        assert raft is not None
        leader = raft._getLeader()
        status = RaftStatus(
            self_address=self._self_address,
            leader=leader.id if leader is not None else None,
            is_leader=raft._isLeader(),
            term=raft.raftCurrentTerm,
            commit_index=raft.raftCommitIndex,
            last_applied=raft.raftLastApplied,
            has_quorum=raft.hasQuorum,
            ready=raft.isReady(),
            members=tuple(sorted([self._self_address, *(n.id for n in raft.otherNodes)])),
        )
        if status != self._status:
            changed_leader = status.leader != self._status.leader
            self._status = status   # one reference swap: readers see old or new, never half
            if changed_leader:
                self._signal_applied()

    # --- reading ---------------------------------------------------------------------------

    @property
    def status(self) -> RaftStatus:
        return self._status

    @property
    def view(self) -> StateView:
        return StateView(self._document.state, self._version)

    async def wait_changed(self, version: int, timeout: float | None = None) -> StateView:
        """Return a view newer than `version`, waiting for a change (or the timeout) if needed."""
        if self._version == version:
            event = self._changed
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except asyncio.TimeoutError:
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

        Raises CommandRejected when the state machine refused it, StateUnavailable when it
        could not be committed in time (no leader, no quorum, deadline).
        """
        if self._raft is None or self._loop is None:
            raise StateUnavailable("the state store is not running")
        loop = self._loop
        future: asyncio.Future[tuple[Any, int]] = loop.create_future()

        def on_done(result: Any, error: int) -> None:  # called on the Raft thread
            self._count_in_flight(-1)
            loop.call_soon_threadsafe(_resolve, future, result, error)

        payload = msgpack.packb(command, use_bin_type=True)
        self._count_in_flight(+1)
        self._document._apply(payload, callback=on_done)
        try:
            result, error = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise StateUnavailable(
                f"{command.get('op')} was not committed within {timeout:g} s "
                f"(leader: {self._status.leader or 'none'}, quorum: {self._status.has_quorum})"
            ) from None
        if error != FAIL_REASON.SUCCESS:
            raise StateUnavailable(f"{command.get('op')} failed: {_FAIL_WORDS.get(error, error)}")
        if "error" in result:
            raise CommandRejected(result.get("code", "rejected"), result["error"])
        return result

    def _count_in_flight(self, delta: int) -> None:
        with self._in_flight_lock:
            self._in_flight += delta


def _resolve(future: asyncio.Future, result: Any, error: int) -> None:
    if not future.done():
        future.set_result((result, error))


_FAIL_WORDS = {
    FAIL_REASON.QUEUE_FULL: "the command queue is full",
    FAIL_REASON.MISSING_LEADER: "there is no Raft leader (no quorum?)",
    FAIL_REASON.DISCARDED: "the command was discarded by a leader change",
    FAIL_REASON.NOT_LEADER: "the node it was sent to is not the leader",
    FAIL_REASON.LEADER_CHANGED: "the leader changed before it committed",
    FAIL_REASON.REQUEST_DENIED: "the request was denied",
}
