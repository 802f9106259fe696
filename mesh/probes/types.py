"""What a probe reports about one node, and the interface every probe implements.

The inventory travels in two ways: into the replicated cluster state (through Raft, as plain
msgpack data) and into each node's telemetry ring buffer. So it is made of frozen dataclasses
that convert to and from plain dicts, and nothing here may import a vendor library or the UI.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Literal, Self, get_args

from gpumesh.accelerators import VENDORS

__all__ = [
    "GpuDevice",
    "select_gpus",
    "NodeInventory",
    "Probe",
    "ProbeError",
    "ProbeUnavailable",
    "Vendor",
]

Vendor = Literal["nvidia", "amd", "hygon", "ascend", "cambricon", "mthreads", "iluvatar", "metax"]
_VENDORS: frozenset[str] = frozenset(get_args(Vendor))
assert _VENDORS == frozenset(VENDORS), "Vendor and gpumesh.accelerators.VENDORS must agree"


class ProbeError(RuntimeError):
    """A probe failed while reading the hardware (a lost GPU, a driver that went away)."""


class ProbeUnavailable(ProbeError):
    """A probe cannot run on this machine; the message is a one-line reason for the operator."""


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True, slots=True)
class GpuDevice:
    """One GPU as the vendor library reports it.

    ``index`` is the vendor library's own index (NVML's, AMD SMI's, npu-smi's logic id ...),
    i.e. the physical enumeration on this node, not an index relative to
    ``CUDA_VISIBLE_DEVICES``: it is what the vendor's visibility variable takes
    (``gpumesh.accelerators.VISIBLE_DEVICES_ENV``).
    Readings a device does not support are ``None`` rather than a made-up zero.
    """

    index: int
    vendor: Vendor
    name: str
    uuid: str
    memory_total_bytes: int
    memory_used_bytes: int
    utilization_percent: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None

    def __post_init__(self) -> None:
        if self.vendor not in _VENDORS:
            raise ValueError(f"GpuDevice.vendor must be one of {sorted(_VENDORS)}, not {self.vendor!r}")

    @property
    def memory_free_bytes(self) -> int:
        return max(0, self.memory_total_bytes - self.memory_used_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "vendor": self.vendor,
            "name": self.name,
            "uuid": self.uuid,
            "memory_total_bytes": self.memory_total_bytes,
            "memory_used_bytes": self.memory_used_bytes,
            "utilization_percent": self.utilization_percent,
            "temperature_c": self.temperature_c,
            "power_w": self.power_w,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GpuDevice:
        # Keys this version does not know are ignored: during a rolling upgrade a newer node may
        # already publish fields that older nodes have never heard of.
        try:
            return cls(
                index=int(data["index"]),
                vendor=str(data["vendor"]),  # type: ignore[arg-type]  # checked in __post_init__
                name=str(data["name"]),
                uuid=str(data["uuid"]),
                memory_total_bytes=int(data["memory_total_bytes"]),
                memory_used_bytes=int(data["memory_used_bytes"]),
                utilization_percent=_opt_float(data.get("utilization_percent")),
                temperature_c=_opt_float(data.get("temperature_c")),
                power_w=_opt_float(data.get("power_w")),
            )
        except KeyError as exc:
            raise ValueError(f"GPU record lacks the field {exc.args[0]!r}") from None


@dataclass(frozen=True, slots=True)
class NodeInventory:
    """What one node has: its CPU cores and memory, its GPUs, and which probe read them."""

    cpu_cores: int
    memory_total_bytes: int
    memory_available_bytes: int
    gpus: tuple[GpuDevice, ...]
    probe: str

    def to_dict(self) -> dict[str, Any]:
        # Lists, not tuples: msgpack turns both into arrays, but a list is what comes back, so
        # to_dict(from_dict(x)) == x holds for data that went over the wire.
        return {
            "cpu_cores": self.cpu_cores,
            "memory_total_bytes": self.memory_total_bytes,
            "memory_available_bytes": self.memory_available_bytes,
            "gpus": [gpu.to_dict() for gpu in self.gpus],
            "probe": self.probe,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NodeInventory:
        try:
            return cls(
                cpu_cores=int(data["cpu_cores"]),
                memory_total_bytes=int(data["memory_total_bytes"]),
                memory_available_bytes=int(data["memory_available_bytes"]),
                gpus=tuple(GpuDevice.from_dict(gpu) for gpu in data.get("gpus", ())),
                probe=str(data["probe"]),
            )
        except KeyError as exc:
            raise ValueError(f"node inventory lacks the field {exc.args[0]!r}") from None


class Probe(abc.ABC):
    """Reads a node's inventory. Blocking: the daemon calls it through ``asyncio.to_thread``.

    ``inventory()`` must be cheap enough to call every ~2 s. ``close()`` releases the vendor
    library and may be called more than once; ``inventory()`` after ``close()`` raises
    :class:`ProbeError`.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def inventory(self) -> NodeInventory: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def select_gpus(found: tuple[int, ...] | list[int], wanted: tuple[int, ...] | None,
                label: str) -> set[int]:
    """The device indices a node offers: all it found, or exactly ``--gpus``.

    Raises :class:`ProbeUnavailable` naming what exists when ``--gpus`` asks for an index
    the vendor tool did not report: a typo must not silently give a node fewer GPUs.
    """
    if wanted is None:
        return set(found)
    missing = sorted(set(wanted) - set(found))
    if missing:
        have = ", ".join(str(i) for i in sorted(found)) or "none"
        raise ProbeUnavailable(f"--gpus {','.join(map(str, wanted))}: this node has no {label} "
                               f"GPU {', '.join(map(str, missing))} (it has {have})")
    return set(wanted)
