"""Evaluate a deployment before anything starts: will it fit, where, and if not, why.

`evaluate(record, nodes, instances, scheduler)` takes the model record a deploy request
would store (so the memory estimate and every check are the deploy's own) and plans each
replica on a private copy of the cluster's index, booking each so the next one sees it —
exactly what the reconciler would do, without writing anything. It answers with plain data
and a summary in words, e.g.

    needs 18.2 GiB; the largest free GPU has 15.6 GiB on node-b (GPU 0); two GPUs on
    node-a (GPUs 0, 1) fit with tensor parallel 2, 9.1 GiB each (the tightest fit)

`POST /api/models/evaluate` (`routes.py`) and `gpumesh deploy … --dry-run` use it.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..sizes import format_bytes
from .architectures import architecture_check
from .capacity import ClusterIndex
from .demand import is_on_demand, plan_eviction
from .placement import Scheduler
from .plan import Placement, Unschedulable

__all__ = ["evaluate"]


def evaluate(record: Mapping[str, Any], nodes: Mapping[str, Mapping[str, Any]],
             instances: Mapping[str, Mapping[str, Any]], scheduler: Scheduler,
             models: Mapping[str, Mapping[str, Any]], now: float,
             architectures: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Plan `record`'s replicas on the cluster as it is now (`models`: the stored ones;
    `architectures`: the state's `engine_architectures`)."""
    index = scheduler.index_of(nodes, instances)
    checks = compatibility(record, index)
    if (arch := architecture_check(record, nodes.values(), architectures or {})) is not None:
        checks.append(arch)
    checks += [{"check": "source", "ok": True, "detail": note}
               for note in record.get("notes") or ()]
    if record["name"] in models:
        checks.insert(0, {"check": "name", "ok": False,
                          "detail": f"a model named {record['name']!r} already exists"})
    wanted = max(1, int(record["replicas"]))
    replicas: list[dict[str, Any]] = []
    for n in range(wanted):
        outcome = scheduler.place_in(record, index, multi_node=False)
        evicts: list[str] = []
        if not isinstance(outcome, Placement):
            eviction = plan_eviction(record, index, models, now,
                                     lambda m, i: scheduler.place_in(m, i, multi_node=False))
            if eviction is not None:
                outcome, evicts = eviction.placement, eviction.models
                for instance_id in eviction.instance_ids:
                    index.unbook(instance_id)
            else:
                outcome = scheduler.place_in(record, index)
        replicas.append(_replica(outcome, index, evicts))
        if not isinstance(outcome, Placement):
            break
        index.book(list(outcome.bookings), f"dry-run-{n}", record["name"], outcome.node_id)
    fits = len(replicas) == wanted and all(r["fits"] for r in replicas)
    return {"name": record["name"], "backend": record["backend"], "format": record["format"],
            "estimate": record["estimate"], "fits": fits and all(c["ok"] for c in checks),
            "replicas": replicas, "checks": checks,
            "summary": _summary(record, replicas, wanted, checks)}


def compatibility(record: Mapping[str, Any], index: ClusterIndex) -> list[dict[str, Any]]:
    """What can be known without placing: is the engine on any ready node, and can it use
    the accelerators there. (Format and backend were checked when the record was built;
    the architecture is `architecture_check`'s.)"""
    backend = record["backend"]
    ready = [n for n in index.nodes.values() if n.ready]
    with_engine = [n for n in ready if backend in n.backends]
    checks = [{"check": "engine", "ok": bool(with_engine),
               "detail": (f"{backend} is available on {len(with_engine)} of {len(ready)} "
                          f"ready node(s)" if with_engine else
                          f"{backend} is not available on any ready node" +
                          (f" (they have: {', '.join(sorted({b for n in ready for b in n.backends}))})"
                           if ready else " (no node is ready)"))}]
    idle_gpus = [(n, v) for n in with_engine for v in sorted({g.vendor for g in n.gpus.values()})
                 if v not in n.backend_vendors(backend)]
    if idle_gpus:
        node, vendor = idle_gpus[0]
        more = f" (and {len(idle_gpus) - 1} more node(s))" if len(idle_gpus) > 1 else ""
        checks.append({"check": "accelerator", "ok": True,
                       "detail": f"{backend} on {node.name} cannot use its {vendor} GPUs"
                                 f"{more}: it would run on the CPU there"})
    return checks


def _replica(outcome: Placement | Unschedulable, index: ClusterIndex,
             evicts: list[str]) -> dict[str, Any]:
    if not isinstance(outcome, Placement):
        return {"fits": False, "reason": outcome.reason}
    node = index.nodes[outcome.node_id]
    words = "; ".join([*outcome.notes, outcome.where])
    if evicts:
        words += f" (after stopping {', '.join(evicts)}: on demand and idle now)"
    return {"fits": True, "node_id": outcome.node_id, "node": node.name,
            "allocation": outcome.allocation(), "evicts": evicts, "reason": words}


def _summary(record: Mapping[str, Any], replicas: list[dict[str, Any]], wanted: int,
             checks: list[dict[str, Any]]) -> str:
    problems = [c["detail"] for c in checks if not c["ok"]]
    placed = [r for r in replicas if r["fits"]]
    if len(placed) == wanted and not problems:
        if wanted == 1:
            text = replicas[0]["reason"]
        else:
            text = f"all {wanted} replicas fit: on {', '.join(r['node'] for r in placed)}"
        if is_on_demand(record):
            text += (f"; on demand: {record.get('min_replicas')} run while idle, the first "
                     f"request starts the rest")
        return text
    failed = next((r for r in replicas if not r["fits"]), None)
    parts = problems[:]
    if failed is not None:
        prefix = f"replica {len(placed) + 1} of {wanted} does not fit: " if placed else ""
        parts.append(prefix + failed["reason"])
    return "; ".join(parts) or f"needs {format_bytes(record['estimate']['total_bytes'])}"
