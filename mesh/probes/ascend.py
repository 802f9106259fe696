"""Huawei Ascend NPUs, through `npu-smi` (the management tool of the Ascend driver).

`npu-smi info` prints one box per chip (an NPU card may carry several chips: an Atlas 300I
has four 310s), keyed by NPU id and chip id. Engines select chips by their *logic id*
(`ASCEND_RT_VISIBLE_DEVICES`), which `npu-smi info -m` maps from (NPU id, chip id); that map
does not change while the driver runs, so it is read once. Memory is the chip's HBM where it
has any (910 series), else its DDR (310 series).

npu-smi reports no UUID; the chip's PCI bus id stands in for it (unique and stable on a node).
"""

from __future__ import annotations

import re

from .tools import ToolProbe, mib, number, two_row_devices
from .types import GpuDevice

__all__ = ["AscendProbe", "parse_npu_smi_info", "parse_npu_smi_mapping"]

_SPLIT = re.compile(r"[\s/]+")


class AscendProbe(ToolProbe):
    name = "ascend"
    label = "Ascend"
    tool = "npu-smi"
    hint = "it comes with the Ascend NPU driver"

    def read_devices(self) -> list[GpuDevice]:
        mapping = getattr(self, "_mapping", None)
        if mapping is None:
            mapping = self._mapping = parse_npu_smi_mapping(self.run("info", "-m"))
        return parse_npu_smi_info(self.run("info"), mapping)


def parse_npu_smi_mapping(text: str) -> dict[tuple[int, int], tuple[int, str]]:
    """`npu-smi info -m`: (NPU id, chip id) -> (chip logic id, chip name). Chips without a
    logic id ("-": the card's management MCU) are not devices and are left out."""
    mapping: dict[tuple[int, int], tuple[int, str]] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and all(f.isdigit() for f in fields[:3]):
            mapping[(int(fields[0]), int(fields[1]))] = (int(fields[2]), " ".join(fields[3:]))
    return mapping


def parse_npu_smi_info(text: str, mapping: dict[tuple[int, int], tuple[int, str]]
                       ) -> list[GpuDevice]:
    """`npu-smi info`: one GpuDevice per chip, indexed by logic id (by order of appearance
    when the map is empty: npu-smi releases without `-m`)."""
    has_hbm = "HBM-Usage" in text.split("Process id")[0]
    devices: list[GpuDevice] = []
    for first, second in two_row_devices(text, stop="Process id"):
        npu_fields = first[0].split()
        chip_fields = second[0].split()
        npu, chip = int(npu_fields[0]), int(chip_fields[0]) if chip_fields else 0
        logic, chip_name = mapping.get((npu, chip), (len(devices), ""))
        if mapping and (npu, chip) not in mapping:
            continue                                 # not a compute chip
        power_temp = _SPLIT.split(first[2])           # Power(W) Temp(C) Hugepages used / total
        usage = [f for f in _SPLIT.split(second[2]) if f]   # AICore(%) mem used total [hbm used total]
        memory_used, memory_total = _memory(usage, has_hbm)
        name = chip_name or f"Ascend {' '.join(npu_fields[1:])}".strip()
        devices.append(GpuDevice(
            index=logic, vendor="ascend", name=name, uuid=f"ascend-{second[1].lower()}",
            memory_total_bytes=memory_total, memory_used_bytes=min(memory_used, memory_total),
            utilization_percent=number(usage[0]) if usage else None,
            temperature_c=number(power_temp[1]) if len(power_temp) > 1 else None,
            power_w=number(power_temp[0]) if power_temp else None))
    return devices


def _memory(usage: list[str], has_hbm: bool) -> tuple[int, int]:
    """(used, total) bytes: HBM when the chip has it, else the DDR "Memory-Usage"."""
    pairs = [(mib(usage[i]) or 0, mib(usage[i + 1]) or 0) for i in range(1, len(usage) - 1, 2)]
    if has_hbm and len(pairs) >= 2 and pairs[1][1] > 0:
        return pairs[1]
    return pairs[0] if pairs else (0, 0)
