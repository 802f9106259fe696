"""The AMD probe, through AMD SMI's Python interface (the ``amdsmi`` package of ROCm).

Device indices are the order in which AMD SMI enumerates the GPUs (by PCI bus id), over all
physical GPUs of the node, whatever ``HIP_VISIBLE_DEVICES`` the daemon was started with:
the node agent hands GPUs to engines through their own environment, so an index must mean
the same GPU for every process on the node.

Units, as the AMD SMI library returns them: memory total/usage in bytes, temperature in
degrees Celsius, power in watts, activity in percent.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .cpu import CpuProbe
from .types import GpuDevice, ProbeError, ProbeUnavailable
from .vendor import OpenedDevice, VendorProbe

if TYPE_CHECKING:
    from types import ModuleType

__all__ = ["AmdProbe", "amdsmi_query"]

log = logging.getLogger("gpumesh.probe")

T = TypeVar("T")

# amdsmi_status_t codes (amd_smi/amdsmi.h, a stable C ABI) that mean "this device cannot give
# this reading"; anything else propagates as a real failure.
_NON_FATAL_STATUS = frozenset(
    {
        2,  # AMDSMI_STATUS_NOT_SUPPORTED
        3,  # AMDSMI_STATUS_NOT_YET_IMPLEMENTED
        10,  # AMDSMI_STATUS_NO_PERM
        14,  # AMDSMI_STATUS_FILE_ERROR: the sysfs/hwmon file for this sensor is absent
        40,  # AMDSMI_STATUS_NO_DATA
        52,  # AMDSMI_STATUS_FILE_NOT_FOUND
    }
)

# The Python interface writes "N/A" for fields the C library marks as unsupported with an
# all-ones value; some releases leave the raw value in place.
_UNSUPPORTED_VALUES = frozenset({0xFFFF, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF})


def _error_text(exc: BaseException) -> str:
    # AmdSmiLibraryException's str() spans two lines ("Error code:\n\t2 | ..."); the reason
    # an operator reads must be one line.
    info = getattr(exc, "get_error_info", None)
    text = info() if callable(info) else str(exc)
    return " ".join(str(text).split()) or type(exc).__name__


def amdsmi_query(amdsmi: ModuleType, fn: Callable[..., T], *args: Any) -> T | None:
    """Call an AMD SMI function; a reading the device does not offer becomes ``None``."""
    try:
        return fn(*args)
    except amdsmi.AmdSmiLibraryException as exc:
        if exc.get_error_code() in _NON_FATAL_STATUS:
            return None
        raise


def _number(value: Any) -> float | None:
    """A reading as a float, or None for "N/A" and all-ones "unsupported" markers."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if value in _UNSUPPORTED_VALUES:
        return None
    return float(value)


def _import_amdsmi() -> ModuleType:
    # amdsmi loads libamd_smi.so with ctypes while it is being imported. Without ROCm the
    # import prints "Unable to find libamd_smi.so" on stdout and then fails with KeyError
    # (not ImportError). The print is caught so the daemon's output stays clean on every
    # machine without AMD GPUs, and becomes part of the reason instead. This runs once, at
    # start-up, before the daemon starts threads that write to stdout.
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            import amdsmi
    except ImportError as exc:
        if exc.name == "amdsmi":
            raise ProbeUnavailable("amdsmi is not installed (pip install 'gpumesh[amd]')") from exc
        raise ProbeUnavailable(f"amdsmi could not be imported: {exc}") from exc
    except Exception as exc:  # any failure inside amdsmi's import leaves it unusable
        printed = " ".join(captured.getvalue().split())
        detail = printed or f"{type(exc).__name__}: {exc}"
        raise ProbeUnavailable(
            f"amdsmi could not load the AMD SMI library (is ROCm installed?): {detail}"
        ) from exc
    return amdsmi


class AmdProbe(VendorProbe):
    """AMD GPUs through AMD SMI, plus the CPU probe's cores and memory.

    Raises :class:`ProbeUnavailable` with a one-line reason when amdsmi is missing or cannot
    load its library, when AMD SMI cannot start, or when it finds no GPU.
    """

    name = "amd"
    label = "AMD"

    def __init__(self, *, cpu: CpuProbe | None = None, gpus: tuple[int, ...] | None = None) -> None:
        amdsmi = _import_amdsmi()
        try:
            amdsmi.amdsmi_init(amdsmi.AmdSmiInitFlags.INIT_AMD_GPUS)
        except amdsmi.AmdSmiException as exc:
            raise ProbeUnavailable(f"amdsmi_init failed: {_error_text(exc)}") from exc

        self._amdsmi = amdsmi
        self._open(cpu, gpus)


    def _open_devices(self) -> list[OpenedDevice]:
        amdsmi = self._amdsmi
        try:
            handles = amdsmi.amdsmi_get_processor_handles()
        except amdsmi.AmdSmiException as exc:
            raise ProbeUnavailable(f"AMD SMI could not list the GPUs: {_error_text(exc)}") from exc
        devices: list[OpenedDevice] = []
        for index, handle in enumerate(handles):
            try:
                uuid = str(amdsmi.amdsmi_get_gpu_device_uuid(handle))
            except amdsmi.AmdSmiException as exc:
                # One broken GPU must not hide the healthy ones; it stays out until restart.
                log.warning("AMD GPU %d is left out of the inventory: %s", index, _error_text(exc))
                continue
            asic = amdsmi_query(amdsmi, amdsmi.amdsmi_get_gpu_asic_info, handle) or {}
            name = asic.get("market_name")
            if not name or name == "N/A":
                name = "AMD GPU"
            devices.append(OpenedDevice(index, handle, str(name), uuid))
        if not devices:
            reason = "AMD SMI found no AMD GPU" if not handles else "no AMD GPU answered AMD SMI"
            raise ProbeUnavailable(reason)
        return devices

    def _read(self, device: OpenedDevice) -> GpuDevice:
        amdsmi = self._amdsmi
        try:
            total, used = self._memory(device.handle)
            activity = amdsmi_query(amdsmi, amdsmi.amdsmi_get_gpu_activity, device.handle) or {}
            temperature = self._temperature(device.handle)
            power = amdsmi_query(amdsmi, amdsmi.amdsmi_get_power_info, device.handle) or {}
        except amdsmi.AmdSmiException as exc:
            raise ProbeError(f"AMD GPU {device.index} ({device.uuid}): {_error_text(exc)}") from exc
        return GpuDevice(
            index=device.index,
            vendor="amd",
            name=device.name,
            uuid=device.uuid,
            memory_total_bytes=total,
            memory_used_bytes=min(used, total),
            utilization_percent=_number(activity.get("gfx_activity")),
            temperature_c=temperature,
            power_w=self._power(power),
        )

    def _memory(self, handle: Any) -> tuple[int, int]:
        amdsmi = self._amdsmi
        vram = amdsmi.AmdSmiMemoryType.VRAM
        total = amdsmi_query(amdsmi, amdsmi.amdsmi_get_gpu_memory_total, handle, vram)
        used = amdsmi_query(amdsmi, amdsmi.amdsmi_get_gpu_memory_usage, handle, vram)
        if total is not None and used is not None:
            return int(total), int(used)
        # The byte-exact calls go through sysfs; the DRM query behind vram_usage answers where
        # sysfs does not, in MiB.
        usage = amdsmi_query(amdsmi, amdsmi.amdsmi_get_gpu_vram_usage, handle) or {}
        total_mib, used_mib = _number(usage.get("vram_total")), _number(usage.get("vram_used"))
        if total_mib is None or used_mib is None:
            return 0, 0
        return int(total_mib) << 20, int(used_mib) << 20

    def _temperature(self, handle: Any) -> float | None:
        amdsmi = self._amdsmi
        types = amdsmi.AmdSmiTemperatureType
        # The junction ("hotspot") sensor is on the die, like NVIDIA's GPU temperature, and is
        # the one MI200/MI300 expose; consumer boards also have "edge".
        for sensor in (types.HOTSPOT, types.EDGE):
            value = amdsmi_query(
                amdsmi,
                amdsmi.amdsmi_get_temp_metric,
                handle,
                sensor,
                amdsmi.AmdSmiTemperatureMetric.CURRENT,
            )
            reading = _number(value)
            if reading is not None:
                return reading
        return None

    @staticmethod
    def _power(info: dict[str, Any]) -> float | None:
        # Which field holds the reading depends on the release and the board:
        # current_socket_power (MI300 and later), average_socket_power (MI200, Navi), and
        # socket_power, which ROCm 7 fills on Linux too (in 6.4 only on a virtualisation
        # host, in microwatts, hence last). A field the board does not fill reads 0 or an
        # all-ones marker; the first positive number wins.
        for key in ("current_socket_power", "average_socket_power", "socket_power"):
            reading = _number(info.get(key))
            if reading is not None and reading > 0:
                return reading
        return None

    def _shutdown(self) -> None:
        try:
            self._amdsmi.amdsmi_shut_down()
        except self._amdsmi.AmdSmiException as exc:
            log.debug("amdsmi_shut_down failed: %s", _error_text(exc))
