"""Placement: choose where one replica of a model runs, or say in words why it cannot.

A pure function of the replicated state (through `ClusterIndex`), so every decision can be
unit-tested, explained, and repeated by a new leader. Plans are tried simplest first; the
first that fits wins, and the reason it gives names the simpler plans that did not fit:

1. pinned GPUs (the deployment names them): those, or nothing;
2. one GPU, then k GPUs of one node (tensor parallel; k = the engine's sizes, fewest first);
3. the node's RAM, for engines that run on the CPU;
4. several nodes, through the engine's own mechanism (`multinode`: llama.cpp RPC servers
   with layers split by free memory, vLLM pipeline stages over Ray with tensor parallel
   inside each).

Among candidates of one plan, a node without a replica of this model beats one with
(replicas spread across nodes when they can), then the policy decides: `binpack` takes the
tightest fit (keeps large devices whole for large models), `spread` the roomiest. Remaining
ties break by node id and GPU index, never by the order records arrive in.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Mapping

from ..sizes import format_bytes
from .capacity import MAX_GPUS_PER_NODE, ClusterIndex, GpuSlot, NodeSlot
from .explain import describe_unschedulable, gpu_words
from .multinode import across_nodes
from .plan import Placement, Unschedulable
from .requirement import Requirement

__all__ = ["Decision", "Scheduler"]

# Once a candidate on a node that already runs a replica is found, look this many entries
# further for one on a fresh node: bounds a decision when every fitting node has replicas.
_WALK_AFTER_DEFERRED = 256


class Scheduler:
    def __init__(self, reserved_memory_bytes: int = 1 << 30, gpu_memory_fraction: float = 0.9):
        self.reserved_memory_bytes = reserved_memory_bytes
        self.gpu_memory_fraction = gpu_memory_fraction

    def new_index(self) -> ClusterIndex:
        return ClusterIndex(reserved_memory_bytes=self.reserved_memory_bytes,
                            gpu_memory_fraction=self.gpu_memory_fraction)

    def index_of(self, nodes: Iterable[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]],
                 instances: Iterable[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]]
                 ) -> ClusterIndex:
        index = self.new_index()
        index.sync(_by_id(nodes), _by_id(instances))
        return index

    def place(self, model: Mapping[str, Any], nodes: Any, instances: Any) -> Placement | Unschedulable:
        """One placement for one more instance of `model` (builds an index: for tests and
        one-off questions; the reconciler keeps one index and calls `place_in`)."""
        return self.place_in(model, self.index_of(nodes, instances))

    def place_in(self, model: Mapping[str, Any], index: ClusterIndex, *,
                 multi_node: bool = True) -> Placement | Unschedulable:
        """`multi_node=False`: single-node plans only (tried before evicting anything)."""
        req = Requirement.of(model)
        if not multi_node:
            req.multi_node = False
        return Decision(req, index).run()


def _by_id(records: Any) -> Mapping[str, Mapping[str, Any]]:
    if isinstance(records, Mapping):
        return records
    return {r["id"]: r for r in records}


_Ranked = tuple[tuple, Placement]


class Decision:
    """One placement decision: the plans, tried in order, and the notes on those that failed."""

    def __init__(self, req: Requirement, index: ClusterIndex) -> None:
        self.req = req
        self.index = index
        self.notes: list[str] = []
        self._node_ok: dict[str, bool] = {}
        self.binpack = req.policy != "spread"

    def run(self) -> Placement | Unschedulable:
        req = self.req
        if req.pinned:
            return self._pinned()
        if req.device != "cpu":
            for k in req.gpu_counts(self._most_gpus_on_a_node()):
                found = self._one_gpu() if k == 1 else self._gpus_on_one_node(k)
                if found is not None:
                    return found
        if req.device != "gpu":
            found = self._ram()
            if found is not None:
                return found
        if req.multi_node and self.index.ready_count() > 1:
            if req.engine.multi_node and req.gpus_per_replica in (None, 1):
                found = across_nodes(self)
                if found is not None:
                    return found
            elif not req.engine.multi_node:
                self.notes.append(f"{req.backend} cannot split one replica over several nodes")
        return Unschedulable(describe_unschedulable(req, self.index, self.notes))

    # --- filters -------------------------------------------------------------------------------

    def vendors(self) -> list[str]:
        """GPU vendors this engine drives on some ready node: the only lists worth walking."""
        return self.index.vendors(self.req.backend)

    def node_ok(self, node: NodeSlot) -> bool:
        ok = self._node_ok.get(node.id)
        if ok is None:
            ok = self._node_ok[node.id] = self.req.node_matches(node.label_view())
        return ok

    def gpu_ok(self, node: NodeSlot, gpu: GpuSlot) -> bool:
        return (gpu.vendor in node.backend_vendors(self.req.backend) and self.node_ok(node)
                and (not self.req.gpu_selector or self.req.gpu_matches(node.gpu_label_view(gpu))))

    def usable_gpus(self, node: NodeSlot, vendor: str, per_gpu: int) -> list[GpuSlot]:
        """The node's GPUs of `vendor` that may take `per_gpu`, in policy order."""
        gpus = [g for g in node.gpus.values()
                if g.vendor == vendor and g.free >= per_gpu and self.gpu_ok(node, g)]
        gpus.sort(key=(lambda g: (g.free, g.index)) if self.binpack else (lambda g: (-g.free, g.index)))
        return gpus

    # --- walking the index ---------------------------------------------------------------------

    def entries(self, sorted_keys: Any, need: int) -> Iterator[tuple]:
        """Index entries that fit `need`, in policy order (keys start with free bytes)."""
        if self.binpack:
            yield from sorted_keys.from_key((need,))
            return
        for key in sorted_keys.descending():
            if key[0] < need:
                return
            yield key

    def _first_fit(self, entries: Iterable[tuple], build: Callable[[tuple], Placement | None]
                   ) -> _Ranked | None:
        """The first candidate on a node without a replica; else the one with fewest."""
        deferred: _Ranked | None = None
        walked = 0
        for key in entries:
            if deferred is not None:
                walked += 1
                if walked > _WALK_AFTER_DEFERRED:
                    break
            plan = build(key)
            if plan is None:
                continue
            replicas = self.index.replicas_on(self.req.model, plan.node_id)
            if replicas == 0:
                return (0, key), plan
            if deferred is None or replicas < deferred[0][0]:
                deferred = ((replicas, key), plan)
        return deferred

    def _best_of_vendors(self, per_vendor: Callable[[str], _Ranked | None]) -> Placement | None:
        found = [r for r in map(per_vendor, self.vendors()) if r is not None]
        if not found:
            return None
        return min(found, key=lambda r: r[0])[1]

    # --- plans -----------------------------------------------------------------------------

    def _one_gpu(self) -> Placement | None:
        need = self.req.need("gpu")

        def build(key: tuple) -> Placement | None:
            node = self.index.nodes[key[1]]
            gpu = node.gpus[key[2]]
            if not self.gpu_ok(node, gpu):
                return None
            return Placement(node.id, "gpu", need, gpu.vendor, (gpu.index,))

        plan = self._best_of_vendors(lambda v: self._first_fit(
            self.entries(self.index.gpu_free[v], need), build))
        if plan is None:
            if (note := self._largest_gpu_note(need)) is not None:
                self.notes.append(note)
            return None
        gpu = self.index.gpu(plan.node_id, plan.gpu_indices[0])
        where = f"GPU {gpu.index} ({gpu.name}) on {self.name_of(plan.node_id)}"
        return self.with_reason(plan, f"{where}: {format_bytes(gpu.free)} free, "
                                      f"{self._policy_words()} for {format_bytes(need)}")

    def _gpus_on_one_node(self, k: int) -> Placement | None:
        per_gpu = self.req.need("gpu", 1 / k)

        def per_vendor(vendor: str) -> _Ranked | None:
            def build(key: tuple) -> Placement | None:
                node = self.index.nodes[key[1]]
                gpus = self.usable_gpus(node, vendor, per_gpu)
                if len(gpus) < k:
                    return None
                return Placement(node.id, "gpu", per_gpu, vendor,
                                 tuple(sorted(g.index for g in gpus[:k])),
                                 mechanism="tensor-parallel")

            return self._first_fit(self.entries(self.index.kth_free[(vendor, k)], per_gpu), build)

        plan = self._best_of_vendors(per_vendor)
        if plan is None:
            if k == 2 or self.req.gpus_per_replica == k:
                self.notes.append(self._best_k_note(k, per_gpu))
            return None
        indices = ", ".join(map(str, plan.gpu_indices))
        return self.with_reason(plan, f"{gpu_words(k)} on {self.name_of(plan.node_id)} (GPUs "
                                      f"{indices}) fit with tensor parallel {k}, "
                                      f"{format_bytes(per_gpu)} each ({self._policy_words()})")

    def _ram(self) -> Placement | None:
        need = self.req.need("cpu")
        backend = self.req.backend

        def build(key: tuple) -> Placement | None:
            node = self.index.nodes[key[1]]
            if not (node.backend_runs_on_cpu(backend) and self.node_ok(node)):
                return None
            return Placement(node.id, "cpu", need)

        ranked = self._first_fit(self.entries(self.index.ram_free, need),
                                 build)
        if ranked is None:
            self.notes.append(self._largest_ram_note(need))
            return None
        plan = ranked[1]
        node = self.index.nodes[plan.node_id]
        return self.with_reason(plan, f"the CPU of {node.name}: {format_bytes(node.ram_free)} "
                                      f"RAM free, {self._policy_words()} for {format_bytes(need)}")

    def _pinned(self) -> Placement | Unschedulable:
        req = self.req
        resolved, problem = _resolve_pins(req.pinned, self.index)
        if problem:
            return Unschedulable(f"cannot place {req.model} on the GPUs it names: {problem}")
        node = self.index.nodes[resolved[0].node_id]
        per_gpu = req.need("gpu", 1 / len(resolved))
        short = [g for g in resolved if g.free < per_gpu]
        if not node.ready:
            return Unschedulable(f"cannot place {req.model}: its GPUs are on {node.name}, "
                                 f"which is {node.status}")
        refused = [g for g in resolved if g.vendor not in node.backend_vendors(req.backend)]
        if refused:
            return Unschedulable(f"cannot place {req.model}: {req.backend} on {node.name} cannot "
                                 f"use {refused[0].vendor} GPUs")
        if short:
            frees = "; ".join(f"GPU {g.index} has {format_bytes(max(g.free, 0))}" for g in short)
            return Unschedulable(f"cannot place {req.model} on its pinned GPUs: needs "
                                 f"{format_bytes(per_gpu)} on each, but on {node.name} {frees} free")
        plan = Placement(node.id, "gpu", per_gpu, resolved[0].vendor,
                         tuple(sorted(g.index for g in resolved)),
                         mechanism="tensor-parallel" if len(resolved) > 1 else None)
        return self.with_reason(plan, f"pinned to GPU {', '.join(map(str, plan.gpu_indices))} "
                                      f"on {node.name}, {format_bytes(per_gpu)} each")

    # --- words -----------------------------------------------------------------------------------

    def with_reason(self, plan: Placement, where: str) -> Placement:
        replicas = self.index.replicas_on(self.req.model, plan.node_id)
        parts = [f"{self.req.policy}: {where}"]
        if replicas:
            parts.append(f"{self.name_of(plan.node_id)} already runs {replicas} replica(s) of "
                         f"{self.req.model}: no other node fits")
        reason = "; ".join(parts + self.notes)
        return dataclasses.replace(plan, reason=reason, where=where, notes=tuple(self.notes))

    def _policy_words(self) -> str:
        return "the tightest fit" if self.binpack else "the most room"

    def name_of(self, node_id: str) -> str:
        node = self.index.nodes.get(node_id)
        return node.name if node else node_id

    def _most_gpus_on_a_node(self) -> int:
        most = 0
        for vendor in self.vendors():
            for k in range(MAX_GPUS_PER_NODE, most, -1):
                if len(self.index.kth_free[(vendor, k)]):
                    most = k
                    break
        return max(most, 1)

    def _largest_gpu_note(self, need: int) -> str | None:
        best: tuple[int, NodeSlot, GpuSlot] | None = None
        for vendor in self.vendors():
            for key in self.index.gpu_free[vendor].descending():
                node = self.index.nodes[key[1]]
                gpu = node.gpus[key[2]]
                if self.gpu_ok(node, gpu):
                    if best is None or gpu.free > best[0]:
                        best = (gpu.free, node, gpu)
                    break
        if best is None:
            if not self.index.vendors() and self.req.device != "gpu" and \
                    self.req.backend_runs_on_cpu_somewhere(self.index):
                return None        # a cluster without GPUs: the RAM note says it all
            return f"needs {format_bytes(need)}; no ready GPU that {self.req.backend} can use" + \
                   (" matches the selectors" if self.req.gpu_selector or self.req.node_selector else "")
        free, node, gpu = best
        return (f"needs {format_bytes(need)}; the largest free GPU has "
                f"{format_bytes(max(free, 0))} on {node.name} (GPU {gpu.index})")

    def _best_k_note(self, k: int, per_gpu: int) -> str:
        best: tuple[int, NodeSlot] | None = None
        for vendor in self.vendors():
            for key in self.index.kth_free[(vendor, k)].descending():
                node = self.index.nodes[key[1]]
                if self.node_ok(node) and vendor in node.backend_vendors(self.req.backend):
                    if best is None or key[0] > best[0]:
                        best = (key[0], node)
                    break
        if best is None:
            return f"no node has {gpu_words(k)} {self.req.backend} can use"
        return (f"{gpu_words(k)} on one node would need {format_bytes(per_gpu)} each; the best "
                f"has {format_bytes(max(best[0], 0))} each on {best[1].name}")

    def _largest_ram_note(self, need: int) -> str:
        needs = f"{format_bytes(need)} of RAM" if self.notes else f"needs {format_bytes(need)} of RAM"
        for key in self.index.ram_free.descending():
            node = self.index.nodes[key[1]]
            if node.backend_runs_on_cpu(self.req.backend) and self.node_ok(node):
                return f"{needs}: the most free is {format_bytes(max(node.ram_free, 0))} on {node.name}"
        return f"no ready node runs {self.req.backend} on its CPU"


def _resolve_pins(pins: tuple[str, ...], index: ClusterIndex) -> tuple[list[GpuSlot], str | None]:
    """GPUs named as NODE:INDEX (node name or id) or by UUID; all on one node."""
    found: list[GpuSlot] = []
    for pin in pins:
        gpu = _find_gpu(pin, index)
        if gpu is None:
            return [], f"no GPU {pin!r} in the cluster (name GPUs as NODE:INDEX or by UUID)"
        found.append(gpu)
    if len({g.node_id for g in found}) > 1:
        return [], "pinned GPUs must all be on one node"
    if len({(g.node_id, g.index) for g in found}) != len(found):
        return [], "a GPU is named twice"
    return found, None


def _find_gpu(pin: str, index: ClusterIndex) -> GpuSlot | None:
    node_part, _, gpu_part = pin.rpartition(":")
    for node in sorted(index.nodes.values(), key=lambda n: n.id):
        for gpu in node.gpus.values():
            if gpu.uuid and gpu.uuid == pin:
                return gpu
            if node_part in (node.id, node.name) and gpu_part == str(gpu.index):
                return gpu
    return None
