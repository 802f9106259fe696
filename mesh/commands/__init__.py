"""Replicated commands: plain-data records and the deterministic function that applies them.

Every change to the cluster state is one command, a msgpack-able dict `{"op": ..., ...}`.
`apply_command` runs on every node in the same order (Raft), so it must be deterministic:
no clocks, no randomness, no I/O. Timestamps and ids are chosen by whoever *submits* the
command and travel inside it.

The state is a dict of collections (`nodes`, `models`, `instances`, `api_keys`,
`join_tokens`, `users`, `usage`, `rates`, `engine_architectures`), each a dict from id to record (`usage` nests one
level: by hour). Records are never mutated in place: a command builds new records and a
new collection dict, and the caller swaps the top-level reference. Readers on other threads
therefore always see a consistent, immutable snapshot without taking a lock.

Conditions (compare-and-set) live here too, so that a retried or raced command is harmless:
creating a model that exists fails, updating an instance that was deleted fails, an agent can
only update instances assigned to its own node, an instance is created only while its model
lacks replicas and its allocation fits what its node has left (so two leaders during a term
change cannot overcommit). Every submitted command carries a request id and applies at most
once (`requests.py`).
"""

from __future__ import annotations

from typing import Any

from . import activity, engines, instances, join_tokens, keys, models, nodes, usage, users
from .common import CommandError, Handler, Result, State
from .instances import INSTANCE_STATES
from .requests import recall, remember

__all__ = ["COLLECTIONS", "INSTANCE_STATES", "CommandError", "State", "apply_command",
           "empty_state"]

COLLECTIONS = ("nodes", "models", "instances", "api_keys", "join_tokens", "users", "usage",
               "rates", "engine_architectures")


def empty_state() -> State:
    return {name: {} for name in COLLECTIONS}


def apply_command(state: State, command: dict[str, Any]) -> tuple[State, Result]:
    """Apply one command; return the new state (old one untouched) and a result for the submitter.

    A command whose request id (`"rid"`) was seen before is not applied again: it gets the
    result it got the first time (`requests.py`)."""
    if (earlier := recall(state, command)) is not None:
        return state, earlier
    new_state, result = _apply(state, command)
    return remember(new_state, command, result), result


def _apply(state: State, command: dict[str, Any]) -> tuple[State, Result]:
    op = command.get("op", "")
    handler = HANDLERS.get(op) if isinstance(op, str) else None   # a list op is unhashable
    if handler is None:
        return state, {"error": f"unknown command {command.get('op')!r}", "code": "bad_command"}
    try:
        changes, result = handler(state, command)
    except CommandError as exc:
        return state, {"error": str(exc), "code": exc.code}
    except (KeyError, TypeError, ValueError) as exc:
        # A malformed command must not stop the state machine on every node.
        return state, {"error": f"malformed {command.get('op')} command: {exc!r}",
                       "code": "bad_command"}
    new_state = dict(state)
    new_state.update(changes)
    return new_state, result


# One table of every command, assembled from the modules that own each collection.
HANDLERS: dict[str, Handler] = {**nodes.HANDLERS, **models.HANDLERS, **instances.HANDLERS,
                                **keys.HANDLERS, **join_tokens.HANDLERS, **users.HANDLERS,
                                **usage.HANDLERS, **activity.HANDLERS, **engines.HANDLERS}
