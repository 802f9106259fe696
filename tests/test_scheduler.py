"""Unit tests for mesh/scheduler.py: placement decisions and their explanations in words."""

from __future__ import annotations

import pytest

from gpumesh.mesh.scheduler import Placement, Scheduler, Unschedulable, format_bytes

GiB = 1 << 30
MiB = 1 << 20


# --- builders in the shapes the scheduler reads --------------------------------------------

def gpu(index: int, total: int, vendor: str = "nvidia", used: int = 0) -> dict:
    return {"index": index, "vendor": vendor, "name": f"{vendor} test GPU {index}",
            "uuid": f"GPU-{vendor}-{index}", "memory_total_bytes": total,
            "memory_used_bytes": used, "utilization_percent": 0}


# What each test backend's installation can do on a node (node["backends"][name]).
CAPABILITIES = {
    "llama.cpp": {"runs_on_cpu": True, "gpu_vendors": ["amd", "nvidia"]},
    "vllm": {"runs_on_cpu": False, "gpu_vendors": ["nvidia"]},
    "cpu-engine": {"runs_on_cpu": True, "gpu_vendors": []},
}


def node(node_id: str, *, ram: int = 16 * GiB, gpus: list[dict] | None = None,
         status: str = "ready", backends: list[str] | None = None, name: str | None = None) -> dict:
    return {
        "id": node_id,
        "name": name or f"host-{node_id}",
        "status": status,
        "backends": {b: CAPABILITIES[b] for b in (backends or ["llama.cpp"])},
        "inventory": {"cpu_cores": 8, "memory_total_bytes": ram,
                      "memory_available_bytes": ram // 2, "gpus": gpus or []},
    }


def model(name: str = "m1", size: int = 2 * GiB, *, backend: str = "llama.cpp") -> dict:
    return {"name": name, "backend": backend, "estimate": {"total_bytes": size}}


def instance(instance_id: str, model_name: str, node_id: str, placement: Placement) -> dict:
    return {"id": instance_id, "model": model_name, "node_id": node_id,
            "state": "running", "allocation": placement.allocation()}


def cpu_alloc(node_id: str, size: int) -> Placement:
    return Placement(node_id, "cpu", size)


def gpu_alloc(node_id: str, size: int, index: int = 0, vendor: str = "nvidia") -> Placement:
    return Placement(node_id, "gpu", size, vendor, (index,))


# Round numbers: no reserve and the whole GPU unless a test says otherwise.
def plain() -> Scheduler:
    return Scheduler(reserved_memory_bytes=0, gpu_memory_fraction=1.0)


# --- basic placements ----------------------------------------------------------------------

def test_cpu_placement_on_a_cpu_only_node():
    placement = plain().place(model(size=2 * GiB), [node("a", ram=8 * GiB)], [])
    assert placement == Placement("a", "cpu", 2 * GiB, None, ())
    assert placement.allocation() == {"device": "cpu", "memory_bytes": 2 * GiB,
                                      "gpu_vendor": None, "gpu_indices": []}


def test_gpu_is_preferred_over_cpu_when_it_fits():
    n = node("a", ram=64 * GiB, gpus=[gpu(0, 8 * GiB)])
    placement = plain().place(model(size=4 * GiB), [n], [])
    assert placement == Placement("a", "gpu", 4 * GiB, "nvidia", (0,))
    assert placement.allocation() == {"device": "gpu", "memory_bytes": 4 * GiB,
                                      "gpu_vendor": "nvidia", "gpu_indices": [0]}


def test_gpu_beats_cpu_even_when_cpu_has_much_more_free_memory():
    nodes = [node("a", ram=512 * GiB), node("b", ram=4 * GiB, gpus=[gpu(0, 8 * GiB)])]
    placement = plain().place(model(size=3 * GiB), nodes, [])
    assert (placement.node_id, placement.device) == ("b", "gpu")


def test_gpu_too_small_falls_back_to_cpu():
    n = node("a", ram=64 * GiB, gpus=[gpu(0, 2 * GiB)])
    placement = plain().place(model(size=4 * GiB), [n], [])
    assert placement == Placement("a", "cpu", 4 * GiB)


def test_the_gpu_that_fits_is_chosen_among_several():
    n = node("a", ram=1 * GiB, gpus=[gpu(0, 2 * GiB), gpu(1, 24 * GiB), gpu(2, 4 * GiB)])
    placement = plain().place(model(size=6 * GiB), [n], [])
    assert placement.gpu_indices == (1,)


def test_the_gpu_with_most_free_memory_wins_on_one_node():
    n = node("a", gpus=[gpu(0, 16 * GiB), gpu(1, 16 * GiB)])
    taken = [instance("x", "other", "a", gpu_alloc("a", 10 * GiB, index=0))]
    placement = plain().place(model(size=2 * GiB), [n], taken)
    assert placement.gpu_indices == (1,)


def test_gpu_vendor_is_recorded():
    n = node("a", ram=1 * GiB, gpus=[gpu(0, 16 * GiB, vendor="amd")])
    placement = plain().place(model(size=2 * GiB), [n], [])
    assert placement.gpu_vendor == "amd"
    assert placement.allocation()["gpu_vendor"] == "amd"


def test_gpu_of_a_vendor_the_backend_cannot_use_is_skipped():
    n = node("a", ram=32 * GiB, gpus=[gpu(0, 80 * GiB, vendor="intel")])
    placement = plain().place(model(size=2 * GiB), [n], [])
    assert placement.device == "cpu"


# --- spreading and memory accounting ------------------------------------------------------

def test_spread_prefers_the_node_with_fewer_replicas_of_this_model():
    nodes = [node("a", ram=64 * GiB), node("b", ram=16 * GiB)]
    existing = [instance("i1", "m1", "a", cpu_alloc("a", 2 * GiB))]
    placement = plain().place(model("m1", 2 * GiB), nodes, existing)
    # a has more free memory, but already runs a replica: b wins.
    assert placement.node_id == "b"


def test_replicas_of_other_models_do_not_count_for_spread():
    nodes = [node("a", ram=64 * GiB), node("b", ram=16 * GiB)]
    existing = [instance("i1", "other", "a", cpu_alloc("a", 2 * GiB))]
    placement = plain().place(model("m1", 2 * GiB), nodes, existing)
    assert placement.node_id == "a"        # most free memory: 62 GiB against 16 GiB


def test_spread_across_three_nodes_by_successive_placements():
    scheduler = plain()
    nodes = [node(n, ram=32 * GiB) for n in ("a", "b", "c")]
    instances: list[dict] = []
    for i in range(6):
        placement = scheduler.place(model("m1", 1 * GiB), nodes, instances)
        assert isinstance(placement, Placement)
        instances.append(instance(f"i{i}", "m1", placement.node_id, placement))
    per_node = {n: sum(1 for i in instances if i["node_id"] == n) for n in ("a", "b", "c")}
    assert per_node == {"a": 2, "b": 2, "c": 2}


def test_memory_of_existing_cpu_allocations_is_counted():
    scheduler = plain()
    nodes = [node("a", ram=6 * GiB)]
    first = scheduler.place(model("m1", 4 * GiB), nodes, [])
    assert first == Placement("a", "cpu", 4 * GiB)
    second = scheduler.place(model("m1", 4 * GiB), nodes,
                             [instance("i1", "m1", "a", first)])
    assert isinstance(second, Unschedulable)
    assert "2.0 GiB RAM free" in second.reason


def test_memory_of_existing_gpu_allocations_is_counted():
    scheduler = plain()
    nodes = [node("a", ram=1 * GiB, gpus=[gpu(0, 10 * GiB)])]
    first = scheduler.place(model("m1", 6 * GiB), nodes, [])
    assert first.device == "gpu"
    second = scheduler.place(model("m2", 6 * GiB), nodes, [instance("i1", "m1", "a", first)])
    assert isinstance(second, Unschedulable)
    assert "GPU 0 has 4.0 GiB free" in second.reason


def test_gpu_allocations_do_not_take_ram_and_vice_versa():
    scheduler = plain()
    n = node("a", ram=8 * GiB, gpus=[gpu(0, 8 * GiB), gpu(1, 8 * GiB)])
    existing = [instance("g", "x", "a", gpu_alloc("a", 7 * GiB, index=0)),
                instance("c", "y", "a", cpu_alloc("a", 7 * GiB))]
    placement = scheduler.place(model("m1", 6 * GiB), [n], existing)
    assert placement.gpu_indices == (1,)      # GPU 0 and RAM are taken, GPU 1 is free


def test_allocations_on_other_nodes_do_not_count_here():
    scheduler = plain()
    nodes = [node("a", ram=6 * GiB)]
    elsewhere = [instance("i1", "x", "b", cpu_alloc("b", 5 * GiB))]
    assert scheduler.place(model("m1", 5 * GiB), nodes, elsewhere) == cpu_alloc("a", 5 * GiB)


def test_multi_gpu_allocation_takes_memory_on_each_listed_gpu():
    scheduler = plain()
    n = node("a", ram=1 * GiB, gpus=[gpu(0, 8 * GiB), gpu(1, 8 * GiB)])
    both = Placement("a", "gpu", 7 * GiB, "nvidia", (0, 1))
    result = scheduler.place(model("m1", 2 * GiB), [n], [instance("i1", "big", "a", both)])
    assert isinstance(result, Unschedulable)


def test_reserved_ram_is_respected():
    n = [node("a", ram=8 * GiB)]
    assert isinstance(Scheduler(reserved_memory_bytes=0).place(model(size=7 * GiB), n, []),
                      Placement)
    refused = Scheduler(reserved_memory_bytes=2 * GiB).place(model(size=7 * GiB), n, [])
    assert isinstance(refused, Unschedulable)
    assert "6.0 GiB RAM free" in refused.reason


def test_default_reserve_is_one_gib():
    scheduler = Scheduler()
    assert scheduler.reserved_memory_bytes == GiB
    n = [node("a", ram=4 * GiB)]
    assert scheduler.place(model(size=3 * GiB), n, []) == cpu_alloc("a", 3 * GiB)
    assert isinstance(scheduler.place(model(size=3 * GiB + 1), n, []), Unschedulable)


def test_gpu_memory_fraction_is_respected():
    n = [node("a", ram=1 * GiB, gpus=[gpu(0, 10 * GiB)])]
    assert Scheduler(gpu_memory_fraction=0.9).place(model(size=9 * GiB), n, []).device == "gpu"
    refused = Scheduler(gpu_memory_fraction=0.5).place(model(size=6 * GiB), n, [])
    assert isinstance(refused, Unschedulable)
    assert "GPU 0 has 5.0 GiB free" in refused.reason


def test_exact_fit_is_accepted():
    assert plain().place(model(size=8 * GiB), [node("a", ram=8 * GiB)], []).node_id == "a"


# --- refusals --------------------------------------------------------------------------------

def test_no_nodes():
    result = plain().place(model(), [], [])
    assert result == Unschedulable("no nodes have joined the cluster")


def test_node_not_ready_is_skipped():
    nodes = [node("a", ram=64 * GiB, status="unreachable"), node("b", ram=8 * GiB)]
    assert plain().place(model(size=2 * GiB), nodes, []).node_id == "b"


def test_only_unready_nodes_is_unschedulable_with_their_status():
    result = plain().place(model("m1"), [node("a", status="unreachable", name="alpha"),
                                         node("b", status="joining", name="beta")], [])
    assert isinstance(result, Unschedulable)
    assert "node alpha: node is unreachable" in result.reason
    assert "node beta: node is joining" in result.reason


def test_node_without_status_is_unknown():
    n = node("a")
    del n["status"]
    result = plain().place(model(), [n], [])
    assert "node is unknown" in result.reason


def test_backend_not_available_on_a_node():
    nodes = [node("a", ram=64 * GiB, backends=["vllm"]), node("b", ram=8 * GiB)]
    assert plain().place(model(size=2 * GiB), nodes, []).node_id == "b"
    result = plain().place(model(size=2 * GiB), nodes[:1], [])
    assert isinstance(result, Unschedulable)
    assert "backend llama.cpp is not available there" in result.reason


def test_cpu_only_backend_on_a_gpu_node_runs_on_cpu():
    n = node("a", ram=16 * GiB, gpus=[gpu(0, 80 * GiB)], backends=["cpu-engine"])
    m = model(size=2 * GiB, backend="cpu-engine")
    placement = plain().place(m, [n], [])
    assert placement == cpu_alloc("a", 2 * GiB)


def test_cpu_only_backend_on_a_gpu_node_without_enough_ram_explains():
    n = node("a", ram=1 * GiB, gpus=[gpu(0, 80 * GiB)], backends=["cpu-engine"])
    m = model(size=2 * GiB, backend="cpu-engine")
    result = plain().place(m, [n], [])
    assert isinstance(result, Unschedulable)
    assert "cpu-engine cannot use nvidia GPUs" in result.reason
    assert "1.0 GiB RAM free for models" in result.reason


def test_gpu_only_backend_on_a_cpu_only_node():
    m = model(size=1 * GiB, backend="vllm")
    result = plain().place(m, [node("a", ram=512 * GiB, backends=["vllm"])], [])
    assert isinstance(result, Unschedulable)
    assert "it has no GPU and vllm needs one" in result.reason


def test_gpu_only_backend_does_not_fall_back_to_cpu():
    m = model(size=4 * GiB, backend="vllm")
    n = node("a", ram=512 * GiB, gpus=[gpu(0, 2 * GiB)], backends=["vllm"])
    result = plain().place(m, [n], [])
    assert isinstance(result, Unschedulable)
    assert "GPU 0 has 2.0 GiB free" in result.reason
    assert "RAM" not in result.reason


def test_gpu_only_backend_goes_to_the_gpu_node():
    m = model(size=4 * GiB, backend="vllm")
    nodes = [node("a", ram=512 * GiB, backends=["vllm"]),
             node("b", ram=8 * GiB, gpus=[gpu(0, 24 * GiB)], backends=["vllm"])]
    assert plain().place(m, nodes, []) == gpu_alloc("b", 4 * GiB)


def test_unschedulable_reason_names_each_node_and_the_bytes():
    nodes = [
        node("n1", ram=3 * GiB, gpus=[gpu(0, 2 * GiB), gpu(1, 1536 * MiB)], name="alpha"),
        node("n2", ram=64 * GiB, status="unreachable", name="beta"),
        node("n3", ram=64 * GiB, backends=["vllm"], name="gamma"),
    ]
    result = plain().place(model("llama-8b", 5 * GiB), nodes, [])
    assert isinstance(result, Unschedulable)
    reason = result.reason
    assert reason.startswith("no node can run llama-8b (needs 5.0 GiB): ")
    assert ("node alpha: GPU 0 has 2.0 GiB free; GPU 1 has 1.5 GiB free; "
            "3.0 GiB RAM free for models") in reason
    assert "node beta: node is unreachable" in reason
    assert "node gamma: backend llama.cpp is not available there" in reason
    # Nodes appear in id order, separated by "; ".
    assert reason.index("alpha") < reason.index("beta") < reason.index("gamma")


def test_repeated_reasons_are_said_once():
    n = node("a", ram=1 * GiB, gpus=[gpu(i, 80 * GiB, vendor="intel") for i in range(4)],
             name="alpha")
    result = plain().place(model(size=2 * GiB), [n], [])
    assert result.reason.count("llama.cpp cannot use intel GPUs") == 1


def test_node_name_falls_back_to_id_in_reasons():
    n = node("node-42", ram=1 * GiB)
    del n["name"]
    result = plain().place(model(size=2 * GiB), [n], [])
    assert "node node-42: " in result.reason


def test_a_node_that_refuses_is_not_named_when_another_accepts():
    nodes = [node("a", ram=1 * GiB), node("b", ram=8 * GiB)]
    assert plain().place(model(size=2 * GiB), nodes, []).node_id == "b"


# --- determinism -----------------------------------------------------------------------------

def test_ties_break_by_node_id_whatever_the_input_order():
    nodes = [node(n, ram=8 * GiB) for n in ("c", "a", "b")]
    assert plain().place(model(), nodes, []).node_id == "a"
    assert plain().place(model(), list(reversed(nodes)), []).node_id == "a"


def test_ties_between_gpus_break_by_lowest_index():
    n = node("a", gpus=[gpu(2, 8 * GiB), gpu(0, 8 * GiB), gpu(1, 8 * GiB)])
    assert plain().place(model(), [n], []).gpu_indices == (0,)


def test_more_free_memory_wins_before_node_id():
    nodes = [node("a", ram=8 * GiB), node("z", ram=9 * GiB)]
    assert plain().place(model(), nodes, []).node_id == "z"


def test_same_inputs_give_the_same_placement_and_reason():
    nodes = [node("b", ram=4 * GiB, gpus=[gpu(0, 4 * GiB)]), node("a", ram=4 * GiB)]
    first = [plain().place(model(size=s), nodes, []) for s in (1 * GiB, 3 * GiB, 9 * GiB)]
    second = [plain().place(model(size=s), list(reversed(nodes)), [])
              for s in (1 * GiB, 3 * GiB, 9 * GiB)]
    assert first == second
    assert first[0] == gpu_alloc("b", 1 * GiB)
    assert isinstance(first[2], Unschedulable)


def test_place_accepts_generators():
    nodes = (n for n in [node("a")])
    instances = (i for i in [])
    assert plain().place(model(), nodes, instances).node_id == "a"


# --- format_bytes ----------------------------------------------------------------------------

@pytest.mark.parametrize("count, words", [
    (0, "0 B"),
    (1, "1 B"),
    (1023, "1023 B"),
    (1024, "1.0 KiB"),
    (1536, "1.5 KiB"),
    (MiB, "1.0 MiB"),
    (5 * GiB, "5.0 GiB"),
    (int(1.25 * GiB), "1.2 GiB"),
    (3 << 40, "3.0 TiB"),
    (2048 << 40, "2048.0 TiB"),
    (-2048, "-2.0 KiB"),
])
def test_format_bytes(count, words):
    assert format_bytes(count) == words


def test_overcommitted_device_is_described_as_zero_free_not_negative():
    # Allocations made under a larger fraction/smaller reserve can exceed what is usable now.
    n = node("a", ram=4 * GiB, gpus=[gpu(0, 10 * GiB)], name="alpha")
    existing = [instance("g", "x", "a", gpu_alloc("a", 10 * GiB)),
                instance("c", "y", "a", cpu_alloc("a", 4 * GiB))]
    result = Scheduler(reserved_memory_bytes=GiB, gpu_memory_fraction=0.9).place(
        model(size=1 * GiB), [n], existing)
    assert isinstance(result, Unschedulable)
    assert "-" not in result.reason.split("needs")[1]
    assert "GPU 0 has 0 B free" in result.reason
    assert "0 B RAM free for models" in result.reason


def test_a_cpu_only_build_on_a_gpu_node_is_not_handed_the_gpu():
    # The same backend, built without GPU support on this node (the PyPI llama.cpp wheel).
    n = node("a", ram=16 * GiB, gpus=[gpu(0, 80 * GiB)])
    n["backends"]["llama.cpp"] = {"runs_on_cpu": True, "gpu_vendors": []}
    assert plain().place(model(size=2 * GiB), [n], []) == cpu_alloc("a", 2 * GiB)
