"""Request ids: a command applies at most once, however often it is submitted.

Every command `ClusterStore.submit` sends carries a request id (`"rid"`). A write whose
answer was lost (a deadline, a leader change) may still commit, so a retry must be
harmless: the state keeps the results of the last `REMEMBERED` request ids, and a command
whose rid is among them is not applied again — its first result is returned instead.

The table lives in the replicated state (key `"requests"`, rid → result, oldest first), so
every node decides alike and it survives snapshots and restarts. A retry arrives within a
submit's deadline (seconds), long before 512 newer writes push its rid out.
"""

from __future__ import annotations

from typing import Any

from .common import Result, State

__all__ = ["REMEMBERED", "recall", "remember"]

REMEMBERED = 512


def recall(state: State, command: dict[str, Any]) -> Result | None:
    """The result this command's request id already got, or None if it is new (or has none)."""
    rid = command.get("rid")
    if not isinstance(rid, str):
        return None
    return state.get("requests", {}).get(rid)


def remember(state: State, command: dict[str, Any], result: Result) -> State:
    """A new state that remembers `result` under the command's rid (the state itself if none)."""
    rid = command.get("rid")
    if not isinstance(rid, str):
        return state
    requests = dict(state.get("requests", {}))
    requests[rid] = result
    while len(requests) > REMEMBERED:
        del requests[next(iter(requests))]      # dicts keep insertion order: oldest first
    new_state = dict(state)
    new_state["requests"] = requests
    return new_state
