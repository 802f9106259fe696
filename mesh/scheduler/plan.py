"""What a placement decision returns: `Placement` (the devices one instance holds on every
node it uses, and the reason in words) or `Unschedulable` (why nothing fits)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .capacity import Booking

__all__ = ["Placement", "Unschedulable"]


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
