"""What the probes that read a vendor's command-line tool share: finding the tool, running it
with a deadline, parsing its boxed tables, and the probe lifecycle.

Ascend (`npu-smi`), Hygon (`hy-smi`), Moore Threads (`mthreads-gmi`), Iluvatar (`ixsmi`),
MetaX (`mx-smi`) and Cambricon (`cnmon`) ship their management tool with the driver on every
machine that has their devices; their Python bindings are not on PyPI (or not for every
release). So each of those probes runs its tool and parses the text, with a pure `parse_*`
function per vendor that the tests feed with real outputs.

A missing tool is found by `shutil.which` before anything runs (microseconds): on the machines
that lack the hardware, which is nearly all of them, `open_probe("auto")` stays fast.
"""

from __future__ import annotations

import abc
import os
import re
import signal
import shutil
import subprocess
import threading
from collections.abc import Iterator
from typing import ClassVar

from .cpu import CpuProbe
from .types import GpuDevice, ProbeError, ProbeUnavailable, select_gpus
from .vendor import GpuProbe

__all__ = ["ToolProbe", "boxed_rows", "is_device_record", "mib", "number", "two_row_devices"]

TOOL_TIMEOUT_S = 10.0        # npu-smi takes ~1 s on a busy 8-NPU node; a hung driver never returns


class ToolProbe(GpuProbe):
    """A probe that runs ``tool`` for each reading.

    Subclasses set ``name`` (the probe kind), ``label`` (for messages), ``tool`` (the
    executable), ``hint`` (what installs it) and implement :meth:`read_devices`, which calls
    :meth:`run` and parses. ``tool_path`` overrides the PATH lookup (an operator's install
    in an odd place; tests).
    """

    label: ClassVar[str]
    tool: ClassVar[str]
    hint: ClassVar[str]

    def __init__(self, *, cpu: CpuProbe | None = None, gpus: tuple[int, ...] | None = None,
                 tool_path: str | None = None) -> None:
        path = tool_path or shutil.which(self.tool)
        if path is None:
            raise ProbeUnavailable(f"{self.tool} is not on PATH ({self.hint})")
        self._path = path
        self._lock = threading.Lock()
        self._closed = False
        try:
            devices = self.read_devices()
        except ProbeError as exc:
            raise ProbeUnavailable(str(exc)) from exc
        if not devices:
            raise ProbeUnavailable(f"{self.tool} reported no {self.label} device")
        self._offered = select_gpus([d.index for d in devices], gpus, self.label)
        self._cpu = cpu if cpu is not None else CpuProbe()

    @property
    def device_count(self) -> int:
        return len(self._offered)

    @abc.abstractmethod
    def read_devices(self) -> list[GpuDevice]:
        """Every device the tool reports now (blocking; raises ProbeError)."""

    def run(self, *args: str) -> str:
        """The tool's standard output; ProbeError with a one-line reason if it fails."""
        argv = [self._path, *args]
        shown = " ".join([self.tool, *args])
        try:
            # Its own process group: a tool stuck in the driver is killed with whatever it
            # started, so no orphan keeps our pipes (and this thread) waiting.
            process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       stdin=subprocess.DEVNULL, text=True, errors="replace",
                                       start_new_session=True)
        except OSError as exc:
            raise ProbeError(f"`{shown}` could not run: {exc}") from None
        try:
            stdout, stderr = process.communicate(timeout=TOOL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise ProbeError(f"`{shown}` did not answer within {TOOL_TIMEOUT_S:g} s") from None
        if process.returncode != 0:
            said = " ".join((stderr or stdout).split())[:200] or "no output"
            raise ProbeError(f"`{shown}` exited with status {process.returncode}: {said}")
        return stdout

    def _read_gpus(self) -> tuple[GpuDevice, ...]:
        return tuple(d for d in self.read_devices() if d.index in self._offered)


# --- parsing helpers ---------------------------------------------------------------------------

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def number(text: str | None) -> float | None:
    """The first number in ``text`` ("45C", "88.50 W", "0 %"), or None ("N/A", "-", "")."""
    if text is None:
        return None
    match = _NUMBER.search(text)
    return float(match.group()) if match else None


def mib(text: str | None) -> int | None:
    """A MiB/MB figure ("49152MiB", "16384 MiB", "65520") as bytes; None if there is none."""
    value = number(text)
    return None if value is None else int(value) << 20


def boxed_rows(text: str, *, stop: str) -> Iterator[list[list[str]]]:
    """The device records of an nvidia-smi-style boxed table, as lists of rows of cells.

    Boxes are separated by border lines (``+---+``, ``+===+``, ``|---+``); each box's ``| a | b |``
    lines are one record, cells stripped. Reading ends at the first line containing ``stop``
    (the processes table that follows). Header boxes are returned too: callers skip records
    whose first cell does not start with a digit.
    """
    record: list[list[str]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stop in stripped:
            break
        if stripped.startswith("|") and not stripped.startswith(("|---", "|===")):
            record.append([cell.strip() for cell in stripped.strip("|").split("|")])
            continue
        if record:
            yield record
            record = []
    if record:
        yield record


def is_device_record(record: list[list[str]]) -> bool:
    return bool(record and record[0] and record[0][0][:1].isdigit())


def two_row_devices(text: str, *, stop: str) -> Iterator[tuple[list[str], list[str]]]:
    """The device records of a boxed table that prints each device in two rows (npu-smi,
    cnmon, mx-smi), as (first row, second row); header boxes and other shapes are skipped."""
    for record in boxed_rows(text, stop=stop):
        if len(record) == 2 and is_device_record(record) and len(record[0]) >= 3:
            yield record[0], record[1]
