"""GPU probes: NVIDIA (NVML), AMD (AMD SMI), and a CPU fallback.

``open_probe()`` picks the probe for this node. Every probe is blocking and cheap enough to
call every ~2 s; the daemon calls it through ``asyncio.to_thread``. Importing this package
imports no vendor library: each probe imports its own when it is opened.
"""

from __future__ import annotations

import logging

from .amd import AmdProbe
from .cpu import CpuProbe
from .nvidia import NvidiaProbe
from .types import GpuDevice, NodeInventory, Probe, ProbeError, ProbeUnavailable, Vendor

__all__ = [
    "PROBE_KINDS",
    "AmdProbe",
    "CpuProbe",
    "GpuDevice",
    "NodeInventory",
    "NvidiaProbe",
    "Probe",
    "ProbeError",
    "ProbeUnavailable",
    "Vendor",
    "open_probe",
]

log = logging.getLogger("gpumesh.probe")

PROBE_KINDS: tuple[str, ...] = ("auto", "nvidia", "amd", "cpu")

# Tried in this order by "auto". NVIDIA first: on a machine with both vendors' libraries but
# only one vendor's GPUs, the other library reports no device and is passed over anyway.
_GPU_PROBES: tuple[type[NvidiaProbe] | type[AmdProbe], ...] = (NvidiaProbe, AmdProbe)


def _describe(probe: Probe) -> str:
    count = getattr(probe, "device_count", 0)
    return f"{probe.name} ({count} GPU{'s' if count != 1 else ''})"


def open_probe(kind: str = "auto") -> Probe:
    """Open the probe for this node.

    ``"auto"`` tries NVIDIA, then AMD, then falls back to the CPU probe, and logs once at
    INFO which probe it chose and why the others were not. ``"nvidia"`` and ``"amd"`` force
    that vendor and raise :class:`ProbeUnavailable` with the reason when it cannot run.
    ``"cpu"`` forces the fallback (a node that should not offer its GPUs). Any other kind is
    a :class:`ValueError`.
    """
    if kind not in PROBE_KINDS:
        raise ValueError(f"unknown probe kind {kind!r}; valid kinds: {', '.join(PROBE_KINDS)}")

    if kind == "cpu":
        log.info("GPU probe: cpu (forced); this node offers no GPUs")
        return CpuProbe()
    if kind != "auto":
        probe_class = NvidiaProbe if kind == "nvidia" else AmdProbe
        probe = probe_class()  # ProbeUnavailable propagates with its reason
        log.info("GPU probe: %s (forced)", _describe(probe))
        return probe

    skipped: list[str] = []
    for probe_class in _GPU_PROBES:
        try:
            probe = probe_class()
        except ProbeUnavailable as exc:
            skipped.append(f"{probe_class.name}: {exc}")
            continue
        not_tried = [c.name for c in _GPU_PROBES[_GPU_PROBES.index(probe_class) + 1 :]]
        suffix = f"; {', '.join(not_tried)} not tried" if not_tried else ""
        passed_over = f"; passed over {'; '.join(skipped)}" if skipped else ""
        log.info("GPU probe: %s, chosen automatically%s%s", _describe(probe), passed_over, suffix)
        return probe

    log.info("GPU probe: cpu fallback, this node offers no GPUs (%s)", "; ".join(skipped))
    return CpuProbe()
