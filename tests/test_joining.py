"""Join tokens, proofs and sealed replies (mesh/joining.py), the node commands the cluster
half adds (commands/nodes.py, commands/join_tokens.py) and the address settings."""

from __future__ import annotations

import os

import pytest

from gpumesh.mesh.commands import apply_command, empty_state
from gpumesh.mesh.config import Config, ConfigError
from gpumesh.mesh.discovery import DiscoveryError, interface_address
from gpumesh.mesh.joining import (JoinError, JoinRequest, join_key, loopback_mismatch,
                                  new_token, open_reply, parse_token, seal_reply)

SECRET = "a-cluster-secret-of-enough-length"


def request(step: str = "hello", **changes: str) -> JoinRequest:
    fields = {"step": step, "cluster_id": "c1", "token_id": "t1", "node_id": "n1",
              "name": "box", "raft_address": "10.0.0.2:8471", "api_url": "http://10.0.0.2:8470"}
    fields.update(changes)
    return JoinRequest(**fields, nonce=os.urandom(16))     # type: ignore[arg-type]


# --- tokens ----------------------------------------------------------------------------------

def test_a_token_round_trips_and_never_holds_the_secret() -> None:
    token, token_id = new_token("c1", SECRET, ["http://10.0.0.1:8470"])
    text = token.encode()
    assert text.startswith("gmjoin1.") and "\n" not in text and " " not in text
    assert parse_token(text) == token
    assert token.key == join_key(SECRET, token_id) != join_key(SECRET, "other")
    assert SECRET not in text


@pytest.mark.parametrize("text, words", [("hello", "starts with 'gmjoin1.'"),
                                         ("gmjoin1.!!!", "damaged"),
                                         ("gmjoin1.e30", "damaged")])
def test_a_bad_token_is_refused_in_words(text: str, words: str) -> None:
    with pytest.raises(JoinError, match=words):
        parse_token(text)


# --- proofs -----------------------------------------------------------------------------------

def test_a_proof_binds_every_field_of_the_request() -> None:
    key = join_key(SECRET, "t1")
    join = request()
    body = join.signed(key)
    parsed, proof = JoinRequest.from_body(body)
    assert parsed == join and parsed.verify(key, proof)
    assert not parsed.verify(join_key(SECRET, "t2"), proof)
    for field, value in (("raft_address", "10.0.0.9:8471"), ("node_id", "n2"),
                         ("step", "confirm")):
        tampered, proof = JoinRequest.from_body({**body, field: value})
        assert not tampered.verify(key, proof), field


@pytest.mark.parametrize("body", [{}, {"step": "hello"}, "x", None,
                                  {**request().signed(b"k"), "step": "evil"},
                                  {**request().signed(b"k"), "raft_address": "nohost"},
                                  {**request().signed(b"k"), "nonce": "c2hvcnQ"}])
def test_a_malformed_request_is_refused(body: object) -> None:
    with pytest.raises(JoinError):
        JoinRequest.from_body(body)


def test_a_sealed_reply_opens_only_with_the_key_and_the_nonce() -> None:
    key = join_key(SECRET, "t1")
    nonce = os.urandom(16)
    sealed = seal_reply(key, nonce, {"cluster_secret": SECRET, "members": ["a:1"]})
    assert SECRET not in str(sealed)
    assert open_reply(key, nonce, sealed) == {"cluster_secret": SECRET, "members": ["a:1"]}
    for wrong_key, wrong_nonce in ((join_key(SECRET, "t2"), nonce), (key, os.urandom(16))):
        with pytest.raises(JoinError, match="not a member"):
            open_reply(wrong_key, wrong_nonce, sealed)


def test_loopback_and_network_addresses_do_not_mix() -> None:
    assert loopback_mismatch("127.0.0.1:2", ["127.0.0.1:1"]) is None
    assert loopback_mismatch("10.0.0.2:1", ["10.0.0.1:1"]) is None
    assert "loopback" in loopback_mismatch("127.0.0.1:2", ["10.0.0.1:1"])   # type: ignore[operator]
    assert "--advertise" in loopback_mismatch("10.0.0.2:1", ["127.0.0.1:1"])  # type: ignore[operator]


# --- addresses --------------------------------------------------------------------------------

@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for name in ("GPUMESH_HOST", "GPUMESH_ADVERTISE", "GPUMESH_JOIN", "GPUMESH_TOKEN",
                 "GPUMESH_DISCOVERY", "GPUMESH_MDNS_INTERFACE", "GPUMESH_RAFT_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GPUMESH_DATA_DIR", str(tmp_path))


def test_the_advertised_address_defaults_to_the_bind_address(clean_env) -> None:
    config = Config.from_sources({"host": "127.0.0.2"})
    assert config.advertise == "127.0.0.2"
    assert config.api_url.startswith("http://127.0.0.2:")
    assert config.raft_address.startswith("127.0.0.2:")
    assert Config.from_sources({"host": "0.0.0.0", "advertise": "10.1.2.3"}).raft_address \
        == "10.1.2.3:8471"


@pytest.mark.parametrize("flags, words", [
    ({"advertise": "0.0.0.0"}, "not an address peers can reach"),
    ({"advertise": "box.local"}, "must be an IP address"),
    ({"join": "10.0.0.1"}, "--join needs --token"),
    ({"join": "10.0.0.1:99999", "token": "t"}, r"--join must be HOST\[:PORT\]"),
    ({"discovery": "dns"}, "--discovery must be mdns or off"),
])
def test_unusable_cluster_settings_are_refused_in_words(clean_env, flags, words) -> None:
    with pytest.raises(ConfigError, match=words):
        Config.from_sources(flags)


def test_join_accepts_what_people_paste(clean_env) -> None:
    for given in ("10.0.0.1", "10.0.0.1:8470", "http://10.0.0.1:8470/"):
        assert Config.from_sources({"join": given, "token": "t"}).join == "http://10.0.0.1:8470"


def test_the_mdns_interface_is_found_by_name() -> None:
    assert interface_address("lo") == "127.0.0.1"
    with pytest.raises(DiscoveryError, match="no-such-if"):
        interface_address("no-such-if")


# --- node commands ----------------------------------------------------------------------------

def state_with_node(**node: object) -> dict:
    state = empty_state()
    state, _ = apply_command(state, {"op": "upsert_node", "node": {
        "id": "n1", "name": "box", "status": "ready", **node}})
    state, _ = apply_command(state, {"op": "create_model", "model": {
        "name": "m", "replicas": 2}})
    for instance_id in ("i1", "i2"):
        state, result = apply_command(state, {"op": "create_instance", "instance": {
            "id": instance_id, "model": "m", "node_id": "n1", "state": "running"}})
        assert result["ok"], result
    return state


def test_unreachable_with_evict_removes_the_nodes_instances_in_the_same_command() -> None:
    state = state_with_node()
    state, result = apply_command(state, {"op": "set_node_status", "id": "n1",
                                          "status": "unreachable", "if_status": "ready",
                                          "evict": True, "at": 1.0, "reason": "silent"})
    assert result == {"ok": True, "instances_removed": ["i1", "i2"]}
    assert state["instances"] == {} and state["nodes"]["n1"]["status"] == "unreachable"
    # A verdict reached on an old view does not undo a newer one.
    _, stale = apply_command(state, {"op": "set_node_status", "id": "n1", "status": "ready",
                                     "if_status": "ready", "at": 2.0})
    assert stale["code"] == "status_changed"
    # Nothing is placed on it until it is back.
    _, refused = apply_command(state, {"op": "create_instance", "instance": {
        "id": "i3", "model": "m", "node_id": "n1", "state": "scheduled"}})
    assert refused["code"] == "node_unavailable"


def test_a_ready_node_keeps_its_instances() -> None:
    _, result = apply_command(state_with_node(), {"op": "set_node_status", "id": "n1",
                                                  "status": "ready", "evict": True, "at": 1})
    assert result["code"] == "bad_command"


def test_drain_keeps_instances_until_replaced_and_survives_the_nodes_own_restart() -> None:
    state, result = apply_command(state_with_node(), {"op": "drain_node", "id": "n1",
                                                      "draining": True})
    # Nothing is dropped: they serve until their replacements run (the reconciler's part).
    assert result["instances_leaving"] == ["i1", "i2"]
    assert sorted(state["instances"]) == ["i1", "i2"]
    state, _ = apply_command(state, {"op": "upsert_node", "node": {"id": "n1",
                                                                   "status": "ready"}})
    assert state["nodes"]["n1"]["draining"] is True             # the admin's decision stays
    state, _ = apply_command(state, {"op": "drain_node", "id": "n1", "draining": False})
    assert state["nodes"]["n1"]["draining"] is False


def test_remove_node_and_heartbeats() -> None:
    state = state_with_node()
    state, result = apply_command(state, {"op": "node_heartbeat", "id": "n1", "at": 5.0,
                                          "resources": {"load_1m": 0.5}})
    assert result["ok"] and state["nodes"]["n1"]["heartbeat_at"] == 5.0
    state, result = apply_command(state, {"op": "remove_node", "id": "n1"})
    assert result["instances_removed"] == ["i1", "i2"] and state["nodes"] == {}
    _, result = apply_command(state, {"op": "node_heartbeat", "id": "n1", "at": 6.0,
                                      "resources": {}})
    assert result["code"] == "node_not_found"


def test_join_tokens_expire_by_the_submitters_clock() -> None:
    state = empty_state()
    state, _ = apply_command(state, {"op": "create_join_token", "token": {
        "id": "a", "created": 0.0, "expires": 100.0}})
    state, _ = apply_command(state, {"op": "create_join_token", "token": {
        "id": "b", "created": 200.0, "expires": 300.0}})
    assert set(state["join_tokens"]) == {"b"}                  # "a" had expired: dropped
    _, again = apply_command(state, {"op": "create_join_token", "token": {
        "id": "b", "created": 201.0, "expires": 300.0}})
    assert again["code"] == "token_exists"


def test_a_drain_allows_replacements_past_the_replica_count_and_deletes_only_replaced() -> None:
    state = state_with_node()
    state, _ = apply_command(state, {"op": "upsert_node", "node": {
        "id": "n2", "name": "other", "status": "ready"}})
    # Two replicas on n1: a third is refused while n1 is in service ...
    third = {"op": "create_instance", "instance": {"id": "i3", "model": "m", "node_id": "n2",
                                                   "state": "scheduled"}}
    assert apply_command(state, third)[1]["code"] == "replicas_reached"
    # ... and allowed once n1 drains: its instances are leaving, not counted.
    state, _ = apply_command(state, {"op": "drain_node", "id": "n1", "draining": True})
    state, result = apply_command(state, third)
    assert result["ok"]
    state, result = apply_command(state, {**third, "instance": {**third["instance"],
                                                                "id": "i4"}})
    assert result["ok"]
    fifth = {**third, "instance": {**third["instance"], "id": "i5"}}
    assert apply_command(state, fifth)[1]["code"] == "replicas_reached"   # one surge only

    # A leaving instance goes only once enough replicas run elsewhere, judged on the state
    # at apply time (not on what the leader saw).
    retire = {"op": "delete_instance", "id": "i1", "if_running_elsewhere": 2}
    _, refused = apply_command(state, retire)
    assert refused["code"] == "not_replaced" and "(0 do)" in refused["error"]
    for instance_id in ("i3", "i4"):
        state, _ = apply_command(state, {"op": "update_instance", "id": instance_id,
                                         "changes": {"state": "running"}})
    state, result = apply_command(state, retire)
    assert result["ok"] and "i1" not in state["instances"]
