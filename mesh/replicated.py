"""The replicated state itself: the pysyncobj consumer that applies commands
(`ReplicatedDocument`) and the read-only snapshot every reader gets (`StateView`).

`ReplicatedDocument._apply` is the one replicated method: it runs on the Raft thread, on
every node, in log order, and hands the decoded command to `commands.apply_command`.
`state.ClusterStore` owns the document and makes the views.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import msgpack
from pysyncobj import SyncObjConsumer, replicated

from .commands import State, apply_command, empty_state

__all__ = ["ReplicatedDocument", "StateView"]

_EMPTY: dict[str, Any] = {}


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

    @property
    def join_tokens(self) -> dict[str, dict[str, Any]]:
        return self._state.get("join_tokens", {})   # absent from snapshots made before it

    @property
    def users(self) -> dict[str, dict[str, Any]]:
        return self._state.get("users", _EMPTY)

    @property
    def usage(self) -> dict[str, dict[str, Any]]:
        """Metered usage by hour: {hour start (str): {row id: row}} (commands/usage.py)."""
        return self._state.get("usage", _EMPTY)

    @property
    def engine_architectures(self) -> dict[str, dict[str, Any]]:
        """"ENGINE==VERSION" -> the architectures that engine version serves (commands/engines.py)."""
        return self._state.get("engine_architectures", _EMPTY)

    @property
    def rates(self) -> dict[str, dict[str, Any]]:
        """Each node's last report of its limit counters (commands/usage.py)."""
        return self._state.get("rates", _EMPTY)


class ReplicatedDocument(SyncObjConsumer):
    """The replicated collections. pysyncobj snapshots every attribute set after __init__."""

    def __init__(self, on_applied: Callable[[], None]) -> None:
        self._on_applied = on_applied   # set before super().__init__: not part of snapshots
        super().__init__()
        self.state: State = empty_state()

    @replicated
    def _apply(self, payload: bytes) -> dict[str, Any]:
        # Runs on the Raft thread, on every node, in log order. A committed entry that
        # raised here would be retried on every tick forever, so bad bytes are a refusal.
        try:
            command = msgpack.unpackb(payload, raw=False)
        except Exception:  # noqa: BLE001 - msgpack raises several types for bad bytes
            command = None
        if not isinstance(command, dict):
            return {"error": "the command is not a msgpack map", "code": "bad_command"}
        self.state, result = apply_command(self.state, command)
        self._on_applied()
        return result

    def _deserialize(self, data: dict[str, Any]) -> None:
        # A snapshot was loaded (restart, or a follower catching up): readers must re-read.
        super()._deserialize(data)
        self._on_applied()
