"""The launch side of one llama.cpp model spread over nodes (RPC), on a real store: a worker
node's agent runs an rpc-server for an instance that names it, records where it listens, and
stops it with the instance; the head's supervisor reads the endpoints in the allocation's
order. rpc-server itself is not on this machine (llama.cpp's binaries are not installed), so a
small listener stands in for it, started through the same spec, guard and runtime."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from pathlib import Path

import pytest

from harness import pid_alive
from inprocess import InProcessNode, instance_record
from tinymodels import write_tiny_gguf

from gpumesh.backends.versions import BackendVersions
from gpumesh.mesh.agent import NodeAgent
from gpumesh.mesh.commands import apply_command
from gpumesh.mesh.commands.nodes import leaving
from gpumesh.mesh.deployments import build_model_record
from gpumesh.mesh.instance import InstanceSupervisor
from gpumesh.mesh.state import CommandRejected

# Takes rpc-server's flags (--host H --port P) and accepts connections until stopped.
STAND_IN = """#!{python}
import socket, sys, time
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
server = socket.create_server((args["--host"], int(args["--port"])))
print("rpc-server stand-in listening", flush=True)
while True:
    connection, _ = server.accept()
    connection.close()
"""


def _rpc_instance(instance_id: str, head: str, workers: list[str]) -> dict:
    record = instance_record(instance_id, "spread", "scheduled", head)
    record["allocation"] = {**record["allocation"], "mechanism": "llama.cpp-rpc",
                            "workers": [{"node_id": w, "device": "cpu", "gpu_indices": [],
                                         "memory_bytes": [1 << 20]} for w in workers]}
    return record


def test_a_worker_node_lends_an_rpc_server_and_the_head_finds_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in = tmp_path / "rpc-server"
    stand_in.write_text(STAND_IN.format(python=sys.executable))
    stand_in.chmod(0o755)
    monkeypatch.setenv("GPUMESH_LLAMA_RPC_SERVER", str(stand_in))
    node = InProcessNode(tmp_path / "raft", ("unused",))
    node.start()
    try:
        for node_id in ("head", "worker-1", "worker-2"):
            node.submit({"op": "upsert_node", "node": {"id": node_id, "name": node_id,
                                                       "status": "ready"}})
        node.submit({"op": "create_model", "model": build_model_record(
            {"name": "spread", "source": str(write_tiny_gguf(tmp_path / "m.gguf"))})})
        node.submit({"op": "create_instance",
                     "instance": _rpc_instance("i-1", "head", ["worker-2", "worker-1"])})
        with pytest.raises(Exception) as refused:            # only a named worker may record
            node.submit({"op": "set_rpc_endpoint", "id": "i-1", "node_id": "head",
                         "endpoint": "127.0.0.1:1"})
        assert isinstance(refused.value, CommandRejected) and refused.value.code == "not_a_worker"
        node.submit({"op": "set_rpc_endpoint", "id": "i-1", "node_id": "worker-2",
                     "endpoint": "10.0.0.2:50052"})       # as the other worker would

        versions = BackendVersions(tmp_path / "backends")
        agent = NodeAgent(node_id="worker-1", store=node.store, session=node.session,
                          model_cache=tmp_path, log_dir=tmp_path / "logs", versions=versions,
                          advertise_host="127.0.0.1")
        head = InstanceSupervisor("i-1", node_id="head", store=node.store, session=node.session,
                                  model_cache=tmp_path, log_file=tmp_path / "logs" / "i-1.log",
                                  versions=versions, runtimes=lambda spec: None)  # type: ignore[arg-type,return-value]
        node.call(_reconcile(agent, node))
        endpoints = node.call(head._rpc_servers(node.store.view.instances["i-1"]))
        assert endpoints[0] == "10.0.0.2:50052"                 # the allocation's order
        host, port = endpoints[1].split(":")
        assert host == "127.0.0.1"
        socket.create_connection((host, int(port)), timeout=5).close()   # it listens
        worker = agent._rpc_workers["i-1"]
        pid = worker._engine.pid  # type: ignore[union-attr]

        node.submit({"op": "delete_model", "name": "spread"})    # the instance goes …
        node.call(_reconcile(agent, node))
        node.call(_stopped(agent))
        deadline = time.monotonic() + 10
        while pid_alive(pid) and time.monotonic() < deadline:     # … and its rpc-server too
            time.sleep(0.05)
        assert not pid_alive(pid)
        node.call(agent.stop())
    finally:
        node.stop()


async def _stopped(agent: NodeAgent) -> None:
    await asyncio.gather(*agent._stopping_rpc)


async def _reconcile(agent: NodeAgent, node: InProcessNode) -> None:
    agent.reconcile(node.store.view)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:                       # until the endpoint is recorded
        instance = node.store.view.instances.get("i-1")
        if instance is None or "worker-1" in (instance.get("rpc_endpoints") or {}):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no endpoint recorded: {node.store.view.instances.get('i-1')}")


def test_endpoints_are_each_workers_own_and_vanish_with_it() -> None:
    state = {"nodes": {}, "models": {}, "api_keys": {},
             "instances": {"i": _rpc_instance("i", "h", ["w1", "w2"])}}
    for node_id, endpoint in (("w1", "a:1"), ("w2", "b:2"), ("w1", None)):
        state, result = apply_command(state, {"op": "set_rpc_endpoint", "id": "i",
                                              "node_id": node_id, "endpoint": endpoint})
    assert state["instances"]["i"]["rpc_endpoints"] == {"w2": "b:2"}


def test_a_worker_node_that_goes_away_takes_the_spread_instance_with_it() -> None:
    """Its share of the layers is gone: the whole instance is planned again elsewhere."""
    nodes = {n: {"id": n, "name": n, "status": "ready"} for n in ("h", "w1", "w2", "x")}
    state = {"nodes": nodes, "models": {}, "api_keys": {},
             "instances": {"i": _rpc_instance("i", "h", ["w1", "w2"]),
                           "j": instance_record("j", "other", "running", "x")}}
    state, result = apply_command(state, {"op": "set_node_status", "id": "w2",
                                          "status": "unreachable", "at": 0.0, "evict": True})
    assert result["instances_removed"] == ["i"] and set(state["instances"]) == {"j"}


def test_a_draining_worker_node_makes_the_spread_instance_leave_without_a_gap() -> None:
    """A drain removes nothing: the spread instance keeps serving but is leaving (it does
    not count as a replica), so its replacement is placed before it goes."""
    nodes = {n: {"id": n, "name": n, "status": "ready"} for n in ("h", "w1", "x")}
    state = {"nodes": nodes, "api_keys": {},
             "models": {"m": {"name": "m", "replicas": 1}},
             "instances": {"i": {**_rpc_instance("i", "h", ["w1"]), "model": "m"},
                           "j": instance_record("j", "other", "running", "x")}}
    assert not leaving(state, state["instances"]["i"])
    state, result = apply_command(state, {"op": "drain_node", "id": "w1", "draining": True})
    assert result["instances_leaving"] == ["i"] and set(state["instances"]) == {"i", "j"}
    assert leaving(state, state["instances"]["i"])
    assert not leaving(state, state["instances"]["j"])
