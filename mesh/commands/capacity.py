"""The capacity invariant `create_instance` keeps: no device is promised more memory than it has.

The scheduler (`mesh/scheduler/`) chooses placements from a view of the state, but two
leaders during a term change, or a reconciler pass racing another write, can both decide
from the same view. This check runs inside `apply_command`, in log order, so whichever
placement commits second is refused if the first already took the bytes.

It reads the scheduler's fields (`scheduler/capacity.py`, `bookings_of`): an instance holds
memory on devices — each GPU it uses, or a node's RAM — listed in `allocation.bookings`
(`node_id`, `device`, `gpu_index`, `memory_bytes`; several nodes for a multi-node plan), or,
in records without bookings, `allocation.memory_bytes` on each of `allocation.gpu_indices`
(or in RAM) of its own node. A device's capacity is its node's `inventory`
(`gpus[].memory_total_bytes` × `gpu_memory_fraction`, `memory_total_bytes` −
`reserved_memory_bytes`); the scheduler's two reserves are its own settings, so the
reconciler sends them as the command's `limits` (without them: raw capacity). Bookings,
not measured use: the invariant must not depend on a probe's last reading. An instance
without an allocation claims nothing; a node without an inventory is not checked.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping

from .common import CommandError

__all__ = ["check_fits"]


def check_fits(nodes: Mapping[str, dict[str, Any]], instance: dict[str, Any],
               others: Iterable[dict[str, Any]], limits: dict[str, Any] | None) -> None:
    """Raise CommandError("no_capacity") if `instance` does not fit beside `others`."""
    wanted = _bookings(instance)
    if not wanted:
        return
    booked: Counter = Counter()
    for other in others:
        for key, size in _bookings(other):
            booked[key] += size
    asked: Counter = Counter()
    for key, size in wanted:
        asked[key] += size
    limits = limits or {}
    for (node_id, gpu_index), size in asked.items():
        node = nodes.get(node_id)
        if node is None:
            raise CommandError("node_not_found", f"no node {node_id!r}")
        inventory = node.get("inventory")
        if not inventory:
            continue
        usable, device = _usable(node, inventory, gpu_index, limits)
        free = usable - booked[(node_id, gpu_index)]
        if size > free:
            raise CommandError(
                "no_capacity", f"{device} has {max(free, 0)} bytes left for instances, "
                f"{instance['id']} needs {size}")


def _bookings(instance: Mapping[str, Any]) -> list[tuple[tuple[str, int | None], int]]:
    """[((node_id, GPU index or None for RAM), bytes)] — the scheduler's `bookings_of`."""
    allocation = instance.get("allocation") or {}
    listed = allocation.get("bookings")
    if listed is not None:
        return [((b["node_id"], int(b["gpu_index"]) if b["device"] == "gpu" else None),
                 int(b["memory_bytes"])) for b in listed]
    if not allocation:
        return []
    size = int(allocation.get("memory_bytes", 0))
    if allocation.get("device") == "gpu":
        return [((instance["node_id"], int(i)), size) for i in allocation.get("gpu_indices", ())]
    return [((instance["node_id"], None), size)]


def _usable(node: dict[str, Any], inventory: dict[str, Any], gpu_index: int | None,
            limits: dict[str, Any]) -> tuple[int, str]:
    if gpu_index is None:
        reserved = int(limits.get("reserved_memory_bytes", 0))
        return int(inventory["memory_total_bytes"]) - reserved, f"the RAM of node {node['id']}"
    for gpu in inventory.get("gpus", []):
        if gpu["index"] == gpu_index:
            fraction = float(limits.get("gpu_memory_fraction", 1.0))
            return int(gpu["memory_total_bytes"] * fraction), \
                f"GPU {gpu_index} of node {node['id']}"
    raise CommandError("no_capacity", f"node {node['id']} has no GPU {gpu_index}")
