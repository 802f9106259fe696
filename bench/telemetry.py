"""What the telemetry sampler costs a node. Prints figures; passes or fails nothing.

    python bench/telemetry.py [--seconds 20] [--probe auto] [--fast-samples 500]

Three measurements, all with the probe `open_probe(--probe)` picks on this machine:
  1. the probe alone: `inventory()` wall time and CPU time per call;
  2. the sampler as the daemon runs it (1 Hz) for --seconds: its thread's CPU time, read by
     the sampler itself (`time.thread_time`) and, independently, from the kernel's
     /proc/self/task/TID/stat; as a share of one core (goal: <= 0.1 %);
  3. the sampler at 10 ms for --fast-samples samples: CPU per sample with less noise, and the
     1 Hz share that implies.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

from gpumesh.mesh.probes import open_probe
from gpumesh.mesh.telemetry import TelemetrySampler

GOAL_CORE_PERCENT = 0.1


def _probe_alone(probe, calls: int) -> None:
    probe.inventory()                            # warm-up
    wall, cpu = [], []
    for _ in range(calls):
        w, c = time.perf_counter(), time.thread_time()
        probe.inventory()
        cpu.append((time.thread_time() - c) * 1000)
        wall.append((time.perf_counter() - w) * 1000)
    print(f"probe {probe.name}: inventory() over {calls} calls: wall median "
          f"{statistics.median(wall):.3f} ms, CPU median {statistics.median(cpu):.3f} ms, "
          f"CPU mean {statistics.fmean(cpu):.3f} ms")


def _kernel_cpu_s(tid: int) -> float | None:
    try:
        fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime


def _sampler_thread(sampler: TelemetrySampler) -> threading.Thread:
    return sampler._thread  # type: ignore[return-value]  # a benchmark may look inside


def _run_sampler(probe, interval_s: float, *, seconds: float | None = None,
                 samples: int | None = None) -> dict:
    sampler = TelemetrySampler(interval_s=interval_s, keep_s=max(600.0, interval_s))
    sampler.start(probe)
    tid = _sampler_thread(sampler).native_id
    started = time.monotonic()
    try:
        while True:
            time.sleep(min(0.2, interval_s * 10))
            cost = sampler.cost()
            if seconds is not None and time.monotonic() - started >= seconds:
                break
            if samples is not None and cost["samples"] >= samples:
                break
        kernel = _kernel_cpu_s(tid)
        cost = sampler.cost()
    finally:
        sampler.stop()
    cost["kernel_thread_cpu_s"] = kernel
    cost["last"] = sampler.latest()
    return cost


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--probe", default="auto")
    parser.add_argument("--fast-samples", type=int, default=500)
    args = parser.parse_args()

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    with open_probe(args.probe) as probe:
        inventory = probe.inventory()
        print(f"probe {probe.name}: {len(inventory.gpus)} GPU(s): "
              + ", ".join(f"{g.index} {g.name}" for g in inventory.gpus))
        _probe_alone(probe, 200)

        slow = _run_sampler(probe, 1.0, seconds=args.seconds)
        print(f"sampler at 1 Hz for {slow['running_s']:.1f} s: {slow['samples']} samples, "
              f"thread CPU {slow['thread_cpu_s'] * 1000:.2f} ms "
              f"(kernel's count {slow['kernel_thread_cpu_s']} s, 10 ms ticks), "
              f"{slow['cpu_ms_per_sample']} ms per sample, "
              f"{slow['core_percent']:.4f} % of a core (goal <= {GOAL_CORE_PERCENT} %)")

        fast = _run_sampler(probe, 0.01, samples=args.fast_samples)
        implied = fast["cpu_ms_per_sample"] / 1000 * 100     # one sample a second
        print(f"sampler at 100 Hz, {fast['samples']} samples: {fast['cpu_ms_per_sample']} ms "
              f"CPU per sample (kernel's count {fast['kernel_thread_cpu_s']} s for "
              f"{fast['thread_cpu_s']:.3f} s measured) -> at 1 Hz {implied:.4f} % of a core")
        verdict = "within" if max(slow["core_percent"], implied) <= GOAL_CORE_PERCENT else "OVER"
        print(f"verdict: {verdict} the {GOAL_CORE_PERCENT} % goal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
