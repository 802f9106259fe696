"""Iluvatar CoreX GPUs, through `ixsmi` (Iluvatar's nvidia-smi, with the same query flags).

`ixsmi --query-gpu=... --format=csv,noheader` prints one line per GPU in the order of the
fields asked for; values may carry units ("16384 MiB", "0 %", "30 C"), which are dropped.
The index is what `CUDA_VISIBLE_DEVICES` takes on CoreX.
"""

from __future__ import annotations

import csv

from .tools import ToolProbe, mib, number
from .types import GpuDevice

__all__ = ["FIELDS", "IluvatarProbe", "parse_smi_csv"]

FIELDS = ("index", "uuid", "name", "memory.total", "memory.used", "utilization.gpu",
          "temperature.gpu", "power.draw")


class IluvatarProbe(ToolProbe):
    name = "iluvatar"
    label = "Iluvatar"
    tool = "ixsmi"
    hint = "it comes with the Iluvatar CoreX driver"

    def read_devices(self) -> list[GpuDevice]:
        output = self.run(f"--query-gpu={','.join(FIELDS)}", "--format=csv,noheader")
        return parse_smi_csv(output, FIELDS, vendor="iluvatar")


def parse_smi_csv(text: str, fields: tuple[str, ...], *, vendor: str) -> list[GpuDevice]:
    """nvidia-smi-style CSV rows of ``fields`` (which must include index, name and the two
    memory fields; uuid, utilisation, temperature and power are optional)."""
    devices = []
    for row in csv.reader(line for line in text.splitlines() if line.strip()):
        if len(row) != len(fields):
            continue
        value = dict(zip(fields, (cell.strip() for cell in row)))
        if not value["index"].isdigit():
            continue
        index = int(value["index"])
        total = mib(value["memory.total"]) or 0
        used = mib(value["memory.used"]) or 0
        devices.append(GpuDevice(
            index=index, vendor=vendor, name=value["name"],   # type: ignore[arg-type]
            uuid=value.get("uuid") or f"{vendor}-{index}",
            memory_total_bytes=total, memory_used_bytes=min(used, total),
            utilization_percent=number(value.get("utilization.gpu")),
            temperature_c=number(value.get("temperature.gpu")),
            power_w=number(value.get("power.draw"))))
    return devices
