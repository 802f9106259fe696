"""Tests for gpumesh.mesh.probes on a machine without GPUs.

The CPU probe is checked against this machine's own /proc; its cgroup handling against small
file trees laid out as the kernel lays them out. The GPU probes are checked for what they do
here: refuse with a readable reason. Their real readings are checked on a GPU machine by
bench/gpu_probe_check.py.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import msgpack
import pynvml
import pytest

from gpumesh.mesh.probes import (
    PROBE_KINDS,
    AmdProbe,
    CpuProbe,
    GpuDevice,
    NodeInventory,
    NvidiaProbe,
    Probe,
    ProbeError,
    ProbeUnavailable,
    open_probe,
)
from gpumesh.mesh.probes.amd import AmdProbe as _AmdProbe
from gpumesh.mesh.probes.amd import _number
from gpumesh.mesh.probes.nvidia import nvml_query

GiB = 1 << 30


def _meminfo() -> dict[str, int]:
    values = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0]) * 1024
    return values


# --- CPU probe on this machine -------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="needs Linux /proc")
def test_cpu_probe_matches_this_machine() -> None:
    with CpuProbe() as probe:
        before = _meminfo()
        inv = probe.inventory()
        after = _meminfo()

    assert inv.probe == "cpu"
    assert inv.gpus == ()
    assert 1 <= inv.cpu_cores <= (os.cpu_count() or 1)
    assert inv.cpu_cores <= len(os.sched_getaffinity(0))
    assert 0 < inv.memory_total_bytes <= before["MemTotal"]
    assert 0 < inv.memory_available_bytes <= inv.memory_total_bytes
    # A cgroup limit may lower the figures; without one they are /proc/meminfo's, give or take
    # what other processes allocated between the reads.
    if inv.memory_total_bytes == before["MemTotal"]:
        low = min(before["MemAvailable"], after["MemAvailable"]) - 256 * (1 << 20)
        high = max(before["MemAvailable"], after["MemAvailable"]) + 256 * (1 << 20)
        assert low <= inv.memory_available_bytes <= high


def test_cpu_probe_is_cheap_enough_to_poll() -> None:
    import time

    with CpuProbe() as probe:
        start = time.perf_counter()
        for _ in range(50):
            probe.inventory()
        per_call = (time.perf_counter() - start) / 50
    # Polled every ~2 s: a few milliseconds would still be fine; this catches a pathological
    # regression (a subprocess, a sleep), not a slow disk.
    assert per_call < 0.05


def test_inventory_after_close_raises() -> None:
    probe = CpuProbe()
    probe.close()
    probe.close()  # idempotent
    with pytest.raises(ProbeError, match="closed"):
        probe.inventory()


# --- CPU probe against cgroup trees ---------------------------------------------------------


def _fake_root(tmp_path: Path, *, cgroup: str, mountinfo: str, meminfo_kib=(8 * 1024 * 1024, 6 * 1024 * 1024)) -> Path:
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "proc" / "self" / "cgroup").write_text(cgroup)
    (tmp_path / "proc" / "self" / "mountinfo").write_text(mountinfo)
    total, available = meminfo_kib
    (tmp_path / "proc" / "meminfo").write_text(
        f"MemTotal:       {total} kB\nMemFree:        {available // 2} kB\nMemAvailable:   {available} kB\n"
    )
    return tmp_path


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


V2_MOUNTINFO = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"


def test_cgroup_v2_memory_limit_and_cpu_quota(tmp_path: Path) -> None:
    root = _fake_root(tmp_path, cgroup="0::/system.slice/gpumesh.service\n", mountinfo=V2_MOUNTINFO)
    leaf = root / "sys/fs/cgroup/system.slice/gpumesh.service"
    _write(leaf / "memory.max", f"{2 * GiB}\n")
    _write(leaf / "memory.current", f"{3 * GiB // 2}\n")
    _write(leaf / "memory.stat", f"anon 100\nfile 200\ninactive_file {GiB // 2}\nactive_file 7\n")
    _write(leaf / "cpu.max", "50000 100000\n")

    inv = CpuProbe(root=root).inventory()

    assert inv.memory_total_bytes == 2 * GiB
    # limit 2 GiB - (usage 1.5 GiB - reclaimable inactive cache 0.5 GiB)
    assert inv.memory_available_bytes == 1 * GiB
    assert inv.cpu_cores == 1  # half a CPU of quota still runs one thread


def test_cgroup_v2_limit_on_an_ancestor_applies(tmp_path: Path) -> None:
    root = _fake_root(tmp_path, cgroup="0::/kubepods/pod1/ctr\n", mountinfo=V2_MOUNTINFO)
    cg = root / "sys/fs/cgroup"
    _write(cg / "kubepods/pod1/ctr/memory.max", "max\n")
    _write(cg / "kubepods/pod1/ctr/cpu.max", "max 100000\n")
    _write(cg / "kubepods/pod1/memory.max", f"{4 * GiB}\n")
    _write(cg / "kubepods/pod1/memory.current", f"{1 * GiB}\n")
    _write(cg / "kubepods/pod1/memory.stat", "inactive_file 0\n")

    inv = CpuProbe(root=root).inventory()

    assert inv.memory_total_bytes == 4 * GiB
    assert inv.memory_available_bytes == 3 * GiB
    assert inv.cpu_cores == len(os.sched_getaffinity(0))


def test_cgroup_limit_above_machine_memory_is_ignored(tmp_path: Path) -> None:
    # A container's cgroup namespace shows "/" and the mount is the container's own cgroup.
    root = _fake_root(tmp_path, cgroup="0::/\n", mountinfo=V2_MOUNTINFO)
    _write(root / "sys/fs/cgroup/memory.max", f"{64 * GiB}\n")

    inv = CpuProbe(root=root).inventory()

    assert inv.memory_total_bytes == 8 * GiB
    assert inv.memory_available_bytes == 6 * GiB


def test_cgroup_v1_memory_and_cpu(tmp_path: Path) -> None:
    mountinfo = textwrap.dedent(
        """\
        32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
        35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
        41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
        """
    )
    cgroup = "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n0::/\n"
    root = _fake_root(tmp_path, cgroup=cgroup, mountinfo=mountinfo)
    mem = root / "sys/fs/cgroup/memory/docker/abc"
    _write(mem / "memory.limit_in_bytes", f"{3 * GiB}\n")
    _write(mem / "memory.usage_in_bytes", f"{2 * GiB}\n")
    _write(mem / "memory.stat", f"cache 5\ninactive_file 9\ntotal_inactive_file {GiB}\n")
    _write(root / "sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n")
    cpu = root / "sys/fs/cgroup/cpu,cpuacct/docker/abc"
    _write(cpu / "cpu.cfs_quota_us", "100000\n")
    _write(cpu / "cpu.cfs_period_us", "100000\n")
    (root / "sys/fs/cgroup/unified").mkdir(parents=True)

    inv = CpuProbe(root=root).inventory()

    assert inv.memory_total_bytes == 3 * GiB
    assert inv.memory_available_bytes == 2 * GiB
    assert inv.cpu_cores == 1


def test_no_proc_falls_back_to_sysconf(tmp_path: Path) -> None:
    inv = CpuProbe(root=tmp_path).inventory()  # an empty tree: no /proc, no cgroups
    page = os.sysconf("SC_PAGE_SIZE")
    assert inv.memory_total_bytes == page * os.sysconf("SC_PHYS_PAGES")
    assert 0 < inv.memory_available_bytes <= inv.memory_total_bytes
    assert inv.cpu_cores == len(os.sched_getaffinity(0))


# --- choosing a probe -----------------------------------------------------------------------


def test_auto_falls_back_to_cpu_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gpumesh.probe")
    with open_probe() as probe:
        assert isinstance(probe, CpuProbe)
        assert probe.inventory().probe == "cpu"

    records = [r for r in caplog.records if r.name == "gpumesh.probe"]
    assert len(records) == 1
    message = records[0].getMessage()
    assert records[0].levelno == logging.INFO
    assert "cpu fallback" in message
    assert "nvidia: " in message and "NVML" in message
    assert "amd: " in message and "amdsmi" in message


def test_forcing_nvidia_here_raises_a_readable_reason() -> None:
    with pytest.raises(ProbeUnavailable) as info:
        open_probe("nvidia")
    reason = str(info.value)
    assert "NVML" in reason and "no NVIDIA driver" in reason
    assert "\n" not in reason


def test_forcing_amd_here_raises_a_readable_reason() -> None:
    with pytest.raises(ProbeUnavailable) as info:
        open_probe("amd")
    reason = str(info.value)
    assert "amdsmi" in reason
    assert "\n" not in reason


def test_amdsmi_that_cannot_find_its_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # What the real amdsmi wheel does without ROCm: print, then KeyError from its ctypes table.
    package = tmp_path / "amdsmi"
    package.mkdir()
    (package / "__init__.py").write_text(
        'print("Unable to find libamd_smi.so")\n_libraries = {}\n_libraries["libamd_smi.so"].foo\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "amdsmi", raising=False)

    with pytest.raises(ProbeUnavailable) as info:
        _AmdProbe()

    reason = str(info.value)
    assert "Unable to find libamd_smi.so" in reason and "ROCm" in reason
    assert "\n" not in reason
    assert capsys.readouterr().out == ""  # the library's print does not reach the daemon's stdout


def test_cpu_kind_forces_the_fallback(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gpumesh.probe")
    with open_probe("cpu") as probe:
        assert isinstance(probe, CpuProbe)
    assert any("cpu (forced)" in r.getMessage() for r in caplog.records)


def test_unknown_kind_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        open_probe("cuda")
    message = str(info.value)
    assert "'cuda'" in message
    for kind in PROBE_KINDS:
        assert kind in message


def test_probe_classes_share_the_interface() -> None:
    for cls in (CpuProbe, NvidiaProbe, AmdProbe):
        assert issubclass(cls, Probe)
    assert {CpuProbe.name, NvidiaProbe.name, AmdProbe.name} == {"cpu", "nvidia", "amd"}


def test_importing_probes_pulls_in_no_vendor_library_or_daemon_dependency() -> None:
    code = (
        "import sys, gpumesh.mesh.probes; "
        "print(sorted(m for m in ('pynvml', 'amdsmi', 'aiohttp', 'pysyncobj', 'textual', 'gpumesh.tui') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- the NVML error helper -------------------------------------------------------------------


def _raise_nvml(code: int):
    def call(*_args: object) -> int:
        raise pynvml.NVMLError(code)

    return call


def test_nvml_query_turns_unsupported_readings_into_none() -> None:
    for code in (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_NO_PERMISSION, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND):
        assert nvml_query(_raise_nvml(code), "handle") is None
    assert nvml_query(lambda handle, sensor: 41, "handle", 0) == 41


def test_nvml_query_lets_real_failures_through() -> None:
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        nvml_query(_raise_nvml(pynvml.NVML_ERROR_GPU_IS_LOST))
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        nvml_query(_raise_nvml(pynvml.NVML_ERROR_UNINITIALIZED))


def test_amd_readings_drop_unsupported_markers() -> None:
    assert _number(42) == 42.0
    assert _number("N/A") is None
    assert _number(0xFFFF) is None and _number(0xFFFFFFFF) is None
    assert _number(True) is None
    assert _AmdProbe._power({"current_socket_power": "N/A", "average_socket_power": 0, "socket_power": 311}) == 311.0
    assert _AmdProbe._power({"current_socket_power": 0xFFFF}) is None


# --- inventory data --------------------------------------------------------------------------


def _sample_inventory() -> NodeInventory:
    return NodeInventory(
        cpu_cores=16,
        memory_total_bytes=128 * GiB,
        memory_available_bytes=120 * GiB,
        gpus=(
            GpuDevice(0, "nvidia", "NVIDIA H200", "GPU-0a1b", 141 * GiB, 512 << 20, 3.0, 31.0, 74.5),
            GpuDevice(1, "amd", "AMD Instinct MI300X", "a3ff74a0-0000-1000-80ec-3e2b2b6ad7a1", 192 * GiB, 0),
        ),
        probe="nvidia",
    )


def test_inventory_round_trips_through_msgpack() -> None:
    inventory = _sample_inventory()
    data = inventory.to_dict()
    wire = msgpack.unpackb(msgpack.packb(data), raw=False)

    assert wire == data
    assert NodeInventory.from_dict(wire) == inventory
    assert NodeInventory.from_dict(wire).to_dict() == data
    assert data["gpus"][1]["power_w"] is None


def test_from_dict_ignores_fields_from_newer_nodes_and_names_missing_ones() -> None:
    data = _sample_inventory().to_dict()
    data["numa_nodes"] = 2
    data["gpus"][0]["pcie_gen"] = 5
    assert NodeInventory.from_dict(data) == _sample_inventory()

    del data["gpus"][0]["uuid"]
    with pytest.raises(ValueError, match="'uuid'"):
        NodeInventory.from_dict(data)
    with pytest.raises(ValueError, match="'cpu_cores'"):
        NodeInventory.from_dict({"memory_total_bytes": 1})


def test_gpu_vendor_is_checked() -> None:
    with pytest.raises(ValueError, match="vendor"):
        GpuDevice(0, "intel", "Arc", "x", 1, 0)  # type: ignore[arg-type]
    assert GpuDevice(0, "amd", "x", "y", 10, 4).memory_free_bytes == 6
