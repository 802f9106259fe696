"""What a node knows of its Raft group, as immutable values: `RaftStatus` (leader, term,
quorum, members) and one `PeerStatus` per other member. The tick thread publishes a new
`RaftStatus` after each tick; the asyncio side only reads them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PeerStatus", "RaftStatus"]


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
