"""GPU probes: NVIDIA (NVML), AMD (AMD SMI), the vendor tools of Ascend, Hygon, Moore Threads,
Iluvatar, MetaX and Cambricon, and a CPU fallback.

``open_probe()`` picks the probe for this node. Every probe is blocking and cheap enough to
call every second (the telemetry sampler does); the daemon calls it off the event loop.
Importing this package imports no vendor library and runs no tool: each probe does that when
it is opened.
"""

from __future__ import annotations

import logging

from .amd import AmdProbe
from .ascend import AscendProbe
from .cambricon import CambriconProbe
from .cpu import CpuProbe
from .hygon import HygonProbe
from .iluvatar import IluvatarProbe
from .metax import MetaxProbe
from .mthreads import MThreadsProbe
from .nvidia import NvidiaProbe
from .tools import ToolProbe
from .types import GpuDevice, NodeInventory, Probe, ProbeError, ProbeUnavailable, Vendor

__all__ = [
    "GPU_PROBES",
    "PROBE_KINDS",
    "AmdProbe",
    "AscendProbe",
    "CambriconProbe",
    "CpuProbe",
    "GpuDevice",
    "HygonProbe",
    "IluvatarProbe",
    "MThreadsProbe",
    "MetaxProbe",
    "NodeInventory",
    "NvidiaProbe",
    "Probe",
    "ProbeError",
    "ProbeUnavailable",
    "ToolProbe",
    "Vendor",
    "open_probe",
]

log = logging.getLogger("gpumesh.probe")

# Tried in this order by "auto". The libraries first (NVML, AMD SMI: no process to start),
# then the vendor tools, each of which is first looked up on PATH (microseconds when absent).
# On a machine with several vendors' software but one vendor's devices, the others report no
# device and are passed over.
GPU_PROBES: dict[str, type[Probe]] = {
    "nvidia": NvidiaProbe,
    "amd": AmdProbe,
    "hygon": HygonProbe,
    "ascend": AscendProbe,
    "mthreads": MThreadsProbe,
    "iluvatar": IluvatarProbe,
    "metax": MetaxProbe,
    "cambricon": CambriconProbe,
}

PROBE_KINDS: tuple[str, ...] = ("auto", *GPU_PROBES, "cpu")


def _describe(probe: Probe) -> str:
    count = getattr(probe, "device_count", 0)
    return f"{probe.name} ({count} GPU{'s' if count != 1 else ''})"


def open_probe(kind: str = "auto", gpus: tuple[int, ...] | None = None) -> Probe:
    """Open the probe for this node.

    ``"auto"`` tries each GPU probe in ``GPU_PROBES`` order, then falls back to the CPU probe,
    and logs once at INFO which probe it chose and why the others were not. A vendor's name
    forces that probe and raises :class:`ProbeUnavailable` with the reason when it cannot run.
    ``"cpu"`` forces the fallback (a node that should not offer its GPUs). Any other kind is
    a :class:`ValueError`.

    ``gpus`` (``--gpus 0,1``) makes the node offer only those device indices; an index the
    vendor did not report is a :class:`ProbeUnavailable`, and so is ``gpus`` on a node where
    no GPU probe found a device (the operator expected GPUs: starting without them would hide
    the mistake).
    """
    if kind not in PROBE_KINDS:
        raise ValueError(f"unknown probe kind {kind!r}; valid kinds: {', '.join(PROBE_KINDS)}")
    if kind == "cpu":
        if gpus is not None:
            raise ProbeUnavailable("--gpus cannot be combined with --gpu-probe cpu")
        log.info("GPU probe: cpu (forced); this node offers no GPUs")
        return CpuProbe()
    if kind != "auto":
        probe = GPU_PROBES[kind](gpus=gpus)   # type: ignore[call-arg]  # ProbeUnavailable propagates
        log.info("GPU probe: %s (forced)%s", _describe(probe), _offered(gpus))
        return probe

    skipped: list[str] = []
    for name, probe_class in GPU_PROBES.items():
        try:
            probe = probe_class(gpus=gpus)    # type: ignore[call-arg]
        except ProbeUnavailable as exc:
            if gpus is not None and "--gpus" in str(exc):
                raise                          # the vendor is here; the indices are wrong
            skipped.append(f"{name}: {exc}")
            continue
        passed_over = f"; passed over {'; '.join(skipped)}" if skipped else ""
        log.info("GPU probe: %s, chosen automatically%s%s", _describe(probe), _offered(gpus),
                 passed_over)
        return probe

    if gpus is not None:
        raise ProbeUnavailable(f"--gpus {','.join(map(str, gpus))} was given, but no GPU probe "
                               f"found a device ({'; '.join(skipped)})")
    log.info("GPU probe: cpu fallback, this node offers no GPUs (%s)", "; ".join(skipped))
    return CpuProbe()


def _offered(gpus: tuple[int, ...] | None) -> str:
    return "" if gpus is None else f", offering only GPUs {','.join(map(str, gpus))} (--gpus)"
