"""Hygon DCUs, through `hy-smi` (Hygon's build of rocm-smi, shipped with the DCU driver/DTK).

`hy-smi ... --json` prints one object per card (`card0`, `card1` ...), with rocm-smi's keys:
memory in MiB ("vram Total Memory (MiB)"; some releases give bytes, "VRAM Total Memory (B)"),
utilisation as "DCU use (%)" or, after DTK 25.04, "HCU use (%)". The card number is the index
that `HIP_VISIBLE_DEVICES` takes.
"""

from __future__ import annotations

import json
from typing import Any

from .tools import ToolProbe, mib, number
from .types import GpuDevice, ProbeError

__all__ = ["HygonProbe", "parse_hy_smi_json"]

QUERY = ("--showproductname", "--showuniqueid", "--showmeminfo", "vram", "--showuse",
         "--showtemp", "--showpower", "--json")


class HygonProbe(ToolProbe):
    name = "hygon"
    label = "Hygon"
    tool = "hy-smi"
    hint = "it comes with the Hygon DCU driver"

    def read_devices(self) -> list[GpuDevice]:
        return parse_hy_smi_json(self.run(*QUERY))


def parse_hy_smi_json(text: str) -> list[GpuDevice]:
    try:
        cards = json.loads(text)
    except ValueError as exc:
        raise ProbeError(f"hy-smi printed something that is not JSON: {exc}") from None
    devices = []
    for key, info in sorted(cards.items(), key=lambda kv: kv[0]):
        if not key.startswith("card") or not key[4:].isdigit() or not isinstance(info, dict):
            continue                                   # "system" and the like
        index = int(key[4:])
        total, used = _memory(info)
        devices.append(GpuDevice(
            index=index, vendor="hygon", name=str(info.get("Card Series") or "Hygon DCU"),
            uuid=str(info.get("Unique ID") or info.get("Serial Number") or f"hygon-{index}"),
            memory_total_bytes=total, memory_used_bytes=min(used, total),
            utilization_percent=number(info.get("DCU use (%)") or info.get("HCU use (%)")),
            temperature_c=_first(info, "Temperature (Sensor junction) (C)",
                                 "Temperature (Sensor core) (C)", "Temperature (Sensor edge) (C)"),
            power_w=_first(info, "Average Graphics Package Power (W)",
                           "Current Socket Graphics Package Power (W)")))
    return devices


def _memory(info: dict[str, Any]) -> tuple[int, int]:
    if "vram Total Memory (MiB)" in info:
        return (mib(info["vram Total Memory (MiB)"]) or 0,
                mib(info.get("vram Total Used Memory (MiB)")) or 0)
    total = number(info.get("VRAM Total Memory (B)"))
    used = number(info.get("VRAM Total Used Memory (B)"))
    return int(total or 0), int(used or 0)


def _first(info: dict[str, Any], *keys: str) -> float | None:
    for key in keys:
        value = number(info.get(key))
        if value is not None:
            return value
    return None
