"""The scheduler at cluster scale: a simulated state (no processes), real decisions.

A cluster of N nodes × 8 GPUs of mixed sizes and vendors (NVIDIA 24/48/80/141 GiB, AMD
64/192 GiB; every node runs llama.cpp, NVIDIA nodes vLLM too) receives 1,000 models of
mixed sizes, engines and replica counts. Each decision is what the leader does for one
model: follow the state (`ClusterIndex.sync`), `reconciler.decide`, then the commands are
applied by the real `apply_command` (timed apart: that is the state machine, not the
scheduler). Prints figures; passes or fails nothing.

Run: `.venv/bin/python bench/scheduler.py [--nodes 10,1000,5000] [--models 1000]`
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import time

from gpumesh.mesh.commands import apply_command, empty_state
from gpumesh.mesh.reconciler import decide
from gpumesh.mesh.scheduler import Scheduler

GiB = 1 << 30
_GPU_KINDS = [("nvidia", "NVIDIA L4", 24), ("nvidia", "NVIDIA L40S", 48),
              ("nvidia", "NVIDIA H100 80GB", 80), ("nvidia", "NVIDIA H200", 141),
              ("amd", "AMD Instinct MI210", 64), ("amd", "AMD Instinct MI300X", 192)]


def make_node(i: int, rng: random.Random) -> dict:
    vendor, name, size = rng.choice(_GPU_KINDS)
    backends = {"llama.cpp": {"runs_on_cpu": True, "gpu_vendors": ["amd", "nvidia"]}}
    if vendor == "nvidia":
        backends["vllm"] = {"runs_on_cpu": False, "gpu_vendors": ["nvidia"]}
    gpus = [{"index": g, "vendor": vendor, "name": name, "uuid": f"GPU-{i}-{g}",
             "memory_total_bytes": size * GiB, "memory_used_bytes": rng.choice([0, 0, 0, GiB])}
            for g in range(8)]
    return {"id": f"node-{i:05d}", "name": f"node-{i:05d}", "status": "ready",
            "labels": {"zone": f"z{i % 4}"}, "backends": backends,
            "inventory": {"cpu_cores": 64, "memory_total_bytes": 512 * GiB,
                          "memory_available_bytes": 480 * GiB, "gpus": gpus}}


def make_model(i: int, rng: random.Random) -> dict:
    size = rng.choice([2, 5, 9, 18, 40, 70, 140]) * GiB
    backend = rng.choice(["llama.cpp", "llama.cpp", "vllm"])
    placement = {"policy": rng.choice(["binpack", "binpack", "spread"])}
    if rng.random() < 0.1:
        placement["node_selector"] = {"zone": "z1"}
    return {"name": f"model-{i:05d}", "backend": backend, "replicas": rng.choice([1, 1, 2, 3]),
            "created": 0.0, "schedule_error": None, "placement": placement,
            "estimate": {"weights_bytes": int(size * 0.8), "kv_cache_bytes": int(size * 0.1),
                         "compute_bytes": int(size * 0.05),
                         "runtime_bytes": {"gpu": int(size * 0.05), "cpu": int(size * 0.05)},
                         "total_bytes": size}}


def run(n_nodes: int, n_models: int, seed: int = 1) -> dict[str, float]:
    rng = random.Random(seed)
    state = empty_state()
    for i in range(n_nodes):
        state, _ = apply_command(state, {"op": "upsert_node", "node": make_node(i, rng)})
    scheduler = Scheduler()
    index = scheduler.new_index()
    started = time.perf_counter()
    index.sync(state["nodes"], state["instances"])
    build_s = time.perf_counter() - started
    ids = itertools.count()
    placed_times: list[float] = []
    placed_cpu: list[float] = []
    refused_times: list[float] = []
    apply_s = 0.0
    models = [make_model(i, rng) for i in range(n_models)]
    wall = time.perf_counter()
    for m in models:
        state, _ = apply_command(state, {"op": "create_model", "model": m})
        for _ in range(m["replicas"]):
            c0, t0 = time.thread_time(), time.perf_counter()
            index.sync(state["nodes"], state["instances"])
            commands = decide(scheduler, state["models"][m["name"]], index, state["models"],
                              1000.0, lambda name: f"{name}-{next(ids)}")
            elapsed, cpu = time.perf_counter() - t0, time.thread_time() - c0
            placed = any(c["op"] == "create_instance" for c in commands)
            (placed_times if placed else refused_times).append(elapsed)
            if placed:
                placed_cpu.append(cpu)
            t1 = time.perf_counter()
            for command in commands:
                state, _ = apply_command(state, command)
            apply_s += time.perf_counter() - t1
            if not placed:
                break
    wall_s = time.perf_counter() - wall
    return {"nodes": n_nodes, "gpus": n_nodes * 8, "index_build_ms": build_s * 1e3,
            "placed": len(placed_times), "refused": len(refused_times),
            "placed_mean_ms": _ms(statistics.fmean, placed_times),
            "placed_p50_ms": _ms(lambda t: statistics.quantiles(t, n=100)[49], placed_times),
            "placed_p99_ms": _ms(lambda t: statistics.quantiles(t, n=100)[98], placed_times),
            "placed_cpu_mean_ms": _ms(statistics.fmean, placed_cpu),
            "refused_mean_ms": _ms(statistics.fmean, refused_times),
            "wall_s": wall_s, "apply_s": apply_s}


def _ms(stat, times: list[float]) -> float:
    return stat(times) * 1e3 if len(times) >= 2 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="10,1000,5000")
    parser.add_argument("--models", type=int, default=1000)
    args = parser.parse_args()
    print(f"{args.models} models (1-3 replicas each) onto N nodes × 8 GPUs; times per decision "
          f"(index sync + decide), the state machine's apply timed apart.\n"
          f"mean/p50/p99: wall clock; cpu: this thread's CPU time (other processes' preemption "
          f"left out); build: a new leader's first index")
    header = ("nodes", "GPUs", "build ms", "placed", "refused", "mean ms", "p50 ms", "p99 ms",
              "cpu ms", "refused ms", "wall s", "apply s")
    print(" ".join(f"{h:>10}" for h in header))
    for n in (int(x) for x in args.nodes.split(",")):
        r = run(n, args.models)
        print(" ".join(f"{v:>10.3f}" if isinstance(v, float) else f"{v:>10}" for v in r.values()))


if __name__ == "__main__":
    main()
