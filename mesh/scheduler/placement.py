"""Placement: choose where one replica of a model runs, or say in words why it cannot.

A pure function of the replicated state (through `ClusterIndex`), so every decision can be
unit-tested, explained, and repeated by a new leader. Plans are tried simplest first; the
first that fits wins, and the reason it gives names the simpler plans that did not fit:

1. pinned GPUs (the deployment names them): those, or nothing;
2. one GPU, then k GPUs of one node (tensor parallel; k = the engine's sizes, fewest first);
3. the node's RAM, for engines that run on the CPU;
4. several nodes, through the engine's own mechanism (llama.cpp RPC servers with layers
   split by free memory, vLLM pipeline stages over Ray with tensor parallel inside each).

Among candidates of one plan, a node without a replica of this model beats one with
(replicas spread across nodes when they can), then the policy decides: `binpack` takes the
tightest fit (keeps large devices whole for large models), `spread` the roomiest. Remaining
ties break by node id and GPU index, never by the order records arrive in.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

from ..sizes import format_bytes
from .capacity import MAX_GPUS_PER_NODE, Booking, ClusterIndex, GpuSlot, NodeSlot
from .explain import count_words, describe_unschedulable, gpu_words
from .requirement import Requirement

__all__ = ["Placement", "Scheduler", "Unschedulable"]

# Once a candidate on a node that already runs a replica is found, look this many entries
# further for one on a fresh node: bounds a decision when every fitting node has replicas.
_WALK_AFTER_DEFERRED = 256
_MAX_NODES_PER_REPLICA = 16


@dataclass(frozen=True)
class Placement:
    """Where one instance runs. The instance's node is the head; other nodes are workers."""

    node_id: str
    device: str                             # "gpu" or "cpu" on the head node
    memory_bytes: int                       # per GPU of gpu_indices (or RAM) on the head node
    gpu_vendor: str | None = None
    gpu_indices: tuple[int, ...] = ()
    bookings: tuple[Booking, ...] = ()      # every device it holds, head and workers
    mechanism: str | None = None            # None, "tensor-parallel", "llama.cpp-rpc", "ray-pipeline"
    pipeline_parallel: int = 1
    # llama.cpp RPC: per booking (same order), the bytes of weights + KV cache it holds; the
    # head passes them to llama.cpp as the layer split (`--tensor-split`, `-ngl`)
    split_bytes: tuple[int, ...] = ()
    reason: str = field(default="", compare=False)      # policy: where; why not simpler
    where: str = field(default="", compare=False)       # the chosen devices, in words
    notes: tuple[str, ...] = field(default=(), compare=False)   # simpler plans that failed

    def __post_init__(self) -> None:
        if not self.bookings:
            own = ([Booking(self.node_id, "gpu", i, self.memory_bytes) for i in self.gpu_indices]
                   if self.device == "gpu" else [Booking(self.node_id, "cpu", None, self.memory_bytes)])
            object.__setattr__(self, "bookings", tuple(own))

    def allocation(self) -> dict[str, Any]:
        """What the instance record keeps: the head's devices for its engine, every booking
        for the memory accounting, and per worker node what it runs for this instance."""
        return {"device": self.device, "memory_bytes": self.memory_bytes,
                "gpu_vendor": self.gpu_vendor, "gpu_indices": list(self.gpu_indices),
                "tensor_parallel": max(1, len(self.gpu_indices)),
                "pipeline_parallel": self.pipeline_parallel, "mechanism": self.mechanism,
                "bookings": [b.to_dict() for b in self.bookings],
                "workers": self.workers(),
                **({"split_bytes": list(self.split_bytes)} if self.split_bytes else {})}

    def workers(self) -> list[dict[str, Any]]:
        """Per worker node: its devices and memory (llama.cpp rpc-server / Ray worker)."""
        by_node: dict[str, list[Booking]] = {}
        for b in self.bookings:
            if b.node_id != self.node_id:
                by_node.setdefault(b.node_id, []).append(b)
        return [{"node_id": node_id, "device": bs[0].device,
                 "gpu_indices": sorted(b.gpu_index for b in bs if b.gpu_index is not None),
                 "memory_bytes": [b.memory_bytes for b in bs]}
                for node_id, bs in sorted(by_node.items())]


@dataclass(frozen=True)
class Unschedulable:
    reason: str


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
        return _Decision(req, index).run()


def _by_id(records: Any) -> Mapping[str, Mapping[str, Any]]:
    if isinstance(records, Mapping):
        return records
    return {r["id"]: r for r in records}


_Ranked = tuple[tuple, Placement]


class _Decision:
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
                found = self._across_nodes()
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

    def _entries(self, sorted_keys: Any, need: int) -> Iterator[tuple]:
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
            self._entries(self.index.gpu_free[v], need), build))
        if plan is None:
            if (note := self._largest_gpu_note(need)) is not None:
                self.notes.append(note)
            return None
        gpu = self.index.gpu(plan.node_id, plan.gpu_indices[0])
        where = f"GPU {gpu.index} ({gpu.name}) on {self._name(plan.node_id)}"
        return self._with_reason(plan, f"{where}: {format_bytes(gpu.free)} free, "
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

            return self._first_fit(self._entries(self.index.kth_free[(vendor, k)], per_gpu), build)

        plan = self._best_of_vendors(per_vendor)
        if plan is None:
            if k == 2 or self.req.gpus_per_replica == k:
                self.notes.append(self._best_k_note(k, per_gpu))
            return None
        indices = ", ".join(map(str, plan.gpu_indices))
        return self._with_reason(plan, f"{gpu_words(k)} on {self._name(plan.node_id)} (GPUs "
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

        ranked = self._first_fit(self._entries(self.index.ram_free, need),
                                 build)
        if ranked is None:
            self.notes.append(self._largest_ram_note(need))
            return None
        plan = ranked[1]
        node = self.index.nodes[plan.node_id]
        return self._with_reason(plan, f"the CPU of {node.name}: {format_bytes(node.ram_free)} "
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
        return self._with_reason(plan, f"pinned to GPU {', '.join(map(str, plan.gpu_indices))} "
                                       f"on {node.name}, {format_bytes(per_gpu)} each")

    # --- several nodes ---------------------------------------------------------------------------

    def _across_nodes(self) -> Placement | None:
        mechanism = self.req.engine.multi_node
        plan = None
        if mechanism == "ray-pipeline" and self.req.device != "cpu":
            plan = self._pipeline_stages()
        elif mechanism == "llama.cpp-rpc":
            if self.req.device != "cpu" and self.vendors():
                plan = self._split_by_free_memory("gpu")
            if plan is None and self.req.device != "gpu":
                plan = self._split_by_free_memory("cpu")
        return plan

    def _pipeline_stages(self) -> Placement | None:
        """vLLM over Ray: pp nodes × tp GPUs each, equal layers per stage, one vendor."""
        ready = self.index.ready_count()
        sizes = self.req.engine.tensor_parallel_sizes or (1, 2, 4, 8)
        shapes = sorted(((pp, tp) for pp in range(2, min(ready, _MAX_NODES_PER_REPLICA) + 1)
                         for tp in sizes), key=lambda s: (s[0] * s[1], s[0]))
        for pp, tp in shapes:
            per_gpu = self.req.need("gpu", 1 / (pp * tp))
            for vendor in self.vendors():
                stages = self._stage_nodes(vendor, pp, tp, per_gpu)
                if stages is not None:
                    return self._staged_plan(stages, vendor, per_gpu, pp, tp)
        self.notes.append(f"pipeline stages over Ray: no {_MAX_NODES_PER_REPLICA} or fewer "
                          f"ready nodes with equal GPU counts hold "
                          f"{format_bytes(self.req.split_bytes['gpu'])} of weights and KV cache")
        return None

    def _stage_nodes(self, vendor: str, pp: int, tp: int,
                     per_gpu: int) -> list[tuple[NodeSlot, list[GpuSlot]]] | None:
        fresh: list[tuple[NodeSlot, list[GpuSlot]]] = []
        reused: list[tuple[NodeSlot, list[GpuSlot]]] = []
        entries = self._entries(self.index.kth_free[(vendor, tp)], per_gpu)
        for key in entries:
            node = self.index.nodes[key[1]]
            gpus = self.usable_gpus(node, vendor, per_gpu)
            if len(gpus) < tp:
                continue
            target = reused if self.index.replicas_on(self.req.model, node.id) else fresh
            target.append((node, gpus[:tp]))
            if len(fresh) >= pp:
                break
        chosen = (fresh + reused)[:pp]
        return chosen if len(chosen) == pp else None

    def _staged_plan(self, stages: list[tuple[NodeSlot, list[GpuSlot]]], vendor: str,
                     per_gpu: int, pp: int, tp: int) -> Placement:
        bookings = tuple(Booking(node.id, "gpu", g.index, per_gpu)
                         for node, gpus in stages for g in sorted(gpus, key=lambda g: g.index))
        head, head_gpus = stages[0]
        plan = Placement(head.id, "gpu", per_gpu, vendor, tuple(sorted(g.index for g in head_gpus)),
                         bookings=bookings, mechanism="ray-pipeline", pipeline_parallel=pp)
        names = ", ".join(node.name for node, _ in stages)
        return self._with_reason(plan, f"{count_words(pp)} pipeline stages over Ray on {names}, "
                                       f"{gpu_words(tp)} each (tensor parallel {tp}), "
                                       f"{format_bytes(per_gpu)} per GPU")

    def _split_by_free_memory(self, device: str) -> Placement | None:
        """llama.cpp RPC: the roomiest node that can run the server (a llama-server with an
        RPC client) is the head; then take the devices of the roomiest nodes that run an
        rpc-server until their free memory (less what each device holds whole) covers the
        weights and KV cache; split layers in proportion, so every device fills the same
        fraction of what it offers."""
        req = self.req
        split, fixed = req.split_bytes[device], req.fixed_bytes[device]
        head: list[tuple[NodeSlot, GpuSlot | None, int]] = []
        workers: list[list[tuple[NodeSlot, GpuSlot | None, int]]] = []
        total = 0
        for node in self._roomiest_nodes(device):
            if head and (total >= split or len(workers) + 1 >= _MAX_NODES_PER_REPLICA):
                break
            can_head, can_work = node.rpc_roles(req.backend)
            if not (can_head and not head) and not (can_work and len(workers) + 1 < _MAX_NODES_PER_REPLICA):
                continue                  # nothing this node could do for the plan
            devices = self._offers(node, device, fixed)
            if not devices:
                continue
            if can_head and not head:
                head = devices
            else:
                workers.append(devices)
            total += sum(offer for _, _, offer in devices)
        if not head or not workers or total < split:
            self.notes.append(self._rpc_note(device, head, workers, total, split))
            return None
        offers = head + [d for devices in workers for d in devices]
        fraction = split / total
        shares = tuple(math.ceil(fraction * offer) for _, _, offer in offers)
        bookings = tuple(Booking(node.id, device, gpu.index if gpu else None, share + fixed)
                         for (node, gpu, _), share in zip(offers, shares))
        head_node, head_gpu = offers[0][0], offers[0][1]
        head_books = [b for b in bookings if b.node_id == head_node.id]
        nodes_used = 1 + len(workers)
        plan = Placement(head_node.id, device, max(b.memory_bytes for b in head_books),
                         head_gpu.vendor if head_gpu else None,
                         tuple(b.gpu_index for b in head_books if b.gpu_index is not None),
                         bookings=bookings, mechanism="llama.cpp-rpc",
                         pipeline_parallel=nodes_used, split_bytes=shares)
        per_node = ", ".join(f"{self._name(node_id)} {format_bytes(size)}"
                             for node_id, size in _per_node(bookings))
        return self._with_reason(plan, f"split over {count_words(nodes_used)} nodes with "
                                       f"llama.cpp RPC servers, layers in proportion to free "
                                       f"memory ({per_node}); {head_node.name} runs the "
                                       f"server, the others rpc-servers")

    def _offers(self, node: NodeSlot, device: str,
                fixed: int) -> list[tuple[NodeSlot, GpuSlot | None, int]]:
        """What each of a node's devices offers to a split: free memory less what every
        device holds whole (the engine process, compute buffers)."""
        if not self.node_ok(node):
            return []
        if device == "cpu":
            found = [(None, node.ram_free - fixed)] if node.backend_runs_on_cpu(self.req.backend) else []
        else:
            found = [(g, g.free - fixed) for g in sorted(node.gpus.values(), key=lambda g: g.index)
                     if self.gpu_ok(node, g)]
        return [(node, g, offer) for g, offer in found if offer > 0]

    def _rpc_note(self, device: str, head: list, workers: list, total: int, split: int) -> str:
        what = "GPUs" if device == "gpu" else "RAM"
        if not head:
            return ("llama.cpp RPC: no ready node with room has a llama-server built with RPC "
                    "to hold the workers (GPUMESH_LLAMA_SERVER)")
        if not workers:
            return (f"llama.cpp RPC: no other ready node with free {what} runs llama.cpp's "
                    f"rpc-server (GPUMESH_LLAMA_RPC_SERVER)")
        return (f"llama.cpp RPC over the {what} of up to {_MAX_NODES_PER_REPLICA} nodes: "
                f"together they have {format_bytes(max(total, 0))} for the "
                f"{format_bytes(split)} of weights and KV cache")

    def _roomiest_nodes(self, device: str) -> Iterator[NodeSlot]:
        if device == "cpu":
            for key in self.index.ram_free.descending():
                yield self.index.nodes[key[1]]
            return
        lists = [self.index.sum_free[v].descending() for v in self.vendors()]
        seen: set[str] = set()
        for key in heapq.merge(*lists, key=lambda k: (-k[0], k[1])):
            if key[1] not in seen:
                seen.add(key[1])
                yield self.index.nodes[key[1]]

    # --- words -----------------------------------------------------------------------------------

    def _with_reason(self, plan: Placement, where: str) -> Placement:
        replicas = self.index.replicas_on(self.req.model, plan.node_id)
        parts = [f"{self.req.policy}: {where}"]
        if replicas:
            parts.append(f"{self._name(plan.node_id)} already runs {replicas} replica(s) of "
                         f"{self.req.model}: no other node fits")
        reason = "; ".join(parts + self.notes)
        return dataclasses.replace(plan, reason=reason, where=where, notes=tuple(self.notes))

    def _policy_words(self) -> str:
        return "the tightest fit" if self.binpack else "the most room"

    def _name(self, node_id: str) -> str:
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


def _per_node(bookings: tuple[Booking, ...]) -> list[tuple[str, int]]:
    totals: dict[str, int] = {}
    for b in bookings:
        totals[b.node_id] = totals.get(b.node_id, 0) + b.memory_bytes
    return list(totals.items())


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
