"""The capacity invariant `create_instance` keeps: no device is promised more memory than it has.

The scheduler (`mesh/scheduler.py`) chooses placements from a view of the state, but two
leaders during a term change, or a reconciler pass racing another write, can both decide
from the same view. This check runs inside `apply_command`, in log order, so whichever
placement commits second is refused if the first already took the bytes.

It reads the same fields as the scheduler: the node's `inventory` (`memory_total_bytes`,
`gpus[].index`, `gpus[].memory_total_bytes`) and each instance's `allocation` (`device`,
`memory_bytes`, `gpu_indices`), and counts an instance's bytes against every GPU it uses,
as the scheduler does. The scheduler's reserves (RAM left to the system, the share of VRAM
it never hands out) are its own settings, so a command may carry them as `limits`
(`reserved_memory_bytes`, `gpu_memory_fraction`); without them the check is against the raw
capacity. An instance without an allocation claims nothing; a node without an inventory
cannot be checked and is not.
"""

from __future__ import annotations

from typing import Any, Iterable

from .common import CommandError

__all__ = ["check_fits"]


def check_fits(node: dict[str, Any], instance: dict[str, Any],
               others: Iterable[dict[str, Any]], limits: dict[str, Any] | None) -> None:
    """Raise CommandError("no_capacity") if `instance` does not fit beside `others` on `node`."""
    allocation = instance.get("allocation")
    inventory = node.get("inventory")
    if not allocation or not inventory:
        return
    limits = limits or {}
    needed = int(allocation["memory_bytes"])
    here = [i for i in others if i.get("node_id") == node["id"] and i.get("allocation")]
    if allocation["device"] == "gpu":
        fraction = float(limits.get("gpu_memory_fraction", 1.0))
        gpus = {g["index"]: g for g in inventory.get("gpus", [])}
        for index in allocation["gpu_indices"]:
            if index not in gpus:
                raise CommandError("no_capacity", f"node {node['id']} has no GPU {index}")
            taken = sum(int(i["allocation"]["memory_bytes"]) for i in here
                        if i["allocation"]["device"] == "gpu"
                        and index in i["allocation"]["gpu_indices"])
            free = int(gpus[index]["memory_total_bytes"] * fraction) - taken
            if needed > free:
                raise CommandError(
                    "no_capacity", f"GPU {index} of node {node['id']} has {max(free, 0)} bytes "
                    f"left for instances, {instance['id']} needs {needed}")
    else:
        reserved = int(limits.get("reserved_memory_bytes", 0))
        taken = sum(int(i["allocation"]["memory_bytes"]) for i in here
                    if i["allocation"]["device"] == "cpu")
        free = int(inventory["memory_total_bytes"]) - reserved - taken
        if needed > free:
            raise CommandError(
                "no_capacity", f"node {node['id']} has {max(free, 0)} bytes of RAM left for "
                f"instances, {instance['id']} needs {needed}")
