"""Unit tests for mesh/commands.py: the deterministic state machine every node runs."""

from __future__ import annotations

import copy

import msgpack
import pytest

from gpumesh.mesh.commands import (
    COLLECTIONS,
    INSTANCE_STATES,
    apply_command,
    empty_state,
)


# --- builders --------------------------------------------------------------------------------

def _node(node_id: str = "n1", **extra) -> dict:
    return {"id": node_id, "name": f"host-{node_id}", "status": "ready", **extra}


def _model(name: str = "m1", **extra) -> dict:
    return {"name": name, "backend": "llama.cpp", "replicas": 1, **extra}


def _instance(instance_id: str = "i1", model: str = "m1", node_id: str = "n1", **extra) -> dict:
    return {"id": instance_id, "model": model, "node_id": node_id, "state": "scheduled", **extra}


def _key(key_id: str = "k1", role: str = "admin", key_hash: str | None = None) -> dict:
    return {"id": key_id, "hash": key_hash or f"hash-{key_id}", "name": key_id, "role": role,
            "created": 1.0}


def _apply_ok(state: dict, command: dict) -> tuple[dict, dict]:
    new_state, result = apply_command(state, command)
    assert "error" not in result, result
    assert result["ok"] is True
    return new_state, result


def _apply_refused(state: dict, command: dict, code: str) -> dict:
    snapshot = copy.deepcopy(state)
    new_state, result = apply_command(state, command)
    assert result["code"] == code, result
    assert isinstance(result["error"], str) and result["error"]
    assert "ok" not in result
    assert new_state is state          # refused: the very same state comes back
    assert state == snapshot           # and nothing inside it was touched
    return result


def _populated() -> dict:
    """Two nodes, two models, three instances, one admin key and one user key."""
    state = empty_state()
    commands = [
        {"op": "upsert_node", "node": _node("n1")},
        {"op": "upsert_node", "node": _node("n2")},
        {"op": "create_model", "model": _model("m1", replicas=2)},
        {"op": "create_model", "model": _model("m2", replicas=2)},
        {"op": "create_instance", "instance": _instance("i1", "m1", "n1")},
        {"op": "create_instance", "instance": _instance("i2", "m1", "n2")},
        {"op": "create_instance", "instance": _instance("i3", "m2", "n1")},
        {"op": "create_api_key", "key": _key("k1", "admin")},
        {"op": "create_api_key", "key": _key("u0", "user")},
    ]
    for command in commands:
        state, _ = _apply_ok(state, command)
    return state


# --- empty state -----------------------------------------------------------------------------

def test_empty_state_has_every_collection_empty():
    state = empty_state()
    assert set(state) == set(COLLECTIONS) == {"nodes", "models", "instances", "api_keys",
                                                "join_tokens", "users", "usage", "rates",
                                                "engine_architectures"}
    assert all(state[name] == {} for name in COLLECTIONS)


def test_empty_state_returns_fresh_collections_each_time():
    a, b = empty_state(), empty_state()
    assert a == b
    assert a["nodes"] is not b["nodes"]


# --- upsert_node -----------------------------------------------------------------------------

def test_upsert_node_creates_a_node():
    state, result = _apply_ok(empty_state(), {"op": "upsert_node", "node": _node("n1")})
    assert result == {"ok": True}
    assert state["nodes"] == {"n1": _node("n1")}


def test_upsert_node_merges_into_the_existing_record():
    state, _ = _apply_ok(empty_state(), {"op": "upsert_node",
                                         "node": _node("n1", backends=["llama.cpp"])})
    state, _ = _apply_ok(state, {"op": "upsert_node", "node": {"id": "n1", "status": "down"}})
    node = state["nodes"]["n1"]
    assert node["status"] == "down"                 # changed field replaced
    assert node["backends"] == ["llama.cpp"]        # untouched fields kept
    assert node["name"] == "host-n1"


def test_upsert_node_does_not_mutate_the_node_dict_given():
    given = _node("n1")
    state, _ = _apply_ok(empty_state(), {"op": "upsert_node", "node": given})
    state["nodes"]["n1"]["status"] = "changed-later"
    assert given["status"] == "ready"


# --- create_model / update_model / delete_model ----------------------------------------------

def test_create_model_stores_and_returns_the_record():
    state, result = _apply_ok(empty_state(), {"op": "create_model", "model": _model("m1")})
    assert state["models"] == {"m1": _model("m1")}
    assert result["model"] == _model("m1")


def test_create_model_refuses_an_existing_name():
    state, _ = _apply_ok(empty_state(), {"op": "create_model", "model": _model("m1")})
    result = _apply_refused(state, {"op": "create_model", "model": _model("m1", replicas=5)},
                            "model_exists")
    assert "m1" in result["error"]
    assert state["models"]["m1"]["replicas"] == 1


def test_update_model_merges_changes():
    state, _ = _apply_ok(empty_state(), {"op": "create_model", "model": _model("m1")})
    state, result = _apply_ok(state, {"op": "update_model", "name": "m1",
                                      "changes": {"replicas": 3, "schedule_error": "no room"}})
    assert state["models"]["m1"] == {**_model("m1"), "replicas": 3, "schedule_error": "no room"}
    assert result["model"] == state["models"]["m1"]


def test_update_model_refuses_unknown_model():
    result = _apply_refused(empty_state(), {"op": "update_model", "name": "ghost",
                                            "changes": {"replicas": 2}}, "model_not_found")
    assert "ghost" in result["error"]


def test_delete_model_refuses_unknown_model():
    _apply_refused(_populated(), {"op": "delete_model", "name": "ghost"}, "model_not_found")


def test_delete_model_removes_the_model_and_only_its_instances():
    state = _populated()
    new_state, result = _apply_ok(state, {"op": "delete_model", "name": "m1"})
    assert result == {"ok": True, "instances_removed": 2}
    assert set(new_state["models"]) == {"m2"}
    assert set(new_state["instances"]) == {"i3"}
    assert new_state["instances"]["i3"] is state["instances"]["i3"]
    # Nodes and keys are untouched: the very same collection objects.
    assert new_state["nodes"] is state["nodes"]
    assert new_state["api_keys"] is state["api_keys"]


def test_delete_model_without_instances_reports_zero_removed():
    state, _ = _apply_ok(empty_state(), {"op": "create_model", "model": _model("m1")})
    state, result = _apply_ok(state, {"op": "delete_model", "name": "m1"})
    assert result["instances_removed"] == 0
    assert state["models"] == {}


# --- create_instance -------------------------------------------------------------------------

def test_create_instance_stores_the_record():
    state = _populated()
    new_state, result = _apply_ok(state, {"op": "create_instance",
                                          "instance": _instance("i9", "m2", "n2")})
    assert new_state["instances"]["i9"] == _instance("i9", "m2", "n2")
    assert result["instance"] == _instance("i9", "m2", "n2")
    assert len(new_state["instances"]) == 4


def test_create_instance_refuses_unknown_model():
    _apply_refused(_populated(), {"op": "create_instance",
                                  "instance": _instance("i9", "ghost", "n1")}, "model_not_found")


def test_create_instance_refuses_existing_id():
    _apply_refused(_populated(), {"op": "create_instance",
                                  "instance": _instance("i1", "m2", "n2")}, "instance_exists")


def test_create_instance_refuses_unknown_node():
    result = _apply_refused(_populated(), {"op": "create_instance",
                                           "instance": _instance("i9", "m1", "n-ghost")},
                            "node_not_found")
    assert "n-ghost" in result["error"]


# --- update_instance -------------------------------------------------------------------------

def test_update_instance_merges_changes():
    state = _populated()
    new_state, result = _apply_ok(state, {"op": "update_instance", "id": "i1", "node_id": "n1",
                                          "changes": {"state": "running", "port": 9000}})
    assert new_state["instances"]["i1"] == {**_instance("i1", "m1", "n1"),
                                            "state": "running", "port": 9000}
    assert result["instance"] == new_state["instances"]["i1"]
    assert state["instances"]["i1"]["state"] == "scheduled"


def test_update_instance_without_node_id_is_not_checked_for_ownership():
    state, _ = _apply_ok(_populated(), {"op": "update_instance", "id": "i2",
                                        "changes": {"state": "error", "reason": "boom"}})
    assert state["instances"]["i2"]["state"] == "error"


@pytest.mark.parametrize("new_state", INSTANCE_STATES)
def test_update_instance_accepts_every_known_state(new_state):
    state, _ = _apply_ok(_populated(), {"op": "update_instance", "id": "i1",
                                        "changes": {"state": new_state}})
    assert state["instances"]["i1"]["state"] == new_state


def test_update_instance_refuses_unknown_instance():
    _apply_refused(_populated(), {"op": "update_instance", "id": "ghost",
                                  "changes": {"state": "running"}}, "instance_not_found")


def test_update_instance_refuses_another_nodes_agent():
    result = _apply_refused(_populated(), {"op": "update_instance", "id": "i1", "node_id": "n2",
                                           "changes": {"state": "running"}}, "wrong_node")
    assert "i1" in result["error"]


def test_update_instance_refuses_unknown_state():
    result = _apply_refused(_populated(), {"op": "update_instance", "id": "i1",
                                           "changes": {"state": "exploded"}}, "bad_state")
    assert "exploded" in result["error"]


# --- delete_instance -------------------------------------------------------------------------

def test_delete_instance_removes_only_that_instance():
    state = _populated()
    new_state, result = _apply_ok(state, {"op": "delete_instance", "id": "i2"})
    assert result == {"ok": True}
    assert set(new_state["instances"]) == {"i1", "i3"}
    assert new_state["models"] is state["models"]


def test_delete_instance_refuses_unknown_instance():
    _apply_refused(_populated(), {"op": "delete_instance", "id": "ghost"}, "instance_not_found")


# --- restart_instance ------------------------------------------------------------------------

def test_restart_instance_counts_requests_and_keeps_the_rest_of_the_record():
    state = _populated()
    once, result = _apply_ok(state, {"op": "restart_instance", "id": "i2", "at": 5.0})
    twice, _ = _apply_ok(once, {"op": "restart_instance", "id": "i2", "at": 6.0})
    assert result["instance"] == {**_instance("i2", "m1", "n2"), "restart_generation": 1,
                                  "restart_requested": 5.0}
    assert twice["instances"]["i2"]["restart_generation"] == 2
    assert twice["instances"]["i1"] is state["instances"]["i1"]
    # the owner's own updates keep the count (it only ever goes up)
    after, _ = _apply_ok(twice, {"op": "update_instance", "id": "i2", "node_id": "n2",
                                 "changes": {"state": "starting", "restart_handled": 2}})
    assert after["instances"]["i2"]["restart_generation"] == 2


def test_restart_instance_refuses_unknown_instance():
    _apply_refused(_populated(), {"op": "restart_instance", "id": "ghost"}, "instance_not_found")


# --- API keys --------------------------------------------------------------------------------

def test_create_api_key_stores_under_its_hash():
    state, result = _apply_ok(empty_state(), {"op": "create_api_key",
                                              "key": _key("k1", key_hash="abc")})
    assert result == {"ok": True}
    assert state["api_keys"] == {"abc": _key("k1", key_hash="abc")}


def test_create_api_key_refuses_same_hash():
    state = _populated()
    _apply_refused(state, {"op": "create_api_key", "key": _key("other", key_hash="hash-k1")},
                   "key_exists")


def test_create_api_key_refuses_same_id():
    state = _populated()
    result = _apply_refused(state, {"op": "create_api_key",
                                    "key": _key("k1", key_hash="different")}, "key_exists")
    assert "k1" in result["error"]


def test_only_if_no_admin_mints_the_first_admin():
    state, _ = _apply_ok(empty_state(), {"op": "create_api_key", "key": _key("k1", "admin"),
                                         "only_if_no_admin": True})
    assert set(state["api_keys"]) == {"hash-k1"}


def test_only_if_no_admin_refuses_a_second_admin():
    _apply_refused(_populated(), {"op": "create_api_key", "key": _key("k2", "admin"),
                                  "only_if_no_admin": True}, "admin_exists")


def test_only_if_no_admin_ignores_user_keys():
    state, _ = _apply_ok(empty_state(), {"op": "create_api_key", "key": _key("u1", "user")})
    state, _ = _apply_ok(state, {"op": "create_api_key", "key": _key("k1", "admin"),
                                 "only_if_no_admin": True})
    assert {k["role"] for k in state["api_keys"].values()} == {"user", "admin"}


def test_second_admin_without_the_condition_is_allowed():
    state, _ = _apply_ok(_populated(), {"op": "create_api_key", "key": _key("k2", "admin")})
    assert len(state["api_keys"]) == 3


def test_delete_api_key_by_id():
    state, _ = _apply_ok(_populated(), {"op": "create_api_key", "key": _key("k2", "admin")})
    new_state, result = _apply_ok(state, {"op": "delete_api_key", "id": "k1"})
    assert result == {"ok": True}
    assert set(new_state["api_keys"]) == {"hash-k2", "hash-u0"}
    assert set(state["api_keys"]) == {"hash-k1", "hash-k2", "hash-u0"}


def test_delete_api_key_refuses_the_last_admin_key():
    result = _apply_refused(_populated(), {"op": "delete_api_key", "id": "k1"},
                            "last_admin_key")
    assert "k1" in result["error"]


def test_delete_api_key_refuses_unknown_id():
    _apply_refused(_populated(), {"op": "delete_api_key", "id": "ghost"}, "key_not_found")


# --- malformed and unknown commands ----------------------------------------------------------

@pytest.mark.parametrize("command", [
    {"op": "nuke_everything"},
    {"op": ""},
    {},
    {"op": None},
    {"op": 42},
    {"op": ["create_model"]},
    {"op": {"name": "create_model"}},
], ids=["unknown", "empty-op", "no-op", "none-op", "int-op", "list-op", "dict-op"])
def test_unknown_op_is_a_bad_command(command):
    state = _populated()
    _apply_refused(state, command, "bad_command")


def test_unknown_op_names_the_op():
    _, result = apply_command(empty_state(), {"op": "nuke_everything"})
    assert "nuke_everything" in result["error"]


MALFORMED = [
    # missing fields
    {"op": "upsert_node"},
    {"op": "upsert_node", "node": {"name": "no id"}},
    {"op": "create_model"},
    {"op": "create_model", "model": {"backend": "llama.cpp"}},
    {"op": "update_model", "changes": {"replicas": 2}},
    {"op": "update_model", "name": "m1"},
    {"op": "delete_model"},
    {"op": "create_instance"},
    {"op": "create_instance", "instance": {"id": "i9", "node_id": "n1"}},
    {"op": "create_instance", "instance": {"id": "i9", "model": "m1"}},
    {"op": "update_instance", "changes": {"state": "running"}},
    {"op": "update_instance", "id": "i1"},
    {"op": "delete_instance"},
    {"op": "create_api_key"},
    {"op": "create_api_key", "key": {"id": "k9", "role": "user"}},
    {"op": "delete_api_key"},
    # wrong types
    {"op": "upsert_node", "node": "n1"},
    {"op": "upsert_node", "node": 5},
    {"op": "upsert_node", "node": ["id", "n1"]},
    {"op": "create_model", "model": None},
    {"op": "create_model", "model": {"name": ["m", "1"]}},
    {"op": "update_model", "name": "m1", "changes": ["replicas", 3]},
    {"op": "update_model", "name": "m1", "changes": None},
    {"op": "update_model", "name": ["m1"], "changes": {}},
    {"op": "delete_model", "name": {"m1": 1}},
    {"op": "create_instance", "instance": "i1"},
    {"op": "update_instance", "id": "i1", "changes": "state"},
    {"op": "update_instance", "id": "i1", "changes": None},
    {"op": "update_instance", "id": ["i1"], "changes": {}},
    {"op": "delete_instance", "id": {}},
    {"op": "create_api_key", "key": 7},
]


@pytest.mark.parametrize("command", MALFORMED, ids=lambda c: repr(c)[:60])
def test_malformed_command_is_refused_and_changes_nothing(command):
    state = _populated()
    result = _apply_refused(state, command, "bad_command")
    assert "malformed" in result["error"]
    assert command["op"] in result["error"]


# --- copy-on-write ---------------------------------------------------------------------------

def _all_commands() -> list[dict]:
    return [
        {"op": "upsert_node", "node": _node("n1")},
        {"op": "upsert_node", "node": _node("n2", status="joining")},
        {"op": "upsert_node", "node": {"id": "n2", "status": "ready"}},
        {"op": "create_model", "model": _model("m1")},
        {"op": "create_model", "model": _model("m2")},
        {"op": "update_model", "name": "m1", "changes": {"replicas": 2}},
        {"op": "create_instance", "instance": _instance("i1", "m1", "n1")},
        {"op": "create_instance", "instance": _instance("i2", "m1", "n2")},
        {"op": "create_instance", "instance": _instance("i3", "m2", "n2")},
        {"op": "update_instance", "id": "i1", "node_id": "n1",
         "changes": {"state": "running", "port": 40001}},
        {"op": "update_instance", "id": "i2", "node_id": "n1", "changes": {"state": "running"}},
        {"op": "delete_instance", "id": "i3"},
        {"op": "create_api_key", "key": _key("k1", "admin"), "only_if_no_admin": True},
        {"op": "create_api_key", "key": _key("k2", "admin"), "only_if_no_admin": True},
        {"op": "create_api_key", "key": _key("u1", "user")},
        {"op": "delete_api_key", "id": "u1"},
        {"op": "delete_model", "name": "m2"},
        {"op": "bogus"},
        {"op": "create_model"},
    ]


CHANGES = {
    # op: (command on _populated(), the collections it may replace)
    "upsert_node": ({"op": "upsert_node", "node": {"id": "n1", "status": "down"}}, {"nodes"}),
    "create_model": ({"op": "create_model", "model": _model("m3")}, {"models"}),
    "update_model": ({"op": "update_model", "name": "m1", "changes": {"replicas": 4}},
                     {"models"}),
    "delete_model": ({"op": "delete_model", "name": "m2"}, {"models", "instances"}),
    "create_instance": ({"op": "create_instance", "instance": _instance("i9", "m2", "n2")},
                        {"instances"}),
    "update_instance": ({"op": "update_instance", "id": "i1", "changes": {"state": "running"}},
                        {"instances"}),
    "delete_instance": ({"op": "delete_instance", "id": "i1"}, {"instances"}),
    "create_api_key": ({"op": "create_api_key", "key": _key("u1", "user")}, {"api_keys"}),
    "delete_api_key": ({"op": "delete_api_key", "id": "u0"}, {"api_keys"}),
}


@pytest.mark.parametrize("op", sorted(CHANGES))
def test_every_op_is_copy_on_write(op):
    command, touched = CHANGES[op]
    state = _populated()
    snapshot = copy.deepcopy(state)
    collections = {name: state[name] for name in COLLECTIONS}
    records = {name: dict(state[name]) for name in COLLECTIONS}   # id -> record object

    new_state, result = _apply_ok(state, command)

    assert new_state is not state
    assert state == snapshot                                   # old state: deep-equal before/after
    for name in COLLECTIONS:
        assert state[name] is collections[name]                # old top level not re-pointed
        for key, record in records[name].items():
            assert state[name][key] is record                  # old records are the same objects
        if name in touched:
            assert new_state[name] is not state[name]          # changed: a new dict
        else:
            assert new_state[name] is state[name]              # untouched: shared, not copied
    assert new_state != state


def test_records_a_command_does_not_touch_are_shared():
    state = _populated()
    new_state, _ = _apply_ok(state, {"op": "update_instance", "id": "i1",
                                     "changes": {"state": "running"}})
    assert new_state["instances"]["i2"] is state["instances"]["i2"]
    assert new_state["instances"]["i1"] is not state["instances"]["i1"]


def test_command_dicts_are_not_mutated():
    commands = _all_commands()
    snapshot = copy.deepcopy(commands)
    state = empty_state()
    for command in commands:
        state, _ = apply_command(state, command)
    assert commands == snapshot


# --- determinism and plain data --------------------------------------------------------------

def _run(commands: list[dict]) -> tuple[dict, list[dict]]:
    state, results = empty_state(), []
    for command in commands:
        state, result = apply_command(state, command)
        results.append(result)
    return state, results


def test_applying_the_same_commands_twice_gives_equal_states_and_results():
    first_state, first_results = _run(_all_commands())
    second_state, second_results = _run(_all_commands())
    assert first_state == second_state
    assert first_results == second_results
    # The sequence exercised both success and refusal.
    codes = [r.get("code") for r in first_results]
    assert "wrong_node" in codes and "admin_exists" in codes and "bad_command" in codes
    assert first_state["instances"] == {
        "i1": {**_instance("i1", "m1", "n1"), "state": "running", "port": 40001},
        "i2": _instance("i2", "m1", "n2"),
    }
    assert set(first_state["api_keys"]) == {"hash-k1"}
    assert set(first_state["models"]) == {"m1"}
    assert first_state["nodes"]["n2"]["status"] == "ready"


def _roundtrip(value):
    return msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False)


def test_commands_results_and_states_roundtrip_through_msgpack():
    state = empty_state()
    for command in _all_commands():
        assert _roundtrip(command) == command
        # Applying the decoded command (what a follower sees) gives the same outcome.
        expected_state, expected_result = apply_command(state, command)
        decoded_state, decoded_result = apply_command(_roundtrip(state), _roundtrip(command))
        assert decoded_state == expected_state
        assert decoded_result == expected_result
        assert _roundtrip(expected_result) == expected_result
        assert _roundtrip(expected_state) == expected_state
        state = expected_state


@pytest.mark.parametrize("field", ["id", "model", "node_id"])
def test_update_instance_refuses_to_change_its_identity(field):
    state = _populated()
    instance_id = next(iter(state["instances"]))
    refused = _apply_refused(state, {"op": "update_instance", "id": instance_id,
                                     "changes": {field: "elsewhere"}}, "immutable_field")
    assert field in refused["error"]


def test_update_model_refuses_to_rename():
    state = _populated()
    name = next(iter(state["models"]))
    _apply_refused(state, {"op": "update_model", "name": name, "changes": {"name": "other"}},
                   "immutable_field")
