"""Plans that split one replica over several nodes, through the engine's own mechanism:
llama.cpp RPC (a llama-server head and rpc-server workers, layers split by free memory) and
vLLM pipeline stages over Ray with tensor parallel inside each. Tried by
`placement.Decision` only when no single node fits."""

from __future__ import annotations

import heapq
import math
from typing import TYPE_CHECKING, Iterator

from .capacity import Booking, GpuSlot, NodeSlot
from .explain import count_words, gpu_words
from ..sizes import format_bytes
from .plan import Placement

if TYPE_CHECKING:
    from .placement import Decision

__all__ = ["across_nodes"]

_MAX_NODES_PER_REPLICA = 16


def across_nodes(d: Decision) -> Placement | None:
    mechanism = d.req.engine.multi_node
    plan = None
    if mechanism == "ray-pipeline" and d.req.device != "cpu":
        plan = _pipeline_stages(d)
    elif mechanism == "llama.cpp-rpc":
        if d.req.device != "cpu" and d.vendors():
            plan = _split_by_free_memory(d, "gpu")
        if plan is None and d.req.device != "gpu":
            plan = _split_by_free_memory(d, "cpu")
    return plan


def _pipeline_stages(d: Decision) -> Placement | None:
    """vLLM over Ray: pp nodes × tp GPUs each, equal layers per stage, one vendor."""
    ready = d.index.ready_count()
    sizes = d.req.engine.tensor_parallel_sizes or (1, 2, 4, 8)
    shapes = sorted(((pp, tp) for pp in range(2, min(ready, _MAX_NODES_PER_REPLICA) + 1)
                     for tp in sizes), key=lambda s: (s[0] * s[1], s[0]))
    for pp, tp in shapes:
        per_gpu = d.req.need("gpu", 1 / (pp * tp))
        for vendor in d.vendors():
            stages = _stage_nodes(d, vendor, pp, tp, per_gpu)
            if stages is not None:
                return _staged_plan(d, stages, vendor, per_gpu, pp, tp)
    d.notes.append(f"pipeline stages over Ray: no {_MAX_NODES_PER_REPLICA} or fewer "
                   f"ready nodes with equal GPU counts hold "
                   f"{format_bytes(d.req.split_bytes['gpu'])} of weights and KV cache")
    return None


def _stage_nodes(d: Decision, vendor: str, pp: int, tp: int,
                 per_gpu: int) -> list[tuple[NodeSlot, list[GpuSlot]]] | None:
    fresh: list[tuple[NodeSlot, list[GpuSlot]]] = []
    reused: list[tuple[NodeSlot, list[GpuSlot]]] = []
    entries = d.entries(d.index.kth_free[(vendor, tp)], per_gpu)
    for key in entries:
        node = d.index.nodes[key[1]]
        gpus = d.usable_gpus(node, vendor, per_gpu)
        if len(gpus) < tp:
            continue
        target = reused if d.index.replicas_on(d.req.model, node.id) else fresh
        target.append((node, gpus[:tp]))
        if len(fresh) >= pp:
            break
    chosen = (fresh + reused)[:pp]
    return chosen if len(chosen) == pp else None


def _staged_plan(d: Decision, stages: list[tuple[NodeSlot, list[GpuSlot]]], vendor: str,
                 per_gpu: int, pp: int, tp: int) -> Placement:
    bookings = tuple(Booking(node.id, "gpu", g.index, per_gpu)
                     for node, gpus in stages for g in sorted(gpus, key=lambda g: g.index))
    head, head_gpus = stages[0]
    plan = Placement(head.id, "gpu", per_gpu, vendor, tuple(sorted(g.index for g in head_gpus)),
                     bookings=bookings, mechanism="ray-pipeline", pipeline_parallel=pp)
    names = ", ".join(node.name for node, _ in stages)
    return d.with_reason(plan, f"{count_words(pp)} pipeline stages over Ray on {names}, "
                               f"{gpu_words(tp)} each (tensor parallel {tp}), "
                               f"{format_bytes(per_gpu)} per GPU")


def _split_by_free_memory(d: Decision, device: str) -> Placement | None:
    """llama.cpp RPC: the roomiest node that can run the server (a llama-server with an
    RPC client) is the head; then take the devices of the roomiest nodes that run an
    rpc-server until their free memory (less what each device holds whole) covers the
    weights and KV cache; split layers in proportion, so every device fills the same
    fraction of what it offers."""
    req = d.req
    split, fixed = req.split_bytes[device], req.fixed_bytes[device]
    head: list[tuple[NodeSlot, GpuSlot | None, int]] = []
    workers: list[list[tuple[NodeSlot, GpuSlot | None, int]]] = []
    total = 0
    for node in _roomiest_nodes(d, device):
        if head and (total >= split or len(workers) + 1 >= _MAX_NODES_PER_REPLICA):
            break
        can_head, can_work = node.rpc_roles(req.backend)
        if not (can_head and not head) and not (can_work and len(workers) + 1 < _MAX_NODES_PER_REPLICA):
            continue                  # nothing this node could do for the plan
        devices = _offers(d, node, device, fixed)
        if not devices:
            continue
        if can_head and not head:
            head = devices
        else:
            workers.append(devices)
        total += sum(offer for _, _, offer in devices)
    if not head or not workers or total < split:
        d.notes.append(_rpc_note(d, device, head, workers, total, split))
        return None
    offers = head + [offer for devices in workers for offer in devices]
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
    per_node = ", ".join(f"{d.name_of(node_id)} {format_bytes(size)}"
                         for node_id, size in _per_node(bookings))
    return d.with_reason(plan, f"split over {count_words(nodes_used)} nodes with "
                               f"llama.cpp RPC servers, layers in proportion to free "
                               f"memory ({per_node}); {head_node.name} runs the "
                               f"server, the others rpc-servers")


def _offers(d: Decision, node: NodeSlot, device: str,
            fixed: int) -> list[tuple[NodeSlot, GpuSlot | None, int]]:
    """What each of a node's devices offers to a split: free memory less what every
    device holds whole (the engine process, compute buffers)."""
    if not d.node_ok(node):
        return []
    if device == "cpu":
        found = [(None, node.ram_free - fixed)] if node.backend_runs_on_cpu(d.req.backend) else []
    else:
        found = [(g, g.free - fixed) for g in sorted(node.gpus.values(), key=lambda g: g.index)
                 if d.gpu_ok(node, g)]
    return [(node, g, offer) for g, offer in found if offer > 0]


def _rpc_note(d: Decision, device: str, head: list, workers: list, total: int, split: int) -> str:
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


def _roomiest_nodes(d: Decision, device: str) -> Iterator[NodeSlot]:
    if device == "cpu":
        for key in d.index.ram_free.descending():
            yield d.index.nodes[key[1]]
        return
    lists = [d.index.sum_free[v].descending() for v in d.vendors()]
    seen: set[str] = set()
    for key in heapq.merge(*lists, key=lambda k: (-k[0], k[1])):
        if key[1] not in seen:
            seen.add(key[1])
            yield d.index.nodes[key[1]]


def _per_node(bookings: tuple[Booking, ...]) -> list[tuple[str, int]]:
    totals: dict[str, int] = {}
    for b in bookings:
        totals[b.node_id] = totals.get(b.node_id, 0) + b.memory_bytes
    return list(totals.items())
