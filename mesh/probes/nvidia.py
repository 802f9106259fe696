"""The NVIDIA probe, through NVML (the ``pynvml`` module of the nvidia-ml-py distribution).

Device indices are NVML's, i.e. every physical GPU of the node, whatever
``CUDA_VISIBLE_DEVICES`` the daemon itself was started with: the daemon manages the whole
node and hands GPUs to the engines it launches by setting *their* ``CUDA_VISIBLE_DEVICES``,
so an index here must name the same GPU for every process on the node. (NVML enumerates by
PCI bus id, as ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` does; the node agent sets that for engines.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .cpu import CpuProbe
from .types import GpuDevice, ProbeError, ProbeUnavailable
from .vendor import OpenedDevice, VendorProbe

if TYPE_CHECKING:
    from types import ModuleType

__all__ = ["NvidiaProbe", "nvml_query"]

log = logging.getLogger("gpumesh.probe")

T = TypeVar("T")

# NVML errors that mean "this device cannot give this reading" rather than "the device or the
# driver is in trouble". Names, not numbers, because older nvidia-ml-py releases lack the
# newer codes; getattr skips what a release does not define.
_NON_FATAL_ERROR_NAMES = (
    "NVML_ERROR_NOT_SUPPORTED",  # e.g. power on some boards, utilisation under MIG
    "NVML_ERROR_NO_PERMISSION",
    "NVML_ERROR_FUNCTION_NOT_FOUND",  # a driver older than the binding
    "NVML_ERROR_NO_DATA",
    "NVML_ERROR_NOT_READY",  # no sample yet, right after the driver loads
    "NVML_ERROR_ARGUMENT_VERSION_MISMATCH",  # a versioned struct newer than the driver
)


def _non_fatal_codes(pynvml: ModuleType) -> frozenset[int]:
    return frozenset(
        getattr(pynvml, name) for name in _NON_FATAL_ERROR_NAMES if hasattr(pynvml, name)
    )


def nvml_query(fn: Callable[..., T], *args: Any) -> T | None:
    """Call an NVML function; a reading the device does not offer becomes ``None``.

    Only the errors in ``_NON_FATAL_ERROR_NAMES`` are swallowed. The rest (a lost GPU, a
    driver that was unloaded, NVML not initialised) propagate: hiding them as "no reading"
    would let the scheduler keep placing work on a dead GPU.
    """
    import pynvml  # already imported by whoever got hold of an NVML function

    try:
        return fn(*args)
    except pynvml.NVMLError as exc:
        if exc.value in _non_fatal_codes(pynvml):
            return None
        raise


def _text(value: str | bytes) -> str:
    # nvidia-ml-py returns str in recent releases and bytes in old ones.
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _init_failure_reason(pynvml: ModuleType, exc: Exception) -> str:
    code = getattr(exc, "value", None)
    reasons = {
        getattr(pynvml, "NVML_ERROR_LIBRARY_NOT_FOUND", -1): (
            "the NVML library (libnvidia-ml.so.1) was not found: no NVIDIA driver is installed"
        ),
        getattr(pynvml, "NVML_ERROR_DRIVER_NOT_LOADED", -1): "the NVIDIA kernel driver is not loaded",
        getattr(pynvml, "NVML_ERROR_LIB_RM_VERSION_MISMATCH", -1): (
            "NVML and the NVIDIA kernel driver differ in version (driver updated without a reboot?)"
        ),
        getattr(pynvml, "NVML_ERROR_NO_PERMISSION", -1): "no permission to open the NVIDIA devices",
    }
    return reasons.get(code, f"nvmlInit failed: {exc}")


class NvidiaProbe(VendorProbe):
    """NVIDIA GPUs through NVML, plus the CPU probe's cores and memory.

    Raises :class:`ProbeUnavailable` with a one-line reason when nvidia-ml-py is missing,
    NVML cannot start, or it finds no GPU. Thread-safe: one lock serialises reads and close().
    """

    name = "nvidia"
    label = "NVIDIA"

    def __init__(self, *, cpu: CpuProbe | None = None, gpus: tuple[int, ...] | None = None) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise ProbeUnavailable(
                "nvidia-ml-py is not installed (pip install 'gpumesh[nvidia]')"
            ) from exc
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise ProbeUnavailable(_init_failure_reason(pynvml, exc)) from exc

        self._nvml = pynvml
        self._warned_memory: set[int] = set()
        self._open(cpu, gpus)

    def _open_devices(self) -> list[OpenedDevice]:
        nvml = self._nvml
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            raise ProbeUnavailable(f"NVML could not count the GPUs: {exc}") from exc
        devices: list[OpenedDevice] = []
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            except nvml.NVMLError as exc:
                # One broken GPU (fallen off the bus, needing a reset) must not hide the
                # healthy ones; it stays out until the daemon restarts.
                log.warning("NVIDIA GPU %d is left out of the inventory: %s", index, exc)
                continue
            name = nvml_query(nvml.nvmlDeviceGetName, handle)
            devices.append(OpenedDevice(index, handle, _text(name) if name else "NVIDIA GPU", uuid))
        if not devices:
            reason = "NVML found no NVIDIA GPU" if count == 0 else "no NVIDIA GPU answered NVML"
            raise ProbeUnavailable(reason)
        self._temperature_call = self._pick_temperature_call(devices[0])
        return devices

    def _read(self, device: OpenedDevice) -> GpuDevice:
        nvml = self._nvml
        handle = device.handle
        try:
            memory = nvml_query(nvml.nvmlDeviceGetMemoryInfo, handle)
            utilization = nvml_query(nvml.nvmlDeviceGetUtilizationRates, handle)
            temperature = nvml_query(self._temperature_call, handle, nvml.NVML_TEMPERATURE_GPU)
            power_mw = nvml_query(nvml.nvmlDeviceGetPowerUsage, handle)
        except nvml.NVMLError as exc:
            raise ProbeError(f"NVIDIA GPU {device.index} ({device.uuid}): {exc}") from exc

        if memory is None:
            # Boards whose memory is the system's (GB10, Jetson) have no VRAM figure. Zero
            # keeps the scheduler from placing VRAM on them until this probe learns more.
            if device.index not in self._warned_memory:
                self._warned_memory.add(device.index)
                log.warning("NVIDIA GPU %d reports no memory size; counted as 0 bytes", device.index)
            total = used = 0
        else:
            # used = total - free. This counts the memory the driver reserves as used (about
            # 615 MiB on an H200, driver 580), whereas nvidia-smi's memory.used and NVML's v2
            # "used" leave it out: no engine can allocate it, so total - used stays what is
            # really free. Expect this figure to exceed nvidia-smi's by memory.reserved.
            total = int(memory.total)
            used = max(0, total - int(memory.free))

        return GpuDevice(
            index=device.index,
            vendor="nvidia",
            name=device.name,
            uuid=device.uuid,
            memory_total_bytes=total,
            memory_used_bytes=used,
            utilization_percent=None if utilization is None else float(utilization.gpu),
            temperature_c=None if temperature is None else float(temperature),
            power_w=None if power_mw is None else power_mw / 1000.0,
        )

    def _pick_temperature_call(self, first: OpenedDevice) -> Callable[[Any, int], int]:
        """nvmlDeviceGetTemperature is deprecated for the versioned call, which older drivers
        lack (or know in an older struct version): use the new one where the driver takes
        it, found once at start on the first GPU."""
        nvml = self._nvml
        versioned = getattr(nvml, "nvmlDeviceGetTemperatureV", None)
        legacy = getattr(nvml, "nvmlDeviceGetTemperature", None)
        if versioned is None or legacy is None:
            return versioned or legacy
        try:
            versioned(first.handle, nvml.NVML_TEMPERATURE_GPU)
        except nvml.NVMLError as exc:
            too_new = {nvml.NVML_ERROR_FUNCTION_NOT_FOUND, getattr(nvml, "NVML_ERROR_ARGUMENT_VERSION_MISMATCH", -1)}
            if exc.value in too_new:
                return legacy
        return versioned

    def _shutdown(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError as exc:
            # Nothing to undo at this point; the daemon is closing the probe anyway.
            log.debug("nvmlShutdown failed: %s", exc)
