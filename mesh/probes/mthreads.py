"""Moore Threads GPUs, through `mthreads-gmi` (the MUSA driver's management tool).

`mthreads-gmi -q` prints one section per GPU, opened by a line "GPU<n>" at the left margin,
with nvidia-smi -q style "Key : value" lines: Product Name, GPU UUID, the memory Total/Used
(MiB), Gpu utilisation (%), GPU Current Temp (C) and Power Draw (W). `-q` is read rather than
the CSV query because older releases of the tool lack `--query-gpu`. The section number is
what `MUSA_VISIBLE_DEVICES` takes.
"""

from __future__ import annotations

import re

from .tools import ToolProbe, mib, number
from .types import GpuDevice

__all__ = ["MThreadsProbe", "parse_mthreads_gmi_q"]

_SECTION = re.compile(r"^GPU(\d+)\b", re.MULTILINE)


class MThreadsProbe(ToolProbe):
    name = "mthreads"
    label = "Moore Threads"
    tool = "mthreads-gmi"
    hint = "it comes with the Moore Threads MUSA driver"

    def read_devices(self) -> list[GpuDevice]:
        return parse_mthreads_gmi_q(self.run("-q"))


def parse_mthreads_gmi_q(text: str) -> list[GpuDevice]:
    starts = list(_SECTION.finditer(text))
    devices = []
    for n, start in enumerate(starts):
        end = starts[n + 1].start() if n + 1 < len(starts) else len(text)
        values = _key_values(text[start.end():end])
        index = int(start.group(1))
        total = mib(values.get("Total")) or 0
        used = mib(values.get("Used")) or 0
        devices.append(GpuDevice(
            index=index, vendor="mthreads", name=values.get("Product Name", "Moore Threads GPU"),
            uuid=values.get("GPU UUID") or f"mthreads-{index}",
            memory_total_bytes=total, memory_used_bytes=min(used, total),
            utilization_percent=number(values.get("Gpu")),
            temperature_c=number(values.get("GPU Current Temp")),
            power_w=number(values.get("Power Draw"))))
    return devices


def _key_values(section: str) -> dict[str, str]:
    """First value of each key in a section. The first "Total"/"Used" are the frame buffer's
    (it is listed before any BAR1 or other memory block, as in nvidia-smi -q)."""
    values: dict[str, str] = {}
    for line in section.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and key.strip() not in values:
            values[key.strip()] = value.strip()
    return values
