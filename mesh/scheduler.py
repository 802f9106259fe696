"""Scheduler: choose where one instance of a model runs, or say in words why it can't.

Pure functions of the replicated state, so every decision can be unit-tested and explained:

* A model carries its memory estimate (`model["estimate"]["total_bytes"]`, from
  `modelfiles.estimate_memory` at deploy time) and its backend's name (`model["backend"]`).
* A node carries its inventory (`node["inventory"]`: cores, memory, GPUs) and what its own
  installation of each backend can do (`node["backends"][name]`: `runs_on_cpu`,
  `gpu_vendors`), because builds differ between machines (a CPU-only llama.cpp wheel on a
  GPU node must not be handed the GPU).
* Memory already promised to instances is the sum of their `allocation`; what a device can
  still take is its capacity, less that, less a reserve (RAM: `reserved_memory_bytes`; VRAM:
  `1 - gpu_memory_fraction`), so two instances never count on the same bytes.

Policy: a GPU that can hold the whole model beats the CPU (GPUs are what users bought);
among candidates the one with the fewest replicas of this model wins (spread, so losing a
node loses one replica), then the one with the most free memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

__all__ = ["Placement", "Scheduler", "Unschedulable", "format_bytes"]


@dataclass(frozen=True)
class Placement:
    node_id: str
    device: str                      # "gpu" or "cpu"
    memory_bytes: int
    gpu_vendor: str | None = None
    gpu_indices: tuple[int, ...] = ()

    def allocation(self) -> dict[str, Any]:
        """What the instance record keeps, so later placements count these bytes as taken."""
        return {"device": self.device, "memory_bytes": self.memory_bytes,
                "gpu_vendor": self.gpu_vendor, "gpu_indices": list(self.gpu_indices)}


@dataclass(frozen=True)
class Unschedulable:
    reason: str


@dataclass
class _Candidate:
    placement: Placement
    replicas_here: int
    free_bytes: int
    rank: int = field(default=0)    # 0: GPU, 1: CPU


class Scheduler:
    def __init__(self, reserved_memory_bytes: int = 1 << 30, gpu_memory_fraction: float = 0.9):
        self.reserved_memory_bytes = reserved_memory_bytes
        self.gpu_memory_fraction = gpu_memory_fraction

    def place(self, model: dict[str, Any], nodes: Iterable[dict[str, Any]],
              instances: Iterable[dict[str, Any]]) -> Placement | Unschedulable:
        """One placement for one more instance of `model`, given the current nodes and instances."""
        needed = int(model["estimate"]["total_bytes"])
        instances = list(instances)
        candidates: list[_Candidate] = []
        refusals: list[str] = []
        for node in sorted(nodes, key=lambda n: n["id"]):
            found, why = self._candidates_on(node, model, needed, instances)
            candidates.extend(found)
            if not found:
                refusals.append(f"node {node.get('name', node['id'])}: {why}")
        if not candidates:
            if not refusals:
                return Unschedulable("no nodes have joined the cluster")
            return Unschedulable(f"no node can run {model['name']} "
                                 f"(needs {format_bytes(needed)}): " + "; ".join(refusals))
        best = min(candidates, key=lambda c: (c.rank, c.replicas_here, -c.free_bytes,
                                              c.placement.node_id, c.placement.gpu_indices))
        return best.placement

    def _candidates_on(self, node: dict[str, Any], model: dict[str, Any], needed: int,
                       instances: list[dict[str, Any]]) -> tuple[list[_Candidate], str]:
        if node.get("status") != "ready":
            return [], f"node is {node.get('status', 'unknown')}"
        if node.get("draining"):
            return [], "node is draining"
        backend = model["backend"]
        traits = node.get("backends", {}).get(backend)
        if traits is None:
            return [], f"backend {backend} is not available there"
        here = [i for i in instances if i["node_id"] == node["id"]]
        replicas_here = sum(1 for i in here if i["model"] == model["name"])
        found: list[_Candidate] = []
        reasons: list[str] = []
        for gpu in node["inventory"].get("gpus", []):
            if gpu["vendor"] not in traits["gpu_vendors"]:
                reasons.append(f"{backend} cannot use {gpu['vendor']} GPUs")
                continue
            free = self._gpu_free(gpu, here)
            if free >= needed:
                found.append(_Candidate(
                    Placement(node["id"], "gpu", needed, gpu["vendor"], (gpu["index"],)),
                    replicas_here, free, rank=0))
            else:
                reasons.append(f"GPU {gpu['index']} has {format_bytes(max(free, 0))} free")
        if traits["runs_on_cpu"]:
            free = self._ram_free(node["inventory"], here)
            if free >= needed:
                found.append(_Candidate(Placement(node["id"], "cpu", needed), replicas_here,
                                        free, rank=1))
            else:
                reasons.append(f"{format_bytes(max(free, 0))} RAM free for models")
        elif not node["inventory"].get("gpus"):
            reasons.append(f"it has no GPU and {backend} needs one")
        return found, "; ".join(dict.fromkeys(reasons)) or "no usable device"

    def _gpu_free(self, gpu: dict[str, Any], here: list[dict[str, Any]]) -> int:
        taken = sum(i["allocation"]["memory_bytes"] for i in here
                    if i["allocation"]["device"] == "gpu"
                    and gpu["index"] in i["allocation"]["gpu_indices"])
        return int(gpu["memory_total_bytes"] * self.gpu_memory_fraction) - taken

    def _ram_free(self, inventory: dict[str, Any], here: list[dict[str, Any]]) -> int:
        taken = sum(i["allocation"]["memory_bytes"] for i in here
                    if i["allocation"]["device"] == "cpu")
        return inventory["memory_total_bytes"] - self.reserved_memory_bytes - taken


def format_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'; words for people, exact numbers stay in the API."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
