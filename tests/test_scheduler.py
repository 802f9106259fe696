"""Unit tests for mesh/scheduler: placement decisions and their explanations in words.

Pure functions of plain records, in the shapes the replicated state holds. Models here
carry a plain `total_bytes` estimate (all of it splits over devices), so the numbers stay
round: a 10 GiB model in tensor parallel 2 needs 5 GiB per GPU.
"""

from __future__ import annotations

import random

import pytest

from gpumesh.mesh.scheduler import (Booking, Placement, Requirement, Scheduler, Unschedulable,
                                    bookings_of, format_bytes)

GiB = 1 << 30
MiB = 1 << 20


# --- builders in the shapes the scheduler reads --------------------------------------------

def gpu(index: int, total: int, vendor: str = "nvidia", used: int = 0,
        name: str | None = None) -> dict:
    return {"index": index, "vendor": vendor, "name": name or f"{vendor} test GPU",
            "uuid": f"GPU-{vendor}-{index}", "memory_total_bytes": total,
            "memory_used_bytes": used, "utilization_percent": 0}


# What each test backend's installation can do on a node (node["backends"][name]).
CAPABILITIES = {
    "llama.cpp": {"runs_on_cpu": True, "gpu_vendors": ["amd", "nvidia"],
                  "rpc": {"client": True, "server": True}},
    "vllm": {"runs_on_cpu": False, "gpu_vendors": ["nvidia"]},
    "cpu-engine": {"runs_on_cpu": True, "gpu_vendors": []},
}


def node(node_id: str, *, ram: int = 16 * GiB, available: int | None = None,
         gpus: list[dict] | None = None, status: str = "ready",
         backends: list[str] | None = None, name: str | None = None,
         labels: dict | None = None) -> dict:
    return {
        "id": node_id,
        "name": name or f"host-{node_id}",
        "status": status,
        "labels": labels or {},
        "backends": {b: CAPABILITIES[b] for b in (backends or ["llama.cpp"])},
        "inventory": {"cpu_cores": 8, "memory_total_bytes": ram,
                      "memory_available_bytes": ram if available is None else available,
                      "gpus": gpus or []},
    }


def model(name: str = "m1", size: int = 2 * GiB, *, backend: str = "llama.cpp",
          **placement) -> dict:
    return {"name": name, "backend": backend, "estimate": {"total_bytes": size},
            "placement": placement}


def instance(instance_id: str, model_name: str, placement: Placement) -> dict:
    return {"id": instance_id, "model": model_name, "node_id": placement.node_id,
            "state": "running", "allocation": placement.allocation()}


def cpu_alloc(node_id: str, size: int) -> Placement:
    return Placement(node_id, "cpu", size)


def gpu_alloc(node_id: str, size: int, index: int = 0, vendor: str = "nvidia") -> Placement:
    return Placement(node_id, "gpu", size, vendor, (index,))


# Round numbers: no reserve and the whole GPU unless a test says otherwise.
def plain() -> Scheduler:
    return Scheduler(reserved_memory_bytes=0, gpu_memory_fraction=1.0)


def place(m: dict, nodes: list[dict], instances: list[dict] = ()) -> Placement | Unschedulable:
    return plain().place(m, nodes, list(instances))


def place_replicas(m: dict, nodes: list[dict], count: int,
                   scheduler: Scheduler | None = None) -> list[Placement]:
    """Successive placements, each seeing the ones before (as the reconciler does)."""
    scheduler = scheduler or plain()
    instances: list[dict] = []
    placements = []
    for i in range(count):
        p = scheduler.place(m, nodes, instances)
        assert isinstance(p, Placement), p
        placements.append(p)
        instances.append(instance(f"i{i}", m["name"], p))
    return placements


# --- basic placements ----------------------------------------------------------------------

def test_cpu_placement_on_a_cpu_only_node():
    p = place(model(size=2 * GiB), [node("a", ram=8 * GiB)])
    assert p == Placement("a", "cpu", 2 * GiB, None, ())
    alloc = p.allocation()
    assert (alloc["device"], alloc["memory_bytes"], alloc["gpu_vendor"], alloc["gpu_indices"]) == \
        ("cpu", 2 * GiB, None, [])
    assert alloc["bookings"] == [{"node_id": "a", "device": "cpu", "gpu_index": None,
                                  "memory_bytes": 2 * GiB}]
    assert alloc["workers"] == [] and alloc["tensor_parallel"] == 1
    assert "the CPU of host-a" in p.reason


def test_gpu_is_preferred_over_cpu_when_it_fits():
    p = place(model(size=4 * GiB), [node("a", ram=64 * GiB, gpus=[gpu(0, 8 * GiB)])])
    assert p == Placement("a", "gpu", 4 * GiB, "nvidia", (0,))
    assert p.allocation()["gpu_indices"] == [0]
    assert p.reason.startswith("binpack: GPU 0 (nvidia test GPU) on host-a: 8.0 GiB free")


def test_gpu_beats_cpu_even_when_cpu_has_much_more_free_memory():
    nodes = [node("a", ram=512 * GiB), node("b", ram=4 * GiB, gpus=[gpu(0, 8 * GiB)])]
    p = place(model(size=3 * GiB), nodes)
    assert (p.node_id, p.device) == ("b", "gpu")


def test_gpu_too_small_falls_back_to_cpu_and_says_why():
    p = place(model(size=4 * GiB), [node("a", ram=64 * GiB, gpus=[gpu(0, 2 * GiB)])])
    assert p == Placement("a", "cpu", 4 * GiB)
    assert "needs 4.0 GiB; the largest free GPU has 2.0 GiB on host-a (GPU 0)" in p.reason


def test_binpack_takes_the_tightest_gpu_and_spread_the_roomiest():
    n = node("a", ram=1 * GiB, gpus=[gpu(0, 24 * GiB), gpu(1, 8 * GiB), gpu(2, 4 * GiB)])
    assert place(model(size=6 * GiB), [n]).gpu_indices == (1,)
    spread = place(model(size=6 * GiB, policy="spread"), [n])
    assert spread.gpu_indices == (0,)
    assert "spread: GPU 0" in spread.reason and "the most room" in spread.reason


def test_binpack_takes_the_fullest_node_and_spread_the_emptiest():
    nodes = [node("a", ram=64 * GiB), node("b", ram=8 * GiB), node("c", ram=32 * GiB)]
    assert place(model(size=2 * GiB), nodes).node_id == "b"
    assert place(model(size=2 * GiB, policy="spread"), nodes).node_id == "a"


def test_binpack_fills_one_gpu_before_the_next_for_other_models():
    n = node("a", ram=1 * GiB, gpus=[gpu(0, 16 * GiB), gpu(1, 16 * GiB)])
    first = place(model("x", 6 * GiB), [n])
    second = place(model("y", 6 * GiB), [n], [instance("i", "x", first)])
    assert first.gpu_indices == second.gpu_indices == (0,)


def test_gpu_vendor_is_recorded():
    p = place(model(size=2 * GiB), [node("a", ram=1 * GiB, gpus=[gpu(0, 16 * GiB, vendor="amd")])])
    assert p.gpu_vendor == "amd" and p.allocation()["gpu_vendor"] == "amd"


def test_gpu_of_a_vendor_the_backend_cannot_use_is_skipped():
    n = node("a", ram=32 * GiB, gpus=[gpu(0, 80 * GiB, vendor="intel")])
    assert place(model(size=2 * GiB), [n]).device == "cpu"


# --- replicas spread across nodes ------------------------------------------------------------

def test_a_second_replica_goes_to_another_node_even_under_binpack():
    nodes = [node("a", ram=8 * GiB), node("b", ram=64 * GiB)]
    first, second = place_replicas(model("m1", 2 * GiB), nodes, 2)
    assert (first.node_id, second.node_id) == ("a", "b")


def test_replicas_of_other_models_do_not_count_for_spreading():
    nodes = [node("a", ram=8 * GiB), node("b", ram=64 * GiB)]
    existing = [instance("i1", "other", cpu_alloc("a", 2 * GiB))]
    assert place(model("m1", 2 * GiB), nodes, existing).node_id == "a"


def test_six_replicas_on_three_nodes_are_two_each():
    nodes = [node(n, ram=32 * GiB) for n in ("a", "b", "c")]
    for policy in ("binpack", "spread"):
        placements = place_replicas(model("m1", 1 * GiB, policy=policy), nodes, 6)
        per_node = {n: sum(p.node_id == n for p in placements) for n in "abc"}
        assert per_node == {"a": 2, "b": 2, "c": 2}, policy


def test_a_replica_shares_a_node_when_no_other_fits_and_says_so():
    nodes = [node("a", ram=16 * GiB), node("b", ram=1 * GiB)]
    first, second = place_replicas(model("m1", 4 * GiB), nodes, 2)
    assert first.node_id == second.node_id == "a"
    assert "host-a already runs 1 replica(s) of m1: no other node fits" in second.reason


# --- memory accounting -------------------------------------------------------------------------

def test_memory_of_existing_cpu_allocations_is_counted():
    nodes = [node("a", ram=6 * GiB)]
    first = place(model("m1", 4 * GiB), nodes)
    second = place(model("m1", 4 * GiB), nodes, [instance("i1", "m1", first)])
    assert isinstance(second, Unschedulable)
    assert "4.0 GiB of RAM: the most free is 2.0 GiB on host-a" in second.reason


def test_memory_of_existing_gpu_allocations_is_counted():
    nodes = [node("a", ram=1 * GiB, gpus=[gpu(0, 10 * GiB)])]
    first = place(model("m1", 6 * GiB), nodes)
    second = place(model("m2", 6 * GiB), nodes, [instance("i1", "m1", first)])
    assert isinstance(second, Unschedulable)
    assert "the largest free GPU has 4.0 GiB on host-a (GPU 0)" in second.reason


def test_gpu_allocations_do_not_take_ram_and_vice_versa():
    n = node("a", ram=8 * GiB, gpus=[gpu(0, 8 * GiB), gpu(1, 8 * GiB)])
    existing = [instance("g", "x", gpu_alloc("a", 7 * GiB, index=0)),
                instance("c", "y", cpu_alloc("a", 7 * GiB))]
    assert place(model("m1", 6 * GiB), [n], existing).gpu_indices == (1,)


def test_allocations_on_other_nodes_do_not_count_here():
    elsewhere = [instance("i1", "x", cpu_alloc("b", 5 * GiB))]
    assert place(model("m1", 5 * GiB), [node("a", ram=6 * GiB)], elsewhere) == cpu_alloc("a", 5 * GiB)


def test_a_multi_gpu_allocation_holds_its_memory_on_each_listed_gpu():
    n = node("a", ram=1 * GiB, gpus=[gpu(0, 8 * GiB), gpu(1, 8 * GiB)])
    both = Placement("a", "gpu", 7 * GiB, "nvidia", (0, 1))
    # 1 GiB left on each: a 3 GiB model fits neither one GPU nor both together
    assert isinstance(place(model("m1", 3 * GiB), [n], [instance("i1", "big", both)]),
                      Unschedulable)


def test_records_without_bookings_are_read_from_their_head_fields():
    record = {"id": "old", "model": "x", "node_id": "a",
              "allocation": {"device": "gpu", "memory_bytes": 3 * GiB, "gpu_vendor": "nvidia",
                             "gpu_indices": [0, 2]}}
    assert bookings_of(record) == [Booking("a", "gpu", 0, 3 * GiB), Booking("a", "gpu", 2, 3 * GiB)]
    record["allocation"] = {"device": "cpu", "memory_bytes": GiB}
    assert bookings_of(record) == [Booking("a", "cpu", None, GiB)]


def test_bookings_on_worker_nodes_count_there():
    nodes = [node("a", ram=8 * GiB), node("b", ram=8 * GiB)]
    split = Placement("a", "cpu", 3 * GiB, bookings=(Booking("a", "cpu", None, 3 * GiB),
                                                     Booking("b", "cpu", None, 7 * GiB)),
                      mechanism="llama.cpp-rpc", pipeline_parallel=2)
    assert split.workers() == [{"node_id": "b", "device": "cpu", "gpu_indices": [],
                                "memory_bytes": [7 * GiB]}]
    p = place(model("m1", 4 * GiB), nodes, [instance("big", "x", split)])
    assert p.node_id == "a"       # b has 1 GiB left, a 5 GiB


# --- free memory: the probe's measurement and the bookings, whichever leaves less ----------

def test_a_gpu_that_another_program_fills_is_not_offered():
    # GPUStack #6044: nothing booked, but the probe sees 14 GiB used by someone else.
    n = node("a", ram=1 * GiB, gpus=[gpu(0, 16 * GiB, used=14 * GiB), gpu(1, 16 * GiB)])
    assert place(model(size=4 * GiB), [n]).gpu_indices == (1,)
    busy = node("a", ram=1 * GiB, gpus=[gpu(0, 16 * GiB, used=14 * GiB)])
    refused = place(model(size=4 * GiB), [busy])
    assert "the largest free GPU has 2.0 GiB on host-a (GPU 0)" in refused.reason


def test_bookings_count_when_the_probe_saw_less_in_use():
    # The probe measured before the booked instance started: bookings leave less.
    n = node("a", ram=1 * GiB, gpus=[gpu(0, 16 * GiB, used=1 * GiB)])
    booked = [instance("i", "x", gpu_alloc("a", 10 * GiB))]
    refused = place(model(size=8 * GiB), [n], booked)
    assert "the largest free GPU has 6.0 GiB" in refused.reason


def test_ram_in_use_by_other_programs_is_not_offered():
    n = node("a", ram=32 * GiB, available=3 * GiB)
    refused = place(model(size=4 * GiB), [n])
    assert "the most free is 3.0 GiB on host-a" in refused.reason
    # the heartbeat's newer measurement wins over the inventory's
    n["resources"] = {"memory_available_bytes": 20 * GiB}
    assert place(model(size=4 * GiB), [n]).node_id == "a"


def test_reserved_ram_is_respected():
    n = [node("a", ram=8 * GiB)]
    assert isinstance(Scheduler(reserved_memory_bytes=0).place(model(size=7 * GiB), n, []),
                      Placement)
    refused = Scheduler(reserved_memory_bytes=2 * GiB).place(model(size=7 * GiB), n, [])
    assert "the most free is 6.0 GiB" in refused.reason


def test_default_reserve_is_one_gib_and_the_gpu_fraction_nine_tenths():
    scheduler = Scheduler()
    assert (scheduler.reserved_memory_bytes, scheduler.gpu_memory_fraction) == (GiB, 0.9)
    n = [node("a", ram=4 * GiB)]
    assert scheduler.place(model(size=3 * GiB), n, []) == cpu_alloc("a", 3 * GiB)
    assert isinstance(scheduler.place(model(size=3 * GiB + 1), n, []), Unschedulable)


def test_gpu_memory_fraction_is_respected():
    n = [node("a", ram=1 * GiB, gpus=[gpu(0, 10 * GiB)])]
    assert Scheduler(gpu_memory_fraction=0.9).place(model(size=9 * GiB), n, []).device == "gpu"
    refused = Scheduler(gpu_memory_fraction=0.5).place(model(size=6 * GiB), n, [])
    assert "the largest free GPU has 5.0 GiB" in refused.reason


def test_exact_fit_is_accepted():
    assert place(model(size=8 * GiB), [node("a", ram=8 * GiB)]).node_id == "a"


def test_an_overcommitted_device_is_described_as_zero_free_not_negative():
    n = node("a", ram=4 * GiB, gpus=[gpu(0, 10 * GiB)], name="alpha")
    existing = [instance("g", "x", gpu_alloc("a", 10 * GiB)), instance("c", "y", cpu_alloc("a", 4 * GiB))]
    refused = Scheduler(reserved_memory_bytes=GiB, gpu_memory_fraction=0.9).place(
        model(size=1 * GiB), [n], existing)
    assert "the largest free GPU has 0 B on alpha" in refused.reason
    assert "the most free is 0 B on alpha" in refused.reason
    assert "-" not in refused.reason.replace("cannot place m1", "").replace("llama.cpp", "")


# --- refusals --------------------------------------------------------------------------------

def test_no_nodes():
    assert place(model(), []) == Unschedulable("no nodes have joined the cluster")


def test_a_node_that_is_not_ready_is_skipped():
    nodes = [node("a", ram=64 * GiB, status="unreachable"), node("b", ram=8 * GiB)]
    assert place(model(size=2 * GiB), nodes).node_id == "b"
    draining = [dict(node("a", ram=64 * GiB), draining=True), node("b", ram=8 * GiB)]
    assert place(model(size=2 * GiB), draining).node_id == "b"
    assert "host-a is draining" in place(model(size=2 * GiB), draining[:1]).reason


def test_only_unready_nodes_says_their_states():
    result = place(model("m1"), [node("a", status="unreachable", name="alpha"),
                                 node("b", status="draining", name="beta"),
                                 node("c", status="unreachable", name="gamma")])
    assert "alpha, gamma are unreachable" in result.reason
    assert "beta is draining" in result.reason


def test_a_node_without_status_is_unknown():
    n = node("a")
    del n["status"]
    assert "host-a is unknown" in place(model(), [n]).reason


def test_backend_not_available_on_a_node():
    nodes = [node("a", ram=64 * GiB, backends=["vllm"]), node("b", ram=8 * GiB)]
    assert place(model(size=2 * GiB), nodes).node_id == "b"
    result = place(model(size=2 * GiB), nodes[:1])
    assert "llama.cpp is not available on host-a" in result.reason


def test_many_nodes_are_counted_not_listed():
    nodes = [node(f"n{i:02}", status="unreachable") for i in range(12)]
    reason = place(model(), nodes).reason
    assert "host-n00, host-n01, host-n02 and 9 more are unreachable" in reason


def test_cpu_only_backend_on_a_gpu_node_runs_on_cpu():
    n = node("a", ram=16 * GiB, gpus=[gpu(0, 80 * GiB)], backends=["cpu-engine"])
    assert place(model(size=2 * GiB, backend="cpu-engine"), [n]) == cpu_alloc("a", 2 * GiB)


def test_cpu_only_backend_on_a_gpu_node_without_enough_ram_explains():
    n = node("a", ram=1 * GiB, gpus=[gpu(0, 80 * GiB)], backends=["cpu-engine"])
    result = place(model(size=2 * GiB, backend="cpu-engine"), [n])
    assert "cpu-engine cannot use nvidia GPUs (1 in the cluster)" in result.reason
    assert "2.0 GiB of RAM: the most free is 1.0 GiB on host-a" in result.reason


def test_gpu_only_backend_on_a_cpu_only_node():
    result = place(model(size=1 * GiB, backend="vllm"), [node("a", ram=512 * GiB, backends=["vllm"])])
    assert "no ready GPU that vllm can use" in result.reason
    assert "no ready node runs vllm on its CPU" in result.reason


def test_gpu_only_backend_does_not_fall_back_to_cpu():
    n = node("a", ram=512 * GiB, gpus=[gpu(0, 2 * GiB)], backends=["vllm"])
    result = place(model(size=4 * GiB, backend="vllm"), [n])
    assert "the largest free GPU has 2.0 GiB on host-a (GPU 0)" in result.reason


def test_a_cpu_only_build_on_a_gpu_node_is_not_handed_the_gpu():
    n = node("a", ram=16 * GiB, gpus=[gpu(0, 80 * GiB)])
    n["backends"]["llama.cpp"] = {"runs_on_cpu": True, "gpu_vendors": []}
    assert place(model(size=2 * GiB), [n]) == cpu_alloc("a", 2 * GiB)


def test_device_cpu_keeps_a_model_off_the_gpus_and_device_gpu_off_the_cpu():
    n = node("a", ram=16 * GiB, gpus=[gpu(0, 80 * GiB)])
    assert place(model(size=2 * GiB, device="cpu"), [n]).device == "cpu"
    small = node("a", ram=64 * GiB, gpus=[gpu(0, 1 * GiB)])
    refused = place(model(size=2 * GiB, device="gpu"), [small])
    assert "the deployment asks for GPUs only" in refused.reason


# --- selectors and pinning ------------------------------------------------------------------------

def test_node_selector_matches_labels_with_globs():
    nodes = [node("a", ram=8 * GiB, labels={"zone": "eu-west-1"}),
             node("b", ram=64 * GiB, labels={"zone": "us-east-1"})]
    assert place(model(node_selector={"zone": "eu-*"}), nodes).node_id == "a"
    assert place(model(node_selector={"name": "host-b"}), nodes).node_id == "b"
    refused = place(model(node_selector={"zone": "ap-*"}), nodes)
    assert "the node selector zone=ap-* leaves out host-a, host-b" in refused.reason


def test_gpu_selector_matches_gpu_attributes():
    n = node("a", ram=1 * GiB, gpus=[gpu(0, 80 * GiB, name="NVIDIA H100 80GB"),
                                     gpu(1, 24 * GiB, name="NVIDIA L4")])
    assert place(model(gpu_selector={"name": "*H100*"}), [n]).gpu_indices == (0,)
    assert place(model(gpu_selector={"name": "*L4"}), [n]).gpu_indices == (1,)
    refused = place(model(gpu_selector={"name": "*A100*"}), [n])
    assert "no ready GPU that llama.cpp can use matches the selectors" in refused.reason


def test_gpu_labels_from_the_node_record_are_matched():
    n = node("a", ram=1 * GiB, gpus=[gpu(0, 16 * GiB), gpu(1, 16 * GiB)])
    n["gpu_labels"] = {"1": {"pool": "batch"}}
    assert place(model(gpu_selector={"pool": "batch"}), [n]).gpu_indices == (1,)


def test_pinned_gpus_by_node_and_index_or_uuid():
    nodes = [node("a", ram=1 * GiB, gpus=[gpu(0, 16 * GiB), gpu(1, 16 * GiB)], name="alpha"),
             node("b", ram=1 * GiB, gpus=[gpu(0, 80 * GiB)])]
    p = place(model(size=10 * GiB, gpus=["alpha:1", "a:0"]), nodes)
    assert (p.node_id, p.gpu_indices, p.memory_bytes) == ("a", (0, 1), 5 * GiB)
    assert p.allocation()["tensor_parallel"] == 2
    assert "pinned to GPU 0, 1 on alpha" in p.reason
    by_uuid = place(model(size=1 * GiB, gpus=["GPU-nvidia-1"]), nodes[:1])
    assert by_uuid.gpu_indices == (1,)


def test_pinned_gpus_refuse_with_reasons():
    nodes = [node("a", gpus=[gpu(0, 16 * GiB)], name="alpha"),
             node("b", gpus=[gpu(0, 16 * GiB)], name="beta")]
    assert "no GPU 'alpha:7'" in place(model(gpus=["alpha:7"]), nodes).reason
    assert "must all be on one node" in place(model(gpus=["alpha:0", "beta:0"]), nodes).reason
    short = place(model(size=20 * GiB, gpus=["alpha:0"]), nodes)
    assert "needs 20.0 GiB on each, but on alpha GPU 0 has 16.0 GiB free" in short.reason


# --- several GPUs on one node (tensor parallel) --------------------------------------------------

def test_two_gpus_of_one_node_when_no_single_gpu_fits():
    nodes = [node("a", ram=1 * GiB, gpus=[gpu(0, 16 * GiB), gpu(1, 16 * GiB)], name="node-a",
                  backends=["vllm"]),
             node("b", ram=1 * GiB, gpus=[gpu(0, 15 * GiB)], name="node-b", backends=["vllm"])]
    p = place(model(size=18 * GiB, backend="vllm"), nodes)
    assert (p.node_id, p.gpu_indices, p.memory_bytes, p.mechanism) == \
        ("a", (0, 1), 9 * GiB, "tensor-parallel")
    assert "needs 18.0 GiB; the largest free GPU has 16.0 GiB on node-a (GPU 0)" in p.reason
    assert "two GPUs on node-a (GPUs 0, 1) fit with tensor parallel 2" in p.reason


def test_vllm_uses_powers_of_two_and_llama_cpp_any_count():
    n = node("a", ram=1 * GiB, gpus=[gpu(i, 10 * GiB) for i in range(3)])
    n["backends"]["vllm"] = CAPABILITIES["vllm"]
    assert place(model(size=27 * GiB), [n]).gpu_indices == (0, 1, 2)
    refused = place(model(size=27 * GiB, backend="vllm"), [n])
    assert isinstance(refused, Unschedulable)
    assert "two GPUs on one node would need 13.5 GiB each; the best has 10.0 GiB each" in refused.reason


def test_gpus_per_replica_is_exact():
    n = node("a", ram=1 * GiB, gpus=[gpu(i, 80 * GiB) for i in range(8)], backends=["vllm"])
    p = place(model(size=8 * GiB, backend="vllm", gpus_per_replica=4), [n])
    assert p.gpu_indices == (0, 1, 2, 3) and p.memory_bytes == 2 * GiB


def test_tensor_parallel_binpacks_gpus_within_a_node():
    n = node("a", ram=1 * GiB, gpus=[gpu(0, 40 * GiB), gpu(1, 10 * GiB), gpu(2, 12 * GiB),
                                     gpu(3, 40 * GiB)])
    assert place(model(size=20 * GiB, gpus_per_replica=2), [n]).gpu_indices == (1, 2)
    assert place(model(size=20 * GiB, gpus_per_replica=2, policy="spread"), [n]).gpu_indices == (0, 3)


# --- several nodes --------------------------------------------------------------------------------

def test_vllm_spans_nodes_with_pipeline_stages_over_ray():
    nodes = [node(n, ram=1 * GiB, gpus=[gpu(0, 80 * GiB)], backends=["vllm"], name=f"node-{n}")
             for n in ("a", "b", "c")]
    p = place(model(size=120 * GiB, backend="vllm"), nodes)
    assert (p.mechanism, p.pipeline_parallel, p.memory_bytes) == ("ray-pipeline", 2, 60 * GiB)
    assert {b.node_id for b in p.bookings} == {"a", "b"}
    assert p.allocation()["workers"] == [{"node_id": "b", "device": "gpu", "gpu_indices": [0],
                                          "memory_bytes": [60 * GiB]}]
    assert "two pipeline stages over Ray on node-a, node-b" in p.reason
    assert "needs 120.0 GiB; the largest free GPU has 80.0 GiB" in p.reason


def test_llama_cpp_splits_over_nodes_of_different_vendors_by_free_memory():
    nodes = [node("a", ram=1 * GiB, gpus=[gpu(0, 24 * GiB)], name="big"),
             node("b", ram=1 * GiB, gpus=[gpu(0, 16 * GiB, vendor="amd")], name="small")]
    p = place(model(size=30 * GiB), nodes)
    assert (p.mechanism, p.node_id, p.gpu_vendor) == ("llama.cpp-rpc", "a", "nvidia")
    sizes = {b.node_id: b.memory_bytes for b in p.bookings}
    assert sum(sizes.values()) >= 30 * GiB
    assert sizes["a"] / sizes["b"] == pytest.approx(24 / 16, rel=1e-6)
    assert sizes["a"] <= 24 * GiB and sizes["b"] <= 16 * GiB
    assert "split over two nodes with llama.cpp RPC servers" in p.reason


def test_llama_cpp_splits_over_the_ram_of_cpu_nodes():
    nodes = [node("a", ram=8 * GiB), node("b", ram=8 * GiB), node("c", ram=2 * GiB)]
    p = place(model(size=12 * GiB), nodes)
    assert p.mechanism == "llama.cpp-rpc" and p.device == "cpu"
    assert sorted(b.node_id for b in p.bookings) == ["a", "b"]


def test_rpc_plans_need_a_head_with_an_rpc_client_and_workers_with_rpc_servers():
    def with_rpc(n: dict, client: bool, server: bool) -> dict:
        n["backends"] = {"llama.cpp": {**CAPABILITIES["llama.cpp"],
                                       "rpc": {"client": client, "server": server}}}
        return n

    # The roomiest node has no RPC client: it lends its RAM, a smaller one runs the server.
    nodes = [with_rpc(node("a", ram=9 * GiB), False, True), node("b", ram=6 * GiB),
             with_rpc(node("c", ram=8 * GiB), False, False)]
    p = place(model(size=12 * GiB), nodes)
    assert (p.mechanism, p.node_id) == ("llama.cpp-rpc", "b")
    assert [w["node_id"] for w in p.allocation()["workers"]] == ["a"]     # c can do neither
    # Each booking's share of weights + KV, in the allocation for the head's layer split.
    alloc = p.allocation()
    assert sum(alloc["split_bytes"]) >= 12 * GiB and len(alloc["split_bytes"]) == 2
    assert alloc["split_bytes"][1] / alloc["split_bytes"][0] == pytest.approx(9 / 6, rel=1e-6)
    no_head = place(model(size=12 * GiB), [with_rpc(node(n, ram=8 * GiB), False, True)
                                           for n in "ab"])
    assert "no ready node with room has a llama-server built with RPC" in no_head.reason
    no_worker = place(model(size=12 * GiB), [with_rpc(node(n, ram=8 * GiB), True, False)
                                             for n in "ab"])
    assert "no other ready node with free RAM runs llama.cpp's rpc-server" in no_worker.reason


def test_the_layer_split_follows_llama_cpps_device_order():
    from gpumesh.mesh.rpc_workers import layer_split
    nodes = [node("a", ram=1 * GiB, gpus=[gpu(0, 10 * GiB), gpu(1, 10 * GiB)]),
             node("b", ram=1 * GiB, gpus=[gpu(0, 4 * GiB)]),
             node("c", ram=1 * GiB, gpus=[gpu(0, 6 * GiB)])]
    p = place(model(size=28 * GiB), nodes)
    record = instance("i", "m1", p)
    assert p.node_id == "a" and [w["node_id"] for w in record["allocation"]["workers"]] == ["b", "c"]
    split = layer_split(record)          # workers b, c (their rpc-servers), then a's GPUs 0, 1
    assert len(split) == 4 and sum(split) >= 28 * GiB
    assert [s / split[0] for s in split] == pytest.approx([1, 6 / 4, 10 / 4, 10 / 4], rel=1e-6)


def test_multi_node_can_be_turned_off_and_other_engines_cannot_split():
    nodes = [node("a", ram=8 * GiB), node("b", ram=8 * GiB)]
    refused = place(model(size=12 * GiB, multi_node=False), nodes)
    assert isinstance(refused, Unschedulable) and "RPC" not in refused.reason
    other = place(model(size=12 * GiB, backend="cpu-engine"),
                  [node(n, ram=8 * GiB, backends=["cpu-engine"]) for n in "ab"])
    assert "cpu-engine cannot split one replica over several nodes" in other.reason


def test_an_unsplittable_model_names_every_plan_it_tried():
    nodes = [node(n, ram=4 * GiB, gpus=[gpu(0, 8 * GiB)]) for n in "ab"]
    reason = place(model(size=100 * GiB), nodes).reason
    assert reason.startswith("needs 100.0 GiB; the largest free GPU has 8.0 GiB")
    assert "100.0 GiB of RAM: the most free is 4.0 GiB" in reason
    assert "llama.cpp RPC over the GPUs of up to 16 nodes: together they have 16.0 GiB" in reason


# --- determinism and the index ----------------------------------------------------------------

def test_ties_break_by_node_id_whatever_the_input_order():
    nodes = [node(n, ram=8 * GiB) for n in ("c", "a", "b")]
    assert place(model(), nodes).node_id == "a"
    assert place(model(), list(reversed(nodes))).node_id == "a"
    assert place(model(policy="spread"), nodes).node_id == "a"


def test_ties_between_gpus_break_by_lowest_index():
    n = node("a", gpus=[gpu(2, 8 * GiB), gpu(0, 8 * GiB), gpu(1, 8 * GiB)])
    assert place(model(), [n]).gpu_indices == (0,)


def test_same_inputs_give_the_same_placement_and_reason():
    nodes = [node("b", ram=4 * GiB, gpus=[gpu(0, 4 * GiB)]), node("a", ram=4 * GiB)]
    sizes = (1 * GiB, 3 * GiB, 9 * GiB)
    first = [place(model(size=s), nodes) for s in sizes]
    second = [place(model(size=s), list(reversed(nodes))) for s in sizes]
    assert first == second
    assert [getattr(r, "reason") for r in first] == [getattr(r, "reason") for r in second]
    assert first[0] == gpu_alloc("b", 1 * GiB)
    assert isinstance(first[2], Unschedulable)


def test_incremental_index_matches_a_fresh_one():
    """Random node updates and instance changes, applied copy-on-write as the state does:
    the index that followed them decides exactly as one built from scratch."""
    rng = random.Random(7)
    scheduler = plain()
    nodes = {f"n{i}": node(f"n{i}", ram=rng.choice([8, 16, 32]) * GiB,
                           gpus=[gpu(g, rng.choice([16, 24, 80]) * GiB,
                                     vendor=rng.choice(["nvidia", "amd"])) for g in range(rng.randint(0, 4))])
             for i in range(12)}
    instances: dict = {}
    index = scheduler.new_index()
    for step in range(200):
        action = rng.random()
        if action < 0.5:
            m = model(f"m{rng.randint(0, 5)}", rng.choice([1, 2, 6, 20]) * GiB,
                      policy=rng.choice(["binpack", "spread"]))
            index.sync(nodes, instances)
            p = scheduler.place_in(m, index)
            if isinstance(p, Placement):
                instances = {**instances, f"i{step}": instance(f"i{step}", m["name"], p)}
        elif action < 0.7 and instances:
            victim = rng.choice(sorted(instances))
            instances = {k: v for k, v in instances.items() if k != victim}
        else:
            nid = rng.choice(sorted(nodes))
            changed = dict(nodes[nid], status=rng.choice(["ready", "ready", "unreachable"]))
            nodes = {**nodes, nid: changed}
        index.sync(nodes, instances)
        fresh = scheduler.index_of(nodes, instances)
        probe = model("probe", rng.choice([1, 4, 12, 40]) * GiB)
        assert scheduler.place_in(probe, index) == scheduler.place_in(probe, fresh), step
        assert index.ram_free.items == fresh.ram_free.items
        assert {v: k.items for v, k in index.gpu_free.items() if k.items} == \
            {v: k.items for v, k in fresh.gpu_free.items() if k.items}


def test_many_changed_nodes_are_reindexed_in_bulk_with_the_same_result():
    scheduler = plain()
    nodes = {f"n{i:03}": node(f"n{i:03}", ram=(8 + i % 5) * GiB,
                              gpus=[gpu(0, (16 + i % 7) * GiB)]) for i in range(150)}
    instances = {"x": instance("x", "m", gpu_alloc("n007", 3 * GiB))}
    index = scheduler.index_of(nodes, instances)            # a new leader: bulk build
    nodes = {k: dict(v, status="unreachable" if int(k[1:]) % 3 == 0 else "ready")
             for k, v in nodes.items()}                      # every record rewritten
    index.sync(nodes, instances)
    fresh = scheduler.index_of(nodes, instances)
    assert index.gpu_free["nvidia"].items == fresh.gpu_free["nvidia"].items
    assert index.ram_free.items == fresh.ram_free.items and len(index.ram_free) == 100
    assert scheduler.place_in(model(size=20 * GiB), index) == \
        scheduler.place_in(model(size=20 * GiB), fresh)


def test_place_accepts_generators():
    assert plain().place(model(), (n for n in [node("a")]), (i for i in [])).node_id == "a"


def test_requirement_from_a_per_device_estimate():
    m = {"name": "m", "backend": "vllm==0.11.0",
         "estimate": {"weights_bytes": 10 * GiB, "gpu_weights_bytes": 9 * GiB,
                      "kv_cache_bytes": 2 * GiB, "compute_bytes": GiB,
                      "runtime_bytes": {"gpu": GiB // 2, "cpu": GiB // 4}, "total_bytes": 0}}
    req = Requirement.of(m)
    assert req.engine.multi_node == "ray-pipeline"            # versioned backend names work
    assert req.need("gpu") == 9 * GiB + 2 * GiB + GiB + GiB // 2
    assert req.need("gpu", 0.5) == (11 * GiB) // 2 + GiB + GiB // 2
    assert req.need("cpu") == 12 * GiB + GiB + GiB // 4


# --- format_bytes ----------------------------------------------------------------------------

@pytest.mark.parametrize("count, words", [
    (0, "0 B"), (1, "1 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (MiB, "1.0 MiB"), (5 * GiB, "5.0 GiB"), (int(1.25 * GiB), "1.2 GiB"), (3 << 40, "3.0 TiB"),
    (2048 << 40, "2048.0 TiB"), (-2048, "-2.0 KiB"),
])
def test_format_bytes(count, words):
    assert format_bytes(count) == words


# --- the deploy request's scheduling fields ----------------------------------------------------

def test_scheduling_fields_defaults_and_refusals():
    from gpumesh.mesh.scheduler.spec import SpecError, scheduling_fields
    assert scheduling_fields({}, 2) == {"placement": {}, "min_replicas": None,
                                        "idle_timeout_s": 300.0}
    full = scheduling_fields({"min_replicas": 0, "idle_timeout_s": 30, "placement": {
        "policy": "spread", "device": "gpu", "node_selector": {"zone": "eu-*"},
        "gpu_selector": {"name": "*H100*"}, "gpus_per_replica": 2, "multi_node": False}}, 2)
    assert full["min_replicas"] == 0 and full["placement"]["gpus_per_replica"] == 2
    bad = [({"min_replicas": 3}, "min_replicas"), ({"min_replicas": True}, "min_replicas"),
           ({"idle_timeout_s": 0}, "idle_timeout_s"),
           ({"placement": {"policy": "random"}}, "placement.policy"),
           ({"placement": {"colour": "red"}}, "placement"),
           ({"placement": {"node_selector": {"zone": 1}}}, "placement.node_selector"),
           ({"placement": {"gpus": ["a:0"], "gpus_per_replica": 2}}, "placement.gpus_per_replica"),
           ({"placement": {"device": "cpu", "gpus": ["a:0"]}}, "placement.device"),
           ({"placement": {"gpus_per_replica": 17}}, "placement.gpus_per_replica")]
    for spec, param in bad:
        with pytest.raises(SpecError) as refused:
            scheduling_fields(spec, 2)
        assert refused.value.param == param, spec
