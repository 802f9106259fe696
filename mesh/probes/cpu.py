"""The CPU probe: cores and memory this process may actually use; no GPUs.

It is both the fallback on machines without a GPU library and the source of the CPU and
memory figures that the GPU probes report. The figures respect the limits a container or a
systemd slice puts on the daemon (CPU affinity, cgroup CPU quota, cgroup memory limit),
because the scheduler must not place an instance on memory the kernel would refuse it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path, PurePosixPath

from .types import NodeInventory, Probe, ProbeError

__all__ = ["CpuProbe"]


@dataclasses.dataclass(frozen=True, slots=True)
class _CgroupDir:
    path: Path
    v2: bool


class CpuProbe(Probe):
    """Cores and memory available to this process, read from Linux's /proc and /sys.

    ``root`` is the directory under which ``proc/`` and ``sys/`` are read: ``/`` in
    production; a container that mounts the host's trees elsewhere, or a test, can point it
    there. (The CPU affinity is always this process's own.) On systems without /proc the
    memory figures come from ``os.sysconf``.
    """

    name = "cpu"

    def __init__(self, *, root: str | os.PathLike[str] = "/") -> None:
        self._root = Path(root)
        # A process's cgroup does not change under a running daemon, so the directories to
        # read are found once; their limit files are read on every inventory() since an
        # operator may change a limit at run time (systemctl set-property, docker update).
        self._cpu_dirs = _cgroup_dirs(self._root, "cpu")
        self._memory_dirs = _cgroup_dirs(self._root, "memory")
        self._closed = False

    def inventory(self) -> NodeInventory:
        if self._closed:
            raise ProbeError("the CPU probe is closed")
        total, available = self.memory()
        return NodeInventory(
            cpu_cores=self.cpu_cores(),
            memory_total_bytes=total,
            memory_available_bytes=available,
            gpus=(),
            probe=self.name,
        )

    def close(self) -> None:
        self._closed = True

    def cpu_cores(self) -> int:
        """CPUs this process may run on, lowered to a cgroup CPU quota where one is set."""
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not Linux
            cores = os.cpu_count() or 1
        quota = self._cpu_quota()
        if quota is not None:
            # A quota of 1.5 CPUs lets 2 threads run, only not all the time: round up, as
            # the Go runtime and the JVM do, and never report zero cores.
            cores = min(cores, max(1, math.ceil(quota)))
        return max(1, cores)

    def memory(self) -> tuple[int, int]:
        """(total, available) bytes for this process: the machine's, lowered by cgroup limits."""
        total, available = self._machine_memory()
        for cg in self._memory_dirs:
            limit = _memory_limit(cg)
            if limit is None or limit >= total:
                continue
            total = limit
            working_set = _memory_working_set(cg)
            if working_set is None:
                available = min(available, limit)
            else:
                available = min(available, max(0, limit - working_set))
        return total, min(available, total)

    def _machine_memory(self) -> tuple[int, int]:
        meminfo = _read_meminfo(self._root / "proc" / "meminfo")
        if "MemTotal" in meminfo:
            total = meminfo["MemTotal"]
            if "MemAvailable" in meminfo:
                available = meminfo["MemAvailable"]
            else:
                # Kernels before 3.14 lack MemAvailable; free plus reclaimable caches is
                # the estimate they used before it existed.
                available = sum(meminfo.get(k, 0) for k in ("MemFree", "Buffers", "Cached"))
            return total, min(available, total)
        return _sysconf_memory()

    def _cpu_quota(self) -> float | None:
        """The tightest CPU quota, in CPUs, along this process's cgroup and its ancestors."""
        quotas: list[float] = []
        for cg in self._cpu_dirs:
            if cg.v2:
                text = _read_text(cg.path / "cpu.max")
                if text is None:
                    continue
                parts = text.split()
                if len(parts) == 2 and parts[0] != "max":
                    quotas.append(int(parts[0]) / int(parts[1]))
            else:
                quota = _read_int(cg.path / "cpu.cfs_quota_us")
                period = _read_int(cg.path / "cpu.cfs_period_us")
                if quota is not None and period and quota > 0:  # -1 means no quota
                    quotas.append(quota / period)
        return min(quotas) if quotas else None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _read_meminfo(path: Path) -> dict[str, int]:
    """/proc/meminfo as bytes per key (the file says kB and means KiB)."""
    text = _read_text(path)
    if text is None:
        return {}
    result: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            scale = 1024 if len(fields) > 1 and fields[1] == "kB" else 1
            result[key.strip()] = int(fields[0]) * scale
    return result


def _sysconf_memory() -> tuple[int, int]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = page * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError) as exc:
        raise ProbeError(f"cannot read this machine's memory size: {exc}") from exc
    try:
        available = page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        # macOS has no SC_AVPHYS_PAGES. Reporting all memory as available keeps the node
        # schedulable; the engines' own out-of-memory errors remain the backstop there.
        available = total
    return total, min(available, total)


def _memory_limit(cg: _CgroupDir) -> int | None:
    if cg.v2:
        text = _read_text(cg.path / "memory.max")
        if text is None or text.strip() == "max":
            return None
        try:
            return int(text.strip())
        except ValueError:
            return None
    # cgroup v1 writes "no limit" as a huge number (PAGE_COUNTER_MAX pages); the caller drops
    # any limit at or above the machine's memory, which covers it.
    return _read_int(cg.path / "memory.limit_in_bytes")


def _memory_working_set(cg: _CgroupDir) -> int | None:
    """Memory charged to the cgroup minus inactive page cache, which the kernel reclaims
    before it would kill anything: the same "working set" that kubelet and docker stats use."""
    usage = _read_int(cg.path / ("memory.current" if cg.v2 else "memory.usage_in_bytes"))
    if usage is None:
        return None
    stat = _read_text(cg.path / "memory.stat") or ""
    key = "inactive_file" if cg.v2 else "total_inactive_file"
    inactive = 0
    for line in stat.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            inactive = int(value)
            break
    return max(0, usage - inactive)


def _unescape_mount_path(path: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes (\040 ...).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def _cgroup_dirs(root: Path, controller: str) -> list[_CgroupDir]:
    """The cgroup directories, this process's own and then each ancestor up to the mount,
    whose ``controller`` files limit this process, on cgroup v2, v1, or a hybrid of both.
    Empty where no cgroup filesystem is readable (not Linux, or /sys not mounted)."""
    membership = _read_text(root / "proc" / "self" / "cgroup")
    mountinfo = _read_text(root / "proc" / "self" / "mountinfo")
    if not membership or not mountinfo:
        return []

    # /proc/self/cgroup: "hierarchy-id:controller,list:/path"; the v2 line is "0::/path".
    v2_path: str | None = None
    v1_path: str | None = None
    for line in membership.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2_path = path
        elif controller in controllers.split(","):
            v1_path = path

    dirs: list[_CgroupDir] = []
    for line in mountinfo.splitlines():
        # "id parent major:minor root mount-point options [optional...] - fstype source super-options"
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        mount_root = _unescape_mount_path(fields[3])
        mount_point = root / _unescape_mount_path(fields[4]).lstrip("/")
        fstype, super_options = rfields[0], rfields[2].split(",")
        if fstype == "cgroup2" and v2_path is not None:
            dirs.extend(_CgroupDir(p, True) for p in _walk_up(mount_root, mount_point, v2_path))
        elif fstype == "cgroup" and v1_path is not None and controller in super_options:
            dirs.extend(_CgroupDir(p, False) for p in _walk_up(mount_root, mount_point, v1_path))
    return dirs


def _walk_up(mount_root: str, mount_point: Path, cgroup_path: str) -> list[Path]:
    """This process's cgroup directory under ``mount_point`` and its ancestors up to it."""
    try:
        relative = PurePosixPath(cgroup_path).relative_to(mount_root)
    except ValueError:
        # The cgroup lies outside what is mounted here (a container that sees the host's
        # path in /proc/self/cgroup but has only its own cgroup mounted): the mount itself is
        # the container's cgroup.
        relative = PurePosixPath(".")
    if ".." in relative.parts:  # a cgroup namespace can show paths above its root
        relative = PurePosixPath(".")
    leaf = mount_point / relative
    if not leaf.is_dir():
        leaf = mount_point
    chain = [leaf]
    while chain[-1] != mount_point and mount_point in chain[-1].parents:
        chain.append(chain[-1].parent)
    return chain
