"""What every device in the cluster can still take, indexed so a decision does not rescan.

A *device* is one GPU, or one node's RAM (where CPU engines run). Its free memory is the
probe's measurement and the cluster's bookings, whichever leaves less:

    usable = GPU: total × gpu_memory_fraction        RAM: total − reserved
    free   = min(usable − measured used, usable − booked)

so memory that another program fills is never promised (GPUStack counts bookings only:
#6044), and an instance that booked more than it uses yet still keeps its booking.

Bookings come from instance records (`bookings_of`). `ClusterIndex.sync(nodes, instances)`
follows the replicated state incrementally: records are copy-on-write, so an unchanged
record is the same object and costs one identity check; only changed nodes are re-indexed.
Ready nodes' devices sit in sorted lists (bisect), one per GPU vendor, per GPU count k
(the k-th largest free GPU of each node, for k GPUs on one node) and for RAM: binpack
looks up the tightest fit, spread walks from the roomiest, each in O(log n) plus a short
walk. Only vendors an engine drives somewhere are walked for it.
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

__all__ = ["Booking", "ClusterIndex", "GpuSlot", "NodeSlot", "bookings_of", "MAX_GPUS_PER_NODE"]

# Tensor-parallel lists are kept for k = 2 … this many GPUs of one vendor on one node.
MAX_GPUS_PER_NODE = 16
# Above this many changed nodes in one sync, lists are rebuilt (filter + sort) instead of
# edited entry by entry (each edit moves the list's tail: quadratic for a full rebuild).
_BULK_REINDEX = 64


@dataclass(frozen=True)
class Booking:
    """Memory one instance holds on one device: a GPU (`gpu_index`) or a node's RAM (None)."""

    node_id: str
    device: str                 # "gpu" or "cpu"
    gpu_index: int | None
    memory_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "device": self.device, "gpu_index": self.gpu_index,
                "memory_bytes": self.memory_bytes}

    @property
    def key(self) -> tuple[str, int | None]:
        return (self.node_id, self.gpu_index if self.device == "gpu" else None)


def bookings_of(instance: Mapping[str, Any]) -> list[Booking]:
    """Every device an instance holds memory on.

    `allocation.bookings` lists them (one per GPU, or per node's RAM, on every node of a
    multi-node plan). Records written before bookings existed hold `memory_bytes` on each
    GPU of `gpu_indices` (or in RAM) of the instance's own node.
    """
    alloc = instance.get("allocation") or {}
    listed = alloc.get("bookings")
    if listed is not None:
        return [Booking(b["node_id"], b["device"], b.get("gpu_index"), int(b["memory_bytes"]))
                for b in listed]
    node_id, size = instance["node_id"], int(alloc.get("memory_bytes", 0))
    if alloc.get("device") == "gpu":
        return [Booking(node_id, "gpu", int(i), size) for i in alloc.get("gpu_indices", ())]
    return [Booking(node_id, "cpu", None, size)]


@dataclass(slots=True)
class GpuSlot:
    node_id: str
    index: int
    vendor: str
    name: str
    uuid: str
    total: int
    usable: int
    measured_used: int
    booked: int = 0

    @property
    def free(self) -> int:
        return self.usable - max(self.measured_used, self.booked)

    def attributes(self) -> dict[str, str]:
        """What a GPU selector matches against."""
        return {"vendor": self.vendor, "name": self.name, "uuid": self.uuid,
                "index": str(self.index)}


@dataclass(slots=True)
class NodeSlot:
    id: str
    name: str
    status: str
    labels: dict[str, str]
    backends: dict[str, dict[str, Any]]
    gpus: dict[int, GpuSlot]
    gpu_labels: dict[str, dict[str, str]]
    ram_total: int
    ram_usable: int
    ram_measured_used: int
    ram_booked: int = 0
    index_keys: list[tuple[Any, tuple]] = field(default_factory=list)
    drives: list[tuple[str, str]] = field(default_factory=list)   # (backend, GPU vendor)

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    @property
    def ram_free(self) -> int:
        return self.ram_usable - max(self.ram_measured_used, self.ram_booked)

    def label_view(self) -> dict[str, str]:
        """Node labels plus the built-in `name` and `id`, for node selectors."""
        return {**self.labels, "name": self.name, "id": self.id}

    def gpu_label_view(self, gpu: GpuSlot) -> dict[str, str]:
        return {**self.gpu_labels.get(str(gpu.index), {}), **gpu.attributes()}

    def backend_vendors(self, backend: str) -> frozenset[str]:
        traits = self.backends.get(backend)
        return frozenset(traits.get("gpu_vendors", ())) if traits else frozenset()

    def backend_runs_on_cpu(self, backend: str) -> bool:
        traits = self.backends.get(backend)
        return bool(traits and traits.get("runs_on_cpu"))

    def rpc_roles(self, backend: str) -> tuple[bool, bool]:
        """(head, worker) for a model spread over nodes: can this node's install of `backend`
        run the server that holds the workers (llama.cpp: a llama-server with an RPC client),
        and lend its devices to another node's (an rpc-server)?"""
        rpc = (self.backends.get(backend) or {}).get("rpc") or {}
        return bool(rpc.get("client")), bool(rpc.get("server"))

    def free_by_vendor(self, vendor: str) -> list[int]:
        """Free bytes of this node's GPUs of one vendor, largest first."""
        return sorted((g.free for g in self.gpus.values() if g.vendor == vendor), reverse=True)


def _new_records(known: dict[int, Mapping[str, Any]],
                 current: Mapping[str, Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Records of `current` the index has not seen (new, or a new version of one)."""
    return [r for r in current.values() if id(r) not in known]


class _SortedKeys:
    """A list kept sorted; insert and remove by bisect (memmove in C: microseconds at 10⁴)."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[tuple] = []

    def add(self, key: tuple) -> None:
        bisect.insort(self.items, key)

    def remove(self, key: tuple) -> None:
        i = bisect.bisect_left(self.items, key)
        if i < len(self.items) and self.items[i] == key:
            del self.items[i]

    def from_key(self, key: tuple) -> Iterator[tuple]:
        """Entries >= key, in order."""
        items = self.items
        for i in range(bisect.bisect_left(items, key), len(items)):
            yield items[i]

    def descending(self) -> Iterator[tuple]:
        """Entries by their first field, largest first; equal ones in ascending order of the
        rest (node id, GPU index), so spread breaks ties the same way binpack does."""
        items = self.items
        end = len(items)
        while end > 0:
            start = bisect.bisect_left(items, (items[end - 1][0],), 0, end)
            yield from items[start:end]
            end = start

    def __len__(self) -> int:
        return len(self.items)


class ClusterIndex:
    """Nodes, their devices and the bookings on them, kept in step with the state."""

    def __init__(self, *, reserved_memory_bytes: int, gpu_memory_fraction: float) -> None:
        self.reserved_memory_bytes = reserved_memory_bytes
        self.gpu_memory_fraction = gpu_memory_fraction
        self.nodes: dict[str, NodeSlot] = {}
        # bookings held per device key, and the instances behind them
        self._booked: dict[tuple[str, int | None], int] = defaultdict(int)
        self.instances_on_device: dict[tuple[str, int | None], set[str]] = defaultdict(set)
        self.replica_nodes: dict[str, Counter[str]] = defaultdict(Counter)   # model -> nodes
        self.instances_by_model: dict[str, set[str]] = defaultdict(set)
        self.instances: dict[str, Mapping[str, Any]] = {}
        self._instance_bookings: dict[str, list[Booking]] = {}
        # sorted lists of ready nodes' devices, free bytes first (walk up or `descending`)
        self.gpu_free: dict[str, _SortedKeys] = defaultdict(_SortedKeys)   # (free, node, idx)
        # (k-th largest free GPU of the node, node) per (vendor, k): k GPUs on one node
        self.kth_free: dict[tuple[str, int], _SortedKeys] = defaultdict(_SortedKeys)
        self.sum_free: dict[str, _SortedKeys] = defaultdict(_SortedKeys)   # (Σfree, node)
        self.ram_free = _SortedKeys()                                      # (free, node)
        # (backend, vendor) -> ready nodes where that backend drives GPUs of that vendor
        self.backend_vendor_nodes: Counter[tuple[str, str]] = Counter()
        self._node_records: dict[str, Mapping[str, Any]] = {}
        self._node_identities: dict[int, Mapping[str, Any]] = {}       # id(record) -> record
        self._instance_identities: dict[int, Mapping[str, Any]] = {}
        self._nodes_source: Mapping[str, Any] | None = None
        self._instances_source: Mapping[str, Any] | None = None
        self.version = 0     # bumped on every change: callers may cache by it

    # --- following the state ----------------------------------------------------------------

    def sync(self, nodes: Mapping[str, Mapping[str, Any]],
             instances: Mapping[str, Mapping[str, Any]]) -> None:
        """Bring the index to `nodes` and `instances` (the replicated collections).

        Records are copy-on-write, so a changed record is a new object: one pass of identity
        lookups finds the new ones (a new version replaces its instance's older one), a
        count says whether any left, and only changed records cost more. The index holds
        every record it has seen, so an identity cannot be reused while it is compared.
        """
        dirty: set[str] = set()
        if nodes is not self._nodes_source:
            self._nodes_source = nodes
            for record in _new_records(self._node_identities, nodes):
                self._load_node(record)          # replaces the node's older record
                dirty.add(record["id"])
            if len(self._node_records) > len(nodes):      # some were removed
                for node_id in self._node_records.keys() - nodes.keys():
                    self._drop_node(node_id)
        if instances is not self._instances_source:
            self._instances_source = instances
            for record in _new_records(self._instance_identities, instances):
                dirty.update(self.track_instance(record))
            if len(self.instances) > len(instances):     # some were removed
                for instance_id in self.instances.keys() - instances.keys():
                    dirty.update(self._forget_instance(instance_id))
        self.reindex_nodes(dirty)

    def track_instance(self, record: Mapping[str, Any]) -> set[str]:
        """Count an instance's bookings (replacing its earlier ones); returns nodes touched."""
        instance_id = record["id"]
        new = bookings_of(record)
        old = self._instance_bookings.get(instance_id)
        if old == new and instance_id in self.instances:
            self._set_record(instance_id, record)      # same devices: nothing to re-index
            return set()
        touched = self._forget_instance(instance_id) if instance_id in self.instances else set()
        self._set_record(instance_id, record)
        self._instance_bookings[instance_id] = new
        for b in new:
            self._booked[b.key] += b.memory_bytes
            self.instances_on_device[b.key].add(instance_id)
            touched.add(b.node_id)
        for node_id in {b.node_id for b in new} | {record["node_id"]}:
            self.replica_nodes[record["model"]][node_id] += 1
        self.instances_by_model[record["model"]].add(instance_id)
        self._apply_bookings(touched)
        return touched

    def _set_record(self, instance_id: str, record: Mapping[str, Any]) -> None:
        previous = self.instances.get(instance_id)
        if previous is not None:
            self._instance_identities.pop(id(previous), None)
        self.instances[instance_id] = record
        self._instance_identities[id(record)] = record

    def _forget_instance(self, instance_id: str) -> set[str]:
        record = self.instances.pop(instance_id)
        self._instance_identities.pop(id(record), None)
        old = self._instance_bookings.pop(instance_id, [])
        touched: set[str] = set()
        for b in old:
            self._booked[b.key] -= b.memory_bytes
            self.instances_on_device[b.key].discard(instance_id)
            touched.add(b.node_id)
        counter = self.replica_nodes[record["model"]]
        for node_id in {b.node_id for b in old} | {record["node_id"]}:
            counter[node_id] -= 1
            if counter[node_id] <= 0:
                del counter[node_id]
        if not counter:
            del self.replica_nodes[record["model"]]
        of_model = self.instances_by_model[record["model"]]
        of_model.discard(instance_id)
        if not of_model:
            del self.instances_by_model[record["model"]]
        self._apply_bookings(touched)
        return touched

    def _apply_bookings(self, node_ids: set[str]) -> None:
        for node_id in node_ids:
            node = self.nodes.get(node_id)
            if node is None:
                continue
            node.ram_booked = self._booked.get((node_id, None), 0)
            for gpu in node.gpus.values():
                gpu.booked = self._booked.get((node_id, gpu.index), 0)

    def _load_node(self, record: Mapping[str, Any]) -> None:
        node_id = record["id"]
        previous = self._node_records.get(node_id)
        if previous is not None:
            self._node_identities.pop(id(previous), None)
        self._node_records[node_id] = record
        self._node_identities[id(record)] = record
        old = self.nodes.get(node_id)
        inventory = record.get("inventory") or {}
        ram_total = int(inventory.get("memory_total_bytes", 0))
        # the heartbeat's measurement (every few seconds) is newer than the inventory's; it
        # refreshes the GPUs' memory_used_bytes in the inventory itself (commands/nodes.py)
        resources = record.get("resources") or {}
        available = resources.get("memory_available_bytes", inventory.get("memory_available_bytes"))
        gpus = {}
        for g in inventory.get("gpus", ()):
            total = int(g["memory_total_bytes"])
            gpus[int(g["index"])] = GpuSlot(
                node_id=node_id, index=int(g["index"]), vendor=str(g["vendor"]),
                name=str(g.get("name", "")), uuid=str(g.get("uuid", "")), total=total,
                usable=int(total * self.gpu_memory_fraction),
                measured_used=int(g.get("memory_used_bytes") or 0))
        node = NodeSlot(
            id=node_id, name=str(record.get("name") or node_id),
            status="draining" if record.get("draining") else str(record.get("status", "unknown")),
            labels={str(k): str(v) for k, v in (record.get("labels") or {}).items()},
            backends=dict(record.get("backends") or {}), gpus=gpus,
            gpu_labels={str(k): dict(v) for k, v in (record.get("gpu_labels") or {}).items()},
            ram_total=ram_total, ram_usable=ram_total - self.reserved_memory_bytes,
            ram_measured_used=ram_total - int(available) if available is not None else 0)
        if old is not None:     # its index entries are removed by the re-index that follows
            node.index_keys, node.drives = old.index_keys, old.drives
        self.nodes[node_id] = node
        self._apply_bookings({node_id})

    def _drop_node(self, node_id: str) -> None:
        record = self._node_records.pop(node_id, None)
        if record is not None:
            self._node_identities.pop(id(record), None)
        node = self.nodes.pop(node_id, None)
        if node is not None:
            self._unindex(node)
        self.version += 1

    # --- the sorted lists ------------------------------------------------------------------

    def reindex_nodes(self, node_ids: set[str]) -> None:
        """Re-index changed nodes: one by one (bisect), or for many at once (a new leader's
        first sync, every node's record rewritten) by filtering and re-sorting each list."""
        if len(node_ids) <= _BULK_REINDEX:
            for node_id in node_ids:
                self.reindex_node(node_id)
            return
        self.version += 1
        touched: set[_SortedKeys] = set()
        for node_id in node_ids:
            if (node := self.nodes.get(node_id)) is not None:
                touched.update(sorted_keys for sorted_keys, _ in node.index_keys)
                node.index_keys = []
                self.backend_vendor_nodes.subtract(node.drives)
                node.drives = []
        for sorted_keys in touched:
            sorted_keys.items = [k for k in sorted_keys.items if k[1] not in node_ids]
        for node_id in node_ids:
            if (node := self.nodes.get(node_id)) is not None and node.ready:
                for sorted_keys, key in self._keys_of(node):
                    sorted_keys.items.append(key)
                    touched.add(sorted_keys)
        for sorted_keys in touched:
            sorted_keys.items.sort()

    def reindex_node(self, node_id: str) -> None:
        node = self.nodes.get(node_id)
        if node is None:
            return
        self.version += 1
        self._unindex(node)
        if not node.ready:
            return                  # only ready nodes take new instances
        for sorted_keys, key in self._keys_of(node):
            sorted_keys.add(key)

    def _keys_of(self, node: NodeSlot) -> list[tuple[_SortedKeys, tuple]]:
        """The node's entries in the sorted lists (recorded on the node, to remove them)."""
        keys = node.index_keys
        for gpu in node.gpus.values():
            keys.append((self.gpu_free[gpu.vendor], (gpu.free, node.id, gpu.index)))
        vendors = {g.vendor for g in node.gpus.values()}
        for vendor in vendors:
            frees = node.free_by_vendor(vendor)
            for k in range(1, min(len(frees), MAX_GPUS_PER_NODE) + 1):
                keys.append((self.kth_free[(vendor, k)], (frees[k - 1], node.id)))
            keys.append((self.sum_free[vendor], (sum(max(f, 0) for f in frees), node.id)))
        keys.append((self.ram_free, (node.ram_free, node.id)))
        node.drives = [(b, v) for b in node.backends for v in vendors
                       if v in node.backend_vendors(b)]
        self.backend_vendor_nodes.update(node.drives)
        return keys

    def _unindex(self, node: NodeSlot) -> None:
        for sorted_keys, key in node.index_keys:
            sorted_keys.remove(key)
        node.index_keys = []
        self.backend_vendor_nodes.subtract(node.drives)
        node.drives = []

    # --- questions the placement asks ------------------------------------------------------

    def replicas_on(self, model: str, node_id: str) -> int:
        counter = self.replica_nodes.get(model)
        return counter.get(node_id, 0) if counter else 0

    def ready_count(self) -> int:
        return len(self.ram_free)      # every ready node has one RAM entry

    def vendors(self, backend: str | None = None) -> list[str]:
        """GPU vendors on ready nodes (that `backend` drives on at least one of them)."""
        return sorted(v for v, keys in self.gpu_free.items() if len(keys)
                      and (backend is None or self.backend_vendor_nodes[(backend, v)] > 0))

    def gpu(self, node_id: str, index: int) -> GpuSlot:
        return self.nodes[node_id].gpus[index]

    def book(self, bookings: list[Booking], instance_id: str, model: str, node_id: str) -> None:
        """Count a placement made but not yet in the state (dry runs of several replicas)."""
        self._instances_source = None     # the next sync re-reads every instance
        touched = self.track_instance({"id": instance_id, "model": model, "node_id": node_id,
                                       "allocation": {"bookings": [b.to_dict() for b in bookings]}})
        for touched_id in touched:
            self.reindex_node(touched_id)

    def restore(self, record: Mapping[str, Any]) -> None:
        """Count an instance again after `unbook` (a planned eviction that was not needed)."""
        self._instances_source = None
        for node_id in self.track_instance(record):
            self.reindex_node(node_id)

    def unbook(self, instance_id: str) -> None:
        """Forget an instance's bookings (an eviction being planned)."""
        if instance_id in self.instances:
            self._instances_source = None
            for node_id in self._forget_instance(instance_id):
                self.reindex_node(node_id)
