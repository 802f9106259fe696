"""apply_command's write-protocol conditions: request ids apply once, and create_instance
keeps the replica count and every device's memory within bounds whoever submits it."""

from __future__ import annotations

import msgpack

from gpumesh.mesh.commands import apply_command, empty_state
from gpumesh.mesh.commands.requests import REMEMBERED

GIB = 1 << 30


def _node(node_id: str, ram_gib: int = 16, gpus: tuple[int, ...] = ()) -> dict:
    return {"id": node_id, "name": node_id, "status": "ready",
            "inventory": {"cpu_cores": 8, "memory_total_bytes": ram_gib * GIB,
                          "gpus": [{"index": i, "vendor": "nvidia", "name": "GPU",
                                    "memory_total_bytes": size * GIB}
                                   for i, size in enumerate(gpus)]}}


def _instance(instance_id: str, model: str, node_id: str, device: str = "cpu",
              gib: int = 4, gpu_indices: tuple[int, ...] = ()) -> dict:
    return {"id": instance_id, "model": model, "node_id": node_id, "state": "scheduled",
            "allocation": {"device": device, "memory_bytes": gib * GIB,
                           "gpu_vendor": "nvidia" if device == "gpu" else None,
                           "gpu_indices": list(gpu_indices)}}


def _state(*commands: dict) -> dict:
    state = empty_state()
    for command in commands:
        state, result = apply_command(state, command)
        assert "error" not in result, result
    return state


def _create(instance: dict, **extra) -> dict:
    return {"op": "create_instance", "instance": instance, **extra}


def _cluster(replicas: int = 3) -> dict:
    return _state({"op": "upsert_node", "node": _node("cpu-node", ram_gib=16)},
                  {"op": "upsert_node", "node": _node("gpu-node", ram_gib=8, gpus=(24, 80))},
                  {"op": "create_model", "model": {"name": "m", "backend": "llama.cpp",
                                                   "replicas": replicas}})


# --- request ids -----------------------------------------------------------------------------

def test_a_retried_request_id_applies_once_and_gets_the_first_answer():
    state = _cluster()
    command = _create(_instance("i1", "m", "cpu-node"), rid="r-1")
    once, first = apply_command(state, command)
    assert first["ok"] and set(once["instances"]) == {"i1"}
    twice, again = apply_command(once, command)
    assert again == first                       # the first answer, not "instance_exists"
    assert twice is once                        # and nothing changed
    # A refusal is remembered too: the same rid gets the same refusal.
    refused_state, refusal = apply_command(once, {"op": "delete_model", "name": "x",
                                                  "rid": "r-2"})
    assert refusal["code"] == "model_not_found"
    assert apply_command(refused_state, {"op": "create_model", "rid": "r-2",
                                         "model": {"name": "x", "backend": "b",
                                                   "replicas": 1}})[1] == refusal


def test_commands_without_a_request_id_are_not_remembered():
    state = _cluster()
    new_state, _ = apply_command(state, _create(_instance("i1", "m", "cpu-node")))
    assert new_state.get("requests", {}) == state.get("requests", {})


def test_the_request_table_is_bounded_oldest_first_and_survives_msgpack():
    state = _cluster()
    for n in range(REMEMBERED + 5):
        state, _ = apply_command(state, {"op": "upsert_node", "rid": f"r{n}",
                                         "node": {"id": "cpu-node", "load": n}})
    assert len(state["requests"]) == REMEMBERED
    assert "r0" not in state["requests"] and f"r{REMEMBERED + 4}" in state["requests"]
    # Forgotten: r0 applies again (a retry never comes this late).
    again, _ = apply_command(state, {"op": "upsert_node", "rid": "r0",
                                     "node": {"id": "cpu-node", "load": -1}})
    assert again["nodes"]["cpu-node"]["load"] == -1
    decoded = msgpack.unpackb(msgpack.packb(state, use_bin_type=True), raw=False)
    assert list(decoded["requests"]) == list(state["requests"])   # order kept: oldest first


# --- replicas --------------------------------------------------------------------------------

def test_create_instance_refuses_beyond_the_replica_count():
    state = _cluster(replicas=2)
    state, _ = apply_command(state, _create(_instance("i1", "m", "cpu-node", gib=1)))
    state, _ = apply_command(state, _create(_instance("i2", "m", "cpu-node", gib=1)))
    third, result = apply_command(state, _create(_instance("i3", "m", "cpu-node", gib=1)))
    assert result["code"] == "replicas_reached" and "2 of 2" in result["error"]
    assert third is state


def test_two_leaders_deciding_from_one_view_cannot_both_place():
    # Both saw one missing replica and chose different ids and nodes; only the first commits.
    view = _cluster(replicas=1)
    first = _create(_instance("a", "m", "cpu-node"), rid="leader-1")
    second = _create(_instance("b", "m", "gpu-node"), rid="leader-2")
    state, ok = apply_command(view, first)
    state, refused = apply_command(state, second)
    assert ok["ok"] and refused["code"] == "replicas_reached"
    assert set(state["instances"]) == {"a"}


# --- capacity --------------------------------------------------------------------------------

def test_ram_is_never_promised_twice():
    state = _cluster()
    state, _ = apply_command(state, _create(_instance("i1", "m", "cpu-node", gib=10)))
    _, result = apply_command(state, _create(_instance("i2", "m", "cpu-node", gib=7)))
    assert result["code"] == "no_capacity"
    assert f"the RAM of node cpu-node has {6 * GIB} bytes left" in result["error"]
    _, fits = apply_command(state, _create(_instance("i2", "m", "cpu-node", gib=6)))
    assert fits["ok"]


def test_the_schedulers_reserves_travel_with_the_command():
    state = _cluster()
    limits = {"reserved_memory_bytes": 4 * GIB, "gpu_memory_fraction": 0.9}
    _, result = apply_command(state, _create(_instance("i1", "m", "cpu-node", gib=13),
                                             limits=limits))
    assert result["code"] == "no_capacity"                    # 16 - 4 reserved = 12 left
    _, result = apply_command(state, _create(_instance("i1", "m", "gpu-node", "gpu", 22, (0,)),
                                             limits=limits))
    assert result["code"] == "no_capacity"                    # int(24 GiB * 0.9) < 22 GiB
    _, result = apply_command(state, _create(_instance("i1", "m", "gpu-node", "gpu", 22, (0,))))
    assert result["ok"]                                       # raw capacity: fits


def test_each_gpu_is_counted_on_its_own():
    state = _cluster()
    state, _ = apply_command(state, _create(_instance("i1", "m", "gpu-node", "gpu", 20, (0,))))
    _, full = apply_command(state, _create(_instance("i2", "m", "gpu-node", "gpu", 20, (0,))))
    assert full["code"] == "no_capacity" and "GPU 0" in full["error"]
    _, other = apply_command(state, _create(_instance("i2", "m", "gpu-node", "gpu", 20, (1,))))
    assert other["ok"]
    # CPU instances on the GPU node do not use VRAM, and the other way round.
    _, ram = apply_command(state, _create(_instance("i2", "m", "gpu-node", "cpu", 8)))
    assert ram["ok"]
    _, missing = apply_command(state, _create(_instance("i2", "m", "gpu-node", "gpu", 1, (7,))))
    assert missing["code"] == "no_capacity" and "no GPU 7" in missing["error"]


def test_an_instance_without_an_allocation_claims_nothing():
    state = _cluster()
    bare = {"id": "i1", "model": "m", "node_id": "cpu-node", "state": "scheduled"}
    _, result = apply_command(state, _create(bare))
    assert result["ok"]


def test_bookings_on_several_nodes_are_each_checked():
    # A multi-node plan books memory on every node it spans (the scheduler's `bookings`).
    state = _cluster()
    spread = _instance("big", "m", "gpu-node", "gpu", 20, (1,))
    spread["allocation"]["bookings"] = [
        {"node_id": "gpu-node", "device": "gpu", "gpu_index": 1, "memory_bytes": 70 * GIB},
        {"node_id": "cpu-node", "device": "cpu", "gpu_index": None, "memory_bytes": 12 * GIB}]
    state, ok = apply_command(state, _create(spread))
    assert ok["ok"]
    # The RAM the plan booked on cpu-node counts there, though the instance's node is another.
    _, result = apply_command(state, _create(_instance("i2", "m", "cpu-node", gib=5)))
    assert result["code"] == "no_capacity" and "node cpu-node" in result["error"]
    _, result = apply_command(state, _create(_instance("i2", "m", "gpu-node", "gpu", 11, (1,))))
    assert result["code"] == "no_capacity" and "GPU 1 of node gpu-node" in result["error"]
    _, fits = apply_command(state, _create(_instance("i2", "m", "gpu-node", "gpu", 10, (1,))))
    assert fits["ok"]
