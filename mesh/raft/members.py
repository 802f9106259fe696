"""The member list gpumesh keeps beside the journal, so a plain restart rejoins whole.

pysyncobj learns membership from its constructor, from MEMBERSHIP log entries and from
snapshots, but a node restarted with a partial list can form a split cluster
(../RAFT-NOTES.md §1: a joiner restarted with `[]` led its own cluster and committed a
divergent entry). So every node records the full member list it has seen *committed*, and
starts from it: a founder, a joiner and a restarted node all start with every member.

File: `<journal>.members`, JSON `{"self": "host:port", "members": [...], "updated": t}`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .durable import write_atomically
from .errors import StartupRefused

__all__ = ["MemberFile", "MemberRecord"]


@dataclass(frozen=True)
class MemberRecord:
    self_address: str
    members: tuple[str, ...]     # sorted, this node included


class MemberFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> MemberRecord | None:
        """The recorded list, or None if this node never recorded one (a fresh data dir)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
            record = MemberRecord(str(data["self"]), tuple(sorted(str(m) for m in data["members"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise StartupRefused(
                f"the Raft member list at {self.path} is damaged ({exc}); it says which nodes "
                f"form the cluster. Remove the node's raft/ folder and join the cluster "
                f"again with a fresh token") from None
        return record

    def save(self, self_address: str, members: set[str] | tuple[str, ...]) -> None:
        data = {"self": self_address, "members": sorted(set(members) | {self_address}),
                "updated": time.time()}
        write_atomically(self.path, (json.dumps(data) + "\n").encode())
