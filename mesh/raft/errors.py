"""What the Raft layer tells its callers, as exception types.

`StateUnavailable` is the family "the cluster could not take this write (or start) now"; the
API answers its members with 503/504 and never shows pysyncobj's numeric codes.
"""

from __future__ import annotations

__all__ = ["StateUnavailable", "WriteOutcomeUnknown", "StorageFull", "NotLeader",
           "StartupRefused", "CommandRejected"]


class StateUnavailable(Exception):
    """The write was not committed: no leader, no quorum, or the deadline passed first.

    Raised as this class itself only when the write is known *not* to have been applied."""


class WriteOutcomeUnknown(StateUnavailable):
    """The write may or may not have been applied (its deadline passed after it was handed
    to the leader, or the leader changed under it). Re-reading the state tells; submitting
    the same command again with the same "rid" is always safe (it applies at most once)."""


class StorageFull(StateUnavailable):
    """This node cannot persist the Raft journal (the disk is full): writes are refused
    until space is freed. Reads and inference go on."""


class NotLeader(StateUnavailable):
    """The operation must run on the leader. `leader` is its Raft address, or None."""

    def __init__(self, message: str, leader: str | None) -> None:
        super().__init__(message)
        self.leader = leader


class StartupRefused(StateUnavailable):
    """The store will not start: a damaged or missing journal, a short cluster secret, a
    port it cannot bind. The message says what and where, for the operator."""


class CommandRejected(Exception):
    """The state machine refused the command (its condition failed); nothing changed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
