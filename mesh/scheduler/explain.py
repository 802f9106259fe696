"""Words for placement decisions: counts, and why a model cannot be placed."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .capacity import ClusterIndex
    from .requirement import Requirement

__all__ = ["count_words", "describe_unschedulable", "gpu_words"]

_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven",
          8: "eight", 9: "nine"}
# Reasons name at most this many nodes per kind; the rest are counted.
_NAMED_NODES = 3


def count_words(n: int) -> str:
    return _WORDS.get(n, str(n))


def gpu_words(n: int) -> str:
    return "one GPU" if n == 1 else f"{count_words(n)} GPUs"


def describe_unschedulable(req: "Requirement", index: "ClusterIndex", notes: list[str]) -> str:
    """Why no plan fits: the notes of each plan tried, then what kept nodes out entirely.

    Walks every node (only when nothing fits, so the placement path stays indexed).
    """
    if not index.nodes:
        return "no nodes have joined the cluster"
    excluded = _excluded_nodes(req, index)
    parts = list(dict.fromkeys(notes))
    if req.device == "gpu" and not req.pinned:
        parts.append("the deployment asks for GPUs only")
    parts.extend(excluded)
    return "; ".join(parts) or "no device fits"


def _excluded_nodes(req: "Requirement", index: "ClusterIndex") -> list[str]:
    not_ready: dict[str, list[str]] = {}
    no_backend: list[str] = []
    unselected: list[str] = []
    vendors_refused: Counter[str] = Counter()
    for node in sorted(index.nodes.values(), key=lambda n: n.id):
        if not node.ready:
            not_ready.setdefault(node.status, []).append(node.name)
        elif req.backend not in node.backends:
            no_backend.append(node.name)
        elif not req.node_matches(node.label_view()):
            unselected.append(node.name)
        else:
            usable = node.backend_vendors(req.backend)
            vendors_refused.update(g.vendor for g in node.gpus.values() if g.vendor not in usable)
    out = [f"{_names(names)} {'is' if len(names) == 1 else 'are'} {status}"
           for status, names in sorted(not_ready.items())]
    if no_backend:
        out.append(f"{req.backend} is not available on {_names(no_backend)}")
    if unselected:
        out.append(f"the node selector {_selector(req.node_selector)} leaves out "
                   f"{_names(unselected)}")
    for vendor, count in sorted(vendors_refused.items()):
        out.append(f"{req.backend} cannot use {vendor} GPUs ({count} in the cluster)")
    return out


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_NAMED_NODES])
    more = len(names) - _NAMED_NODES
    return f"{shown} and {more} more" if more > 0 else shown


def _selector(selector: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
