"""Cambricon MLUs, through `cnmon` (the Neuware driver's management tool).

`cnmon` prints an nvidia-smi-like box per card:

    | 0     /   MLU370-X8    v1.1.6 |         0000:39:00.0 | 0%                N/A |
    |  0%   32C        106 W/ 250 W |     0 MiB/ 23374 MiB | N/A           Default |

(card, VF, name, firmware; bus id — "Inited Driver" in releases before 5.x; utilisation —
then fan, temperature, power; memory used/total). The card number is what
`MLU_VISIBLE_DEVICES` takes. No UUID in the summary: the bus id stands in (the card number
on the old layout, which shows none).
"""

from __future__ import annotations

import re

from .tools import ToolProbe, number, two_row_devices
from .types import GpuDevice

__all__ = ["CambriconProbe", "parse_cnmon"]

_USED_TOTAL = re.compile(r"(\d+)\s*MiB\s*/\s*(\d+)\s*MiB")
_TEMP = re.compile(r"(\d+(?:\.\d+)?)\s*C\b")
_POWER = re.compile(r"(\d+(?:\.\d+)?)\s*W\s*/")
_BUS_ID = re.compile(r"^[0-9A-Fa-f]{4}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.\d$")


class CambriconProbe(ToolProbe):
    name = "cambricon"
    label = "Cambricon"
    tool = "cnmon"
    hint = "it comes with the Cambricon Neuware driver"

    def read_devices(self) -> list[GpuDevice]:
        return parse_cnmon(self.run())


def parse_cnmon(text: str) -> list[GpuDevice]:
    devices = []
    for first, second in two_row_devices(text, stop="Processes:"):
        head = first[0].split()
        index = int(head[0])
        # "0 / MLU370-X8 v1.1.6": the VF column is "/" when the card is not split.
        name = next((f for f in head[1:] if f != "/" and not f.startswith("v")), "Cambricon MLU")
        memory = _USED_TOTAL.search(second[1])
        used, total = (int(memory.group(1)) << 20, int(memory.group(2)) << 20) if memory else (0, 0)
        temp, power = _TEMP.search(second[0]), _POWER.search(second[0])
        bus = first[1] if _BUS_ID.match(first[1]) else None
        devices.append(GpuDevice(
            index=index, vendor="cambricon", name=name,
            uuid=f"cambricon-{bus.lower()}" if bus else f"cambricon-card{index}",
            memory_total_bytes=total, memory_used_bytes=min(used, total),
            utilization_percent=number(first[2]),
            temperature_c=float(temp.group(1)) if temp else None,
            power_w=float(power.group(1)) if power else None))
    return devices
