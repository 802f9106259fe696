"""Check the NVIDIA probe on a real GPU machine and time it. Prints figures; never fails on time.

    PYTHONPATH=<dir holding gpumesh/> python3 bench/gpu_probe_check.py [--calls 100] [--json-out F]

What it prints:
  1. the NvidiaProbe inventory as JSON;
  2. ms per inventory() call over --calls calls (and the CPU probe's share);
  3. NVML's own memory figures (v1 and v2) beside `nvidia-smi`'s, read at the same moment;
  4. whether open_probe("auto") picks NVIDIA, with the log line it wrote;
  5. with PyTorch present: the inventory while 8 GiB are held and matrix products run on GPU 0,
     to see memory, utilisation and power move.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from importlib import metadata

from gpumesh.mesh.probes import CpuProbe, NvidiaProbe, ProbeUnavailable, open_probe

MiB = 1 << 20


def _time_calls(fn, calls: int) -> list[float]:
    fn()  # warm-up: first reads can include driver work the loop should not count
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000.0)
    return samples


def _summary(samples: list[float]) -> str:
    return (
        f"mean {statistics.fmean(samples):.3f} ms, median {statistics.median(samples):.3f} ms, "
        f"min {min(samples):.3f} ms, max {max(samples):.3f} ms"
    )


def _nvidia_smi() -> list[dict[str, str]]:
    if shutil.which("nvidia-smi") is None:
        return []
    fields = ["index", "name", "memory.total", "memory.used", "memory.free", "memory.reserved"]
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        print(f"nvidia-smi failed: {out.stderr.strip() or out.stdout.strip()}")
        return []
    return [dict(zip(fields, (v.strip() for v in line.split(",")))) for line in out.stdout.splitlines()]


def _nvml_memory(index: int) -> dict[str, int | None]:
    import pynvml

    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    v1 = pynvml.nvmlDeviceGetMemoryInfo(handle)
    result: dict[str, int | None] = {"v1_total": v1.total, "v1_used": v1.used, "v1_free": v1.free}
    try:
        v2 = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
        result.update(v2_total=v2.total, v2_reserved=v2.reserved, v2_used=v2.used, v2_free=v2.free)
    except (pynvml.NVMLError, AttributeError) as exc:
        print(f"NVML memory v2 not available: {exc}")
    return result


def _under_load(probe: NvidiaProbe) -> None:
    try:
        import torch
    except ImportError:
        print("torch not installed: load check skipped")
        return
    if not torch.cuda.is_available():
        print("torch sees no GPU: load check skipped")
        return
    before = probe.inventory().gpus[0]
    block = torch.empty(8 << 30, dtype=torch.uint8, device="cuda:0")
    a = torch.randn(8192, 8192, device="cuda:0", dtype=torch.bfloat16)
    stop = threading.Event()

    def burn() -> None:
        while not stop.is_set():
            for _ in range(20):
                a @ a
            torch.cuda.synchronize()

    worker = threading.Thread(target=burn, name="burn")
    worker.start()
    try:
        time.sleep(2.0)  # NVML's utilisation is averaged over its sample period (~1 s)
        during = probe.inventory().gpus[0]
    finally:
        stop.set()
        worker.join()
    del block, a
    torch.cuda.empty_cache()
    print(
        "GPU 0 idle -> under load: "
        f"used {before.memory_used_bytes / MiB:.0f} -> {during.memory_used_bytes / MiB:.0f} MiB "
        f"(+{(during.memory_used_bytes - before.memory_used_bytes) / MiB:.0f} MiB, 8192 MiB held + torch context/workspace), "
        f"util {before.utilization_percent} -> {during.utilization_percent} %, "
        f"power {before.power_w} -> {during.power_w} W, temp {before.temperature_c} -> {during.temperature_c} C"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--json-out", help="also write the inventory JSON to this file")
    args = parser.parse_args()

    import pynvml

    try:
        binding = metadata.version("nvidia-ml-py")
    except metadata.PackageNotFoundError:
        binding = "unknown"
    print(f"python {sys.version.split()[0]}, nvidia-ml-py {binding} ({pynvml.__file__}), {os.cpu_count()} CPUs")

    try:
        probe = NvidiaProbe()
    except ProbeUnavailable as exc:
        print(f"NVIDIA probe unavailable: {exc}")
        return 1
    with probe:
        print(f"driver {pynvml.nvmlSystemGetDriverVersion()}, NVML {pynvml.nvmlSystemGetNVMLVersion()}")
        inventory = probe.inventory()
        text = json.dumps(inventory.to_dict(), indent=2)
        print("== inventory ==")
        print(text)
        if args.json_out:
            with open(args.json_out, "w") as f:
                f.write(text + "\n")

        print(f"== {args.calls} inventory() calls ==")
        samples = _time_calls(probe.inventory, args.calls)
        print(f"NvidiaProbe.inventory(): {_summary(samples)}")
        with CpuProbe() as cpu:
            print(f"CpuProbe.inventory() alone: {_summary(_time_calls(cpu.inventory, args.calls))}")

        print("== memory: probe vs NVML vs nvidia-smi (MiB) ==")
        inv = probe.inventory()
        smi = _nvidia_smi()
        for gpu in inv.gpus:
            nvml = _nvml_memory(gpu.index)
            row = smi[gpu.index] if gpu.index < len(smi) else {}
            print(
                f"GPU {gpu.index}: probe total {gpu.memory_total_bytes / MiB:.0f} used {gpu.memory_used_bytes / MiB:.0f}"
                f" | NVML " + " ".join(f"{k} {v / MiB:.0f}" for k, v in nvml.items() if v is not None)
                + f" | nvidia-smi {row}"
            )

        print("== CPU side ==")
        with open("/proc/meminfo") as f:
            head = " ".join(line.split(":")[0] + "=" + line.split()[1] + "kB" for line in list(f)[:3])
        print(f"cpu_cores {inv.cpu_cores} (os.cpu_count {os.cpu_count()}, affinity {len(os.sched_getaffinity(0))}); "
              f"memory total {inv.memory_total_bytes} available {inv.memory_available_bytes}; /proc/meminfo {head}")

        print("== under load ==")
        _under_load(probe)

    print("== open_probe('auto') ==")
    records: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("gpumesh.probe")
    logger.setLevel(logging.INFO)
    logger.addHandler(_Keep())
    with open_probe("auto") as auto:
        print(f"open_probe('auto') -> {type(auto).__name__}; picks NVIDIA: {isinstance(auto, NvidiaProbe)}")
    for message in records:
        print(f"log: {message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
