"""Unit tests for mesh/events.py: state changes told in words, from two state views."""

from __future__ import annotations

from gpumesh.mesh.commands import apply_command, empty_state
from gpumesh.mesh.events import describe_changes
from gpumesh.mesh.replicated import StateView


def _node(node_id="n1", status="ready", name=None):
    return {"id": node_id, "name": name or f"host-{node_id}", "status": status}


def _model(name="m1", replicas=1, schedule_error=None, backend="llama.cpp"):
    return {"name": name, "backend": backend, "replicas": replicas,
            "schedule_error": schedule_error}


def _instance(instance_id="i1", model="m1", node_id="n1", state="scheduled", **extra):
    return {"id": instance_id, "model": model, "node_id": node_id, "state": state, **extra}


def _state(nodes=(), models=(), instances=()):
    state = empty_state()
    state["nodes"] = {n["id"]: n for n in nodes}
    state["models"] = {m["name"]: m for m in models}
    state["instances"] = {i["id"]: i for i in instances}
    return state


def _changes(old, new):
    return describe_changes(StateView(old, 1), StateView(new, 2))


# --- nothing changed ---------------------------------------------------------------------

def test_identical_views_give_no_lines():
    state = _state([_node()], [_model()], [_instance()])
    assert _changes(state, state) == []


def test_empty_to_empty_gives_no_lines():
    assert _changes(empty_state(), empty_state()) == []


def test_equal_but_rebuilt_records_give_no_lines():
    old = _state([_node()], [_model()], [_instance()])
    new = _state([_node()], [_model()], [_instance()])          # new objects, same content
    assert _changes(old, new) == []


def test_irrelevant_field_changes_give_no_lines():
    old = _state([_node()], [_model()], [_instance(state="running", port=40001)])
    new = _state([{**_node(), "last_seen": 123.0, "inventory": {"cpu_cores": 8}}],
                 [{**_model(), "args": ["--threads", "2"]}],
                 [_instance(state="running", port=40002, pid=99)])
    assert _changes(old, new) == []


def test_api_key_changes_are_not_logged():
    old = empty_state()
    new, _ = apply_command(old, {"op": "create_api_key",
                                 "key": {"id": "k1", "hash": "h", "name": "ops", "role": "admin"}})
    assert _changes(old, new) == []


# --- nodes -------------------------------------------------------------------------------

def test_node_added():
    assert _changes(empty_state(), _state([_node("n1", name="alpha")])) == \
        ["node alpha (n1) added"]


def test_node_removed():
    assert _changes(_state([_node("n1", name="alpha")]), empty_state()) == \
        ["node alpha (n1) removed"]


def test_node_status_changed():
    old = _state([_node("n1", "ready", "alpha")])
    new = _state([_node("n1", "unreachable", "alpha")])
    assert _changes(old, new) == ["node alpha (n1): ready → unreachable"]


# --- models ------------------------------------------------------------------------------

def test_model_added_names_backend_and_replicas():
    assert _changes(empty_state(), _state(models=[_model("llama", 2)])) == \
        ["model llama (llama.cpp, 2 replica(s)) added"]


def test_model_removed():
    assert _changes(_state(models=[_model("llama", 2)]), empty_state()) == \
        ["model llama (llama.cpp, 2 replica(s)) removed"]


def test_model_replicas_changed():
    old = _state(models=[_model("llama", 1)])
    new = _state(models=[_model("llama", 3)])
    assert _changes(old, new) == ["model llama (llama.cpp, 3 replica(s)): replicas 1 → 3"]


def test_model_became_unschedulable_with_the_reason():
    old = _state(models=[_model("llama")])
    new = _state(models=[_model("llama", schedule_error="no node can run llama (needs 9 GiB)")])
    assert _changes(old, new) == [
        "model llama (llama.cpp, 1 replica(s)): unschedulable: no node can run llama (needs 9 GiB)"]


def test_model_schedulable_again():
    old = _state(models=[_model("llama", schedule_error="no room")])
    new = _state(models=[_model("llama", schedule_error=None)])
    assert _changes(old, new) == ["model llama (llama.cpp, 1 replica(s)): schedulable again"]


def test_model_without_schedule_error_key_counts_as_schedulable():
    old = _state(models=[{"name": "llama", "backend": "llama.cpp", "replicas": 1}])
    new = _state(models=[_model("llama", schedule_error=None)])
    assert _changes(old, new) == []


# --- instances ---------------------------------------------------------------------------

def test_instance_added_and_removed():
    a = _state(instances=[_instance("i1", "m1", "n1")])
    b = _state(instances=[_instance("i2", "m1", "n2")])
    assert _changes(a, b) == ["instance i1 of m1 on node n1 removed",
                              "instance i2 of m1 on node n2 added"]


def test_instance_state_change():
    old = _state(instances=[_instance(state="scheduled")])
    new = _state(instances=[_instance(state="downloading")])
    assert _changes(old, new) == ["instance i1 of m1 on node n1: scheduled → downloading"]


def test_running_line_includes_the_port():
    old = _state(instances=[_instance(state="starting", port=40001)])
    new = _state(instances=[_instance(state="running", port=40001)])
    assert _changes(old, new) == ["instance i1 of m1 on node n1: starting → running (port 40001)"]


def test_running_without_a_port_has_no_port_detail():
    old = _state(instances=[_instance(state="starting")])
    new = _state(instances=[_instance(state="running")])
    assert _changes(old, new) == ["instance i1 of m1 on node n1: starting → running"]


def test_error_line_includes_the_reason():
    old = _state(instances=[_instance(state="starting", port=40001)])
    new = _state(instances=[_instance(state="error", port=40001,
                                      reason="llama-server exited with status 1")])
    assert _changes(old, new) == [
        "instance i1 of m1 on node n1: starting → error: llama-server exited with status 1"]


def test_error_without_a_reason():
    old = _state(instances=[_instance(state="running")])
    new = _state(instances=[_instance(state="error")])
    assert _changes(old, new) == ["instance i1 of m1 on node n1: running → error"]


# --- several changes at once -------------------------------------------------------------

def test_several_changes_grouped_by_kind_and_sorted():
    old = _state([_node("n1", name="alpha"), _node("n2", name="beta")],
                 [_model("m1")],
                 [_instance("i1", state="starting"), _instance("i2", state="running")])
    new = _state([_node("n1", "unreachable", "alpha"), _node("n3", name="gamma")],
                 [_model("m1", replicas=2), _model("m2")],
                 [_instance("i1", state="running", port=9001), _instance("i3")])
    assert _changes(old, new) == [
        "node alpha (n1): ready → unreachable",
        "node beta (n2) removed",
        "node gamma (n3) added",
        "model m1 (llama.cpp, 2 replica(s)): replicas 1 → 2",
        "model m2 (llama.cpp, 1 replica(s)) added",
        "instance i1 of m1 on node n1: starting → running (port 9001)",
        "instance i2 of m1 on node n1 removed",
        "instance i3 of m1 on node n1 added",
    ]


def test_changes_made_by_commands_are_described():
    state = empty_state()
    for command in [
        {"op": "upsert_node", "node": _node("n1", name="alpha")},
        {"op": "create_model", "model": _model("m1")},
        {"op": "create_instance", "instance": _instance("i1")},
    ]:
        state, _ = apply_command(state, command)
    later, _ = apply_command(state, {"op": "delete_model", "name": "m1"})
    assert _changes(state, later) == ["model m1 (llama.cpp, 1 replica(s)) removed",
                                      "instance i1 of m1 on node n1 removed"]


def test_state_view_reads_the_collections():
    state = _state([_node("n1")], [_model("m1")],
                   [_instance("i1", "m1", "n1"), _instance("i2", "m2", "n1"),
                    _instance("i3", "m1", "n2")])
    state["api_keys"] = {"h": {"id": "k1", "hash": "h", "role": "user"}}
    view = StateView(state, 7)
    assert view.version == 7
    assert view.nodes is state["nodes"] and view.models is state["models"]
    assert [i["id"] for i in view.instances_of("m1")] == ["i1", "i3"]
    assert sorted(i["id"] for i in view.instances_on("n1")) == ["i1", "i2"]
    assert view.api_key("h")["id"] == "k1"
    assert view.api_key("missing") is None
    assert view.api_keys is state["api_keys"]
