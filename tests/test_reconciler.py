"""The leader's decisions (`reconciler.decide`) on a real state machine, without Raft.

Each step is what one reconciler pass does for one model: decide on the current state,
apply the commands with the same `apply_command` every node runs, and look again. Covers
replica counts, the on-demand (scale to zero) rule and LRU eviction of idle instances.
"""

from __future__ import annotations

import itertools

from gpumesh.mesh.commands import apply_command, empty_state
from gpumesh.mesh.reconciler import HANDOVER_S, decide
from gpumesh.mesh.scheduler import Scheduler
from gpumesh.mesh.scheduler.demand import BUSY_LEASE_S, is_active, is_busy, wanted_replicas

from test_scheduler import GiB, node

NOW = 1_000_000.0


class Cluster:
    """A state plus the reconciler's index, advanced by applying decided commands."""

    def __init__(self, *nodes: dict) -> None:
        self.state = empty_state()
        self.scheduler = Scheduler(reserved_memory_bytes=0, gpu_memory_fraction=1.0)
        self.index = self.scheduler.new_index()
        self.ids = itertools.count()
        for n in nodes:
            self.apply({"op": "upsert_node", "node": n})

    def apply(self, command: dict) -> dict:
        self.state, result = apply_command(self.state, command)
        assert "error" not in result, result
        return result

    def deploy(self, name: str, size: int, *, replicas: int = 1, **fields) -> None:
        model = {"name": name, "backend": "llama.cpp", "replicas": replicas, "created": 0.0,
                 "estimate": {"total_bytes": size}, "schedule_error": None, **fields}
        self.apply({"op": "create_model", "model": model})

    def step(self, name: str, now: float = NOW) -> list[dict]:
        self.index.sync(self.state["nodes"], self.state["instances"])
        commands = decide(self.scheduler, self.state["models"][name], self.index,
                          self.state["models"], now, lambda m: f"{m}-{next(self.ids)}")
        for command in commands:
            self.apply(command)
        return commands

    def settle(self, name: str, now: float = NOW, limit: int = 20) -> None:
        for _ in range(limit):
            if not self.step(name, now):
                return
        raise AssertionError(f"{name} did not settle in {limit} steps")

    def instances_of(self, name: str) -> list[dict]:
        return sorted((i for i in self.state["instances"].values() if i["model"] == name),
                      key=lambda i: i["id"])

    def run(self, name: str) -> None:
        """As the node agent would report: every instance of the model is running."""
        for i in self.instances_of(name):
            self.apply({"op": "update_instance", "id": i["id"], "changes": {"state": "running"}})


def test_one_instance_per_step_until_the_count_is_reached():
    c = Cluster(node("a", ram=32 * GiB), node("b", ram=32 * GiB))
    c.deploy("m", 2 * GiB, replicas=2)
    first = c.step("m")
    assert [cmd["op"] for cmd in first] == ["create_instance"]
    created = first[0]["instance"]
    assert created["state"] == "scheduled" and created["allocation"]["bookings"]
    assert created["placement_reason"].startswith("binpack: the CPU of host-a")
    c.settle("m")
    assert sorted(i["node_id"] for i in c.instances_of("m")) == ["a", "b"]


def test_an_unschedulable_model_records_why_once_and_clears_it_when_it_fits():
    c = Cluster(node("a", ram=4 * GiB))
    c.deploy("big", 8 * GiB)
    assert c.step("big")[0]["changes"]["schedule_error"].startswith("needs 8.0 GiB of RAM")
    assert c.step("big") == []                      # the same reason is not written again
    c.apply({"op": "upsert_node", "node": node("b", ram=16 * GiB)})
    c.settle("big")
    assert c.state["models"]["big"]["schedule_error"] is None
    assert [i["node_id"] for i in c.instances_of("big")] == ["b"]


def test_scaling_down_removes_what_is_not_running_first_then_the_newest():
    c = Cluster(node("a", ram=32 * GiB), node("b", ram=32 * GiB), node("c", ram=32 * GiB))
    c.deploy("m", GiB, replicas=3)
    c.settle("m")
    oldest = c.instances_of("m")[0]["id"]
    c.run("m")
    c.apply({"op": "update_instance", "id": oldest, "changes": {"state": "error"}})
    c.apply({"op": "update_model", "name": "m", "changes": {"replicas": 2}})
    assert c.step("m") == [{"op": "delete_instance", "id": oldest}]


# --- on demand: scale to zero --------------------------------------------------------------

def test_an_on_demand_model_waits_for_its_first_request():
    c = Cluster(node("a", ram=32 * GiB))
    c.deploy("lazy", GiB, min_replicas=0, idle_timeout_s=60.0, last_request=None)
    assert c.step("lazy") == [] and c.instances_of("lazy") == []


def test_a_request_starts_it_and_the_idle_timeout_stops_it():
    c = Cluster(node("a", ram=32 * GiB))
    c.deploy("lazy", GiB, replicas=2, min_replicas=0, idle_timeout_s=60.0)
    c.apply({"op": "update_model", "name": "lazy", "changes": {"last_request": NOW}})
    c.settle("lazy", now=NOW + 1)
    assert len(c.instances_of("lazy")) == 2
    c.settle("lazy", now=NOW + 59)                  # still within the timeout: stays
    assert len(c.instances_of("lazy")) == 2
    c.settle("lazy", now=NOW + 61)
    assert c.instances_of("lazy") == []


def test_min_replicas_stay_when_idle():
    model = {"replicas": 3, "min_replicas": 1, "idle_timeout_s": 10.0, "last_request": NOW}
    assert wanted_replicas(model, NOW + 5) == 3
    assert wanted_replicas(model, NOW + 11) == 1
    assert wanted_replicas({"replicas": 3}, NOW) == 3       # not on demand: always all
    assert not is_active({**model, "evicted_at": NOW}, NOW + 1)
    assert is_active({**model, "evicted_at": NOW - 1}, NOW + 1)


# --- eviction: least recently used idle instances make room ---------------------------------

def _on_demand(c: Cluster, name: str, size: int, last_request: float, **fields) -> None:
    c.deploy(name, size, min_replicas=0, idle_timeout_s=3600.0, **fields)
    c.apply({"op": "update_model", "name": name, "changes": {"last_request": last_request}})
    c.settle(name, now=last_request)
    c.run(name)


def test_the_least_recently_used_idle_instance_is_evicted_for_a_new_request():
    c = Cluster(node("a", ram=10 * GiB))
    _on_demand(c, "old", 4 * GiB, last_request=NOW - 600)
    _on_demand(c, "recent", 4 * GiB, last_request=NOW - 300)
    c.deploy("wanted", 5 * GiB, min_replicas=0, idle_timeout_s=3600.0, last_request=NOW)
    commands = c.step("wanted")                     # cannot fit: 2 GiB free
    assert [cmd["op"] for cmd in commands] == ["update_model", "delete_instance"]
    assert c.state["models"]["wanted"]["schedule_error"] is None
    assert c.instances_of("wanted") == [] and c.instances_of("old") == []
    assert c.state["models"]["old"]["evicted_at"] == NOW
    assert len(c.instances_of("recent")) == 1
    c.settle("old")                                  # evicted: it stays down
    assert c.instances_of("old") == []
    c.settle("wanted")
    assert len(c.instances_of("wanted")) == 1


def test_only_instances_that_help_are_evicted():
    c = Cluster(node("a", ram=4 * GiB), node("b", ram=6 * GiB))
    _on_demand(c, "oldest-elsewhere", 1 * GiB, last_request=NOW - 900,
               placement={"node_selector": {"name": "host-a"}})    # a can never hold 6 GiB
    _on_demand(c, "blocker", 5 * GiB, last_request=NOW - 600,
               placement={"node_selector": {"name": "host-b"}})    # b: 1 GiB left
    blocker = c.instances_of("blocker")[0]["id"]
    c.deploy("new", 6 * GiB)
    commands = c.step("new")
    assert [cmd.get("id") for cmd in commands if cmd["op"] == "delete_instance"] == [blocker]
    assert len(c.instances_of("oldest-elsewhere")) == 1
    c.settle("new")
    assert [i["node_id"] for i in c.instances_of("new")] == ["b"]


def test_busy_or_always_on_instances_are_not_evicted():
    c = Cluster(node("a", ram=10 * GiB))
    _on_demand(c, "busy", 6 * GiB, last_request=NOW - 1)      # asked for a second ago
    c.deploy("always", 3 * GiB)
    c.settle("always")
    c.run("always")
    c.deploy("new", 5 * GiB)
    commands = c.step("new")
    assert [cmd["op"] for cmd in commands] == ["update_model"]
    assert commands[0]["changes"]["schedule_error"].startswith("needs 5.0 GiB of RAM")
    assert len(c.instances_of("busy")) == 1 and len(c.instances_of("always")) == 1


# --- activity reaches the state in batches -------------------------------------------------

def test_record_activity_keeps_the_latest_time_and_wake_clears_an_old_error():
    c = Cluster(node("a", ram=4 * GiB))
    c.deploy("m", 8 * GiB, min_replicas=0)
    c.apply({"op": "update_model", "name": "m", "changes": {"schedule_error": "old reason"}})
    result = c.apply({"op": "record_activity", "models": {"m": NOW, "deleted-meanwhile": NOW}})
    assert result["updated"] == ["m"] and c.state["models"]["m"]["last_request"] == NOW
    before = c.state
    assert c.apply({"op": "record_activity", "models": {"m": NOW - 5}})["updated"] == []
    assert c.state["models"] is before["models"]              # older news changes nothing
    assert c.state["models"]["m"]["schedule_error"] == "old reason"
    c.apply({"op": "record_activity", "models": {"m": NOW}, "wake": True})
    assert c.state["models"]["m"]["schedule_error"] is None   # this attempt gets its own answer


def test_a_drained_node_s_instance_goes_only_once_its_replacement_runs():
    c = Cluster(node("a", ram=32 * GiB), node("b", ram=32 * GiB))
    c.deploy("m", 2 * GiB, replicas=1)
    c.settle("m")
    c.run("m")
    (old,) = c.instances_of("m")
    c.apply({"op": "drain_node", "id": old["node_id"], "draining": True})
    # A replacement elsewhere first, beside the old one (which serves meanwhile) ...
    created = c.step("m")
    assert [cmd["op"] for cmd in created] == ["create_instance"]
    assert created[0]["instance"]["node_id"] != old["node_id"]
    assert len(c.instances_of("m")) == 2
    # ... and nothing more while it is starting ...
    assert c.step("m") == []
    # ... then, once it has run for a moment (every gateway has seen it), the old one goes.
    new_id = created[0]["instance"]["id"]
    c.apply({"op": "update_instance", "id": new_id,
             "changes": {"state": "running", "updated": NOW}})
    assert c.step("m", NOW + 1.0) == []
    assert c.step("m", NOW + HANDOVER_S) == [
        {"op": "delete_instance", "id": old["id"], "if_running_elsewhere": 1}]
    assert [i["node_id"] for i in c.instances_of("m")] == [created[0]["instance"]["node_id"]]
    assert c.step("m") == []


def test_a_drain_with_nowhere_to_go_keeps_the_instance_and_says_why():
    c = Cluster(node("a", ram=32 * GiB), node("b", ram=1 * GiB))
    c.deploy("m", 2 * GiB, replicas=1)
    c.settle("m")
    c.run("m")
    (old,) = c.instances_of("m")
    c.apply({"op": "drain_node", "id": "a", "draining": True})
    c.settle("m")
    assert c.instances_of("m") == [old]                         # no gap: it stays
    assert "draining" in c.state["models"]["m"]["schedule_error"]
    # Undoing the drain makes it a replica again, and the error goes.
    c.apply({"op": "drain_node", "id": "a", "draining": False})
    c.settle("m")
    assert c.instances_of("m") == [old] and c.state["models"]["m"]["schedule_error"] is None


def test_a_drained_rpc_worker_s_spread_instance_is_replaced_before_it_goes():
    # No node holds the model alone: it is spread over two (a head and an RPC worker).
    c = Cluster(*(node(n, ram=8 * GiB) for n in "abcd"))
    c.deploy("m", 12 * GiB, replicas=1)
    c.settle("m")
    c.run("m")
    (old,) = c.instances_of("m")
    (worker,) = [w["node_id"] for w in old["allocation"]["workers"]]
    c.apply({"op": "drain_node", "id": worker, "draining": True})
    created = c.step("m")                    # a replacement on the two other nodes first
    assert [cmd["op"] for cmd in created] == ["create_instance"]
    placed = created[0]["instance"]
    assert {b["node_id"] for b in placed["allocation"]["bookings"]}.isdisjoint(
        {old["node_id"], worker})
    c.apply({"op": "update_instance", "id": placed["id"],
             "changes": {"state": "running", "updated": NOW}})
    assert c.step("m", NOW + 1.0) == []      # the old one serves meanwhile
    assert c.step("m", NOW + HANDOVER_S) == [
        {"op": "delete_instance", "id": old["id"], "if_running_elsewhere": 1}]


def test_scaling_to_zero_during_a_drain_removes_the_leaving_instance():
    c = Cluster(node("a", ram=32 * GiB), node("b", ram=32 * GiB))
    c.deploy("m", 2 * GiB, replicas=1)
    c.settle("m")
    c.run("m")
    c.apply({"op": "drain_node", "id": c.instances_of("m")[0]["node_id"], "draining": True})
    c.apply({"op": "update_model", "name": "m", "changes": {"replicas": 0}})
    c.settle("m")
    assert c.instances_of("m") == []


# --- requests in flight: busy marks ---------------------------------------------------------

def test_a_busy_model_is_kept_past_its_idle_timeout_and_stops_after_its_last_request():
    c = Cluster(node("a", ram=32 * GiB))
    c.deploy("lazy", GiB, min_replicas=0, idle_timeout_s=60.0)
    c.apply({"op": "record_activity", "models": {"lazy": NOW}})
    c.settle("lazy", now=NOW + 1)
    assert len(c.instances_of("lazy")) == 1
    # a stream began at NOW; its node marks the model busy at every flush while it runs
    for t in (NOW + 5, NOW + 60, NOW + 115):
        c.apply({"op": "record_activity", "models": {}, "node_id": "a", "busy": ["lazy"],
                 "at": t})
        c.settle("lazy", now=t + 4)
        assert len(c.instances_of("lazy")) == 1, t
    # it ends at NOW + 118: the end is its last request, and the mark goes
    c.apply({"op": "record_activity", "models": {"lazy": NOW + 118}, "node_id": "a",
             "busy": [], "at": NOW + 120})
    assert "a" not in c.state["models"]["lazy"]["busy"]
    c.settle("lazy", now=NOW + 177)                  # 59 s after the end: still wanted
    assert len(c.instances_of("lazy")) == 1
    c.settle("lazy", now=NOW + 179)
    assert c.instances_of("lazy") == []


def test_a_busy_mark_from_a_node_gone_quiet_expires():
    model = {"replicas": 1, "min_replicas": 0, "idle_timeout_s": 10.0, "last_request": NOW,
             "busy": {"gone": NOW}}
    assert is_busy(model, NOW + BUSY_LEASE_S - 1) and is_active(model, NOW + 30)
    assert not is_busy(model, NOW + BUSY_LEASE_S + 1)
    assert wanted_replicas(model, NOW + BUSY_LEASE_S + 1) == 0


def test_busy_marks_are_per_node_and_each_node_clears_only_its_own():
    c = Cluster(node("a", ram=32 * GiB))
    c.deploy("m", GiB, min_replicas=0)
    c.deploy("n", GiB, min_replicas=0)
    c.apply({"op": "record_activity", "models": {}, "node_id": "a", "busy": ["m", "n"],
             "at": NOW})
    c.apply({"op": "record_activity", "models": {}, "node_id": "b", "busy": ["m"], "at": NOW})
    assert c.state["models"]["m"]["busy"] == {"a": NOW, "b": NOW}
    result = c.apply({"op": "record_activity", "models": {}, "node_id": "a", "busy": ["n"],
                      "at": NOW + 1})
    assert result["updated"] == ["m", "n"]
    assert c.state["models"]["m"]["busy"] == {"b": NOW}
    assert c.state["models"]["n"]["busy"] == {"a": NOW + 1}


def test_a_busy_idle_instance_is_not_evicted():
    c = Cluster(node("a", ram=10 * GiB))
    _on_demand(c, "streaming", 6 * GiB, last_request=NOW - 600)    # began long ago …
    c.apply({"op": "record_activity", "models": {}, "node_id": "a", "busy": ["streaming"],
             "at": NOW - 2})                                        # … and still runs
    c.deploy("new", 5 * GiB, min_replicas=0, idle_timeout_s=3600.0, last_request=NOW)
    commands = c.step("new")
    assert [cmd["op"] for cmd in commands] == ["update_model"]      # no room, no eviction
    assert len(c.instances_of("streaming")) == 1
