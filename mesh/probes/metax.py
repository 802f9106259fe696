"""MetaX GPUs, through `mx-smi` (the MACA driver's management tool).

`mx-smi` prints an nvidia-smi-like box per GPU:

    | 0       MetaX N260             Off | 0000:01:00.0        | 0%            Native |
    | 37C     29W / 225W              P0 | 666/65536 MiB       | Available            |

(index, name and persistence mode; bus id; utilisation — then temperature and power; memory
used/total). mx-smi's summary gives no UUID: the bus id stands in for it. The index is what
`CUDA_VISIBLE_DEVICES` takes on MACA.
"""

from __future__ import annotations

import re

from .tools import ToolProbe, number, two_row_devices
from .types import GpuDevice

__all__ = ["MetaxProbe", "parse_mx_smi"]

_USED_TOTAL = re.compile(r"(\d+)\s*/\s*(\d+)\s*MiB")


class MetaxProbe(ToolProbe):
    name = "metax"
    label = "MetaX"
    tool = "mx-smi"
    hint = "it comes with the MetaX MACA driver"

    def read_devices(self) -> list[GpuDevice]:
        return parse_mx_smi(self.run())


def parse_mx_smi(text: str) -> list[GpuDevice]:
    devices = []
    for first, second in two_row_devices(text, stop="Process:"):
        head = first[0].split()
        index, name = int(head[0]), " ".join(head[1:-1]) or "MetaX GPU"
        memory = _USED_TOTAL.search(second[1])
        used, total = (int(memory.group(1)) << 20, int(memory.group(2)) << 20) if memory else (0, 0)
        temp_power = second[0].split()
        devices.append(GpuDevice(
            index=index, vendor="metax", name=name, uuid=f"metax-{first[1].lower()}",
            memory_total_bytes=total, memory_used_bytes=min(used, total),
            utilization_percent=number(first[2]),
            temperature_c=number(temp_power[0]) if temp_power else None,
            power_w=number(temp_power[1]) if len(temp_power) > 1 else None))
    return devices
