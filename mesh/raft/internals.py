"""The pysyncobj internals gpumesh relies on, named in one place and checked against the pin.

pysyncobj has no public hooks for these, and forking it is not worth it (../RAFT-NOTES.md
§0). Every private attribute gpumesh reads or writes goes through this module, so a new
pysyncobj version is one file to re-check. `check_version` refuses any version other than
the one these accessors were written against (pyproject pins it too).
"""

from __future__ import annotations

import errno
from typing import Any, Callable

from pysyncobj import SyncObj
from pysyncobj.monotonic import monotonic as clock
from pysyncobj.version import VERSION

__all__ = ["PINNED_VERSION", "check_version", "clock", "install", "transport_of", "journal_of",
           "election_deadline", "set_election_deadline", "next_heartbeat", "last_log_index",
           "commands_pending", "wake", "leader_noop_applied", "last_log_term",
           "would_campaign", "transfer_in_progress"]

PINNED_VERSION = "0.3.17"
_FOLLOWER, _CANDIDATE = 0, 1         # pysyncobj's _RAFT_STATE


# pysyncobj's deadlines are on its own clock (CLOCK_MONOTONIC_RAW on Linux), not on
# time.monotonic(): every time compared with them must come from `clock()`.


def check_version() -> None:
    if VERSION != PINNED_VERSION:
        raise RuntimeError(
            f"gpumesh needs pysyncobj {PINNED_VERSION} (it reaches into its internals: "
            f"mesh/raft/internals.py); {VERSION} is installed")


def election_deadline(raft: SyncObj) -> float:
    """When a follower or candidate next starts an election (monotonic seconds)."""
    return raft._SyncObj__raftElectionDeadline


def set_election_deadline(raft: SyncObj, when: float) -> None:
    # Tick thread only. Used by PreVote and the leader-FIN hook.
    raft._SyncObj__raftElectionDeadline = when


def next_heartbeat(raft: SyncObj) -> float:
    """When a leader next sends append_entries (monotonic seconds)."""
    return raft._SyncObj__newAppendEntriesTime


def last_log_index(raft: SyncObj) -> int:
    return raft._SyncObj__raftLog[-1][1]


def last_log_term(raft: SyncObj) -> int:
    return raft._SyncObj__raftLog[-1][2]


def would_campaign(raft: SyncObj) -> bool:
    """Whether pysyncobj's next tick starts an election (its own test, syncobj.py _onTick)."""
    return (raft._SyncObj__raftState in (_FOLLOWER, _CANDIDATE)
            and raft.selfNode is not None
            and raft._SyncObj__raftElectionDeadline < clock()
            and raft._SyncObj__connectedToAnyone())


def transfer_in_progress(raft: SyncObj) -> bool:
    """The leader asked this node to take over (TimeoutNow)."""
    return bool(raft._SyncObj__transferInProgress)


def commands_pending(raft: SyncObj) -> bool:
    """Commands queued for the tick thread that no tick has taken yet."""
    return bool(raft._SyncObj__commandsQueue._FastQueue__queue)


def leader_noop_applied(raft: SyncObj) -> bool:
    """A new leader may change the membership only after its term's no-op is applied."""
    noop = raft._SyncObj__noopIDx
    return noop is not None and raft.raftLastApplied >= noop


def wake(raft: SyncObj) -> None:
    """Wake the tick thread's poll (pysyncobj's pipe notifier; needs appendEntriesUseBatch=False)."""
    notifier = getattr(raft, "_SyncObj__pipeNotifier", None)
    if notifier is None:
        return
    try:
        notifier.notify()
    except OSError as exc:   # pipe full: a wake-up is already pending, which is all we want
        if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise




def transport_of(raft: SyncObj) -> Any:
    return raft._SyncObj__transport


def journal_of(raft: SyncObj) -> Any:
    return raft._SyncObj__raftLog


def install(codec: Any, create_journal: Callable[[str | None], Any],
            create_poller: Callable[[str], Any]) -> None:
    """Replace pickle, the journal and the poller inside pysyncobj, for the whole process.

    pysyncobj reaches pickle through a module-global name `pickle` in each module that
    serialises (`syncobj`: commands, membership entries, chunked entries; `serializer`:
    snapshots; `tcp_connection`: its wire, unused with gpumesh's transport), and builds its
    journal and poller through the module-globals `createJournal` and `createPoller`.
    Rebinding those names swaps them without a fork; `codec` must offer pickle's
    dumps/loads/dump/load/to_bytes."""
    import pysyncobj.serializer
    import pysyncobj.syncobj
    import pysyncobj.tcp_connection
    check_version()
    for module in (pysyncobj.syncobj, pysyncobj.serializer, pysyncobj.tcp_connection):
        module.pickle = codec
    pysyncobj.syncobj.createJournal = create_journal
    pysyncobj.syncobj.createPoller = create_poller
