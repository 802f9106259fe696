"""What the GPU probes share, and what the NVIDIA and AMD probes share besides.

`GpuProbe`: one lock, a close that runs once, the CPU figures merged into every inventory;
the base of `VendorProbe` and of `tools.ToolProbe` (the probes that run a vendor's tool).
The lock keeps a close from racing a read on the polling thread.

A vendor probe (`VendorProbe`) opens its library, lists its devices once (`_open_devices`),
reads them on each `inventory()` (`_read`), and closes the library once (`_shutdown`); a
failed open undoes the library's init.
"""

from __future__ import annotations

import abc
import dataclasses
import threading
from typing import Any

from .cpu import CpuProbe
from .types import GpuDevice, NodeInventory, Probe, ProbeError, select_gpus

__all__ = ["GpuProbe", "OpenedDevice", "VendorProbe"]


@dataclasses.dataclass(frozen=True)
class OpenedDevice:
    index: int
    handle: Any
    name: str
    uuid: str


class GpuProbe(Probe):
    """Set ``_lock``, ``_closed`` and ``_cpu`` when opening; implement `_read_gpus`."""

    label: str = ""   # "NVIDIA", "Ascend": for messages
    _lock: threading.Lock
    _closed: bool
    _cpu: CpuProbe

    def inventory(self) -> NodeInventory:
        with self._lock:
            if self._closed:
                raise ProbeError(f"the {self.label} probe is closed")
            gpus = self._read_gpus()
        return dataclasses.replace(self._cpu.inventory(), gpus=gpus, probe=self.name)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._shutdown()
        self._cpu.close()

    @abc.abstractmethod
    def _read_gpus(self) -> tuple[GpuDevice, ...]:
        """One reading of every offered device (under the lock; raises ProbeError)."""

    def _shutdown(self) -> None:
        """Release what the probe holds besides the CPU probe (nothing, unless overridden)."""


class VendorProbe(GpuProbe):

    def _open(self, cpu: CpuProbe | None, gpus: tuple[int, ...] | None = None) -> None:
        """Call once the vendor library is initialised; undoes that init if listing fails.
        ``gpus`` (``--gpus``) keeps only those indices; the others are never read."""
        self._lock = threading.Lock()
        self._closed = False
        self._cpu = cpu if cpu is not None else CpuProbe()
        try:
            devices = self._open_devices()
            offered = select_gpus([d.index for d in devices], gpus, self.label)
            self._devices = [d for d in devices if d.index in offered]
        except BaseException:
            self._shutdown()
            raise

    @property
    def device_count(self) -> int:
        return len(self._devices)

    def _read_gpus(self) -> tuple[GpuDevice, ...]:
        return tuple(self._read(device) for device in self._devices)

    @abc.abstractmethod
    def _open_devices(self) -> list[OpenedDevice]:
        """List the devices once; raise ProbeUnavailable if none can be used."""

    @abc.abstractmethod
    def _read(self, device: OpenedDevice) -> GpuDevice:
        """One reading of one device; raise ProbeError for fatal errors."""

    @abc.abstractmethod
    def _shutdown(self) -> None:
        """Release the vendor library (errors are logged, not raised)."""
