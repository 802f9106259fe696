"""Several real daemons on loopback forming one cluster (`--join`), end to end.

One three-node cluster serves the module; the tests run in order and each leaves it whole
(three members, a leader) for the next. The model is a random-weight tiny GGUF served by
real llama.cpp engines; a GBNF grammar pins the answer, so requests are checked exactly.

What is measured here is asserted loosely (this machine is shared and slow); the figures
belong to bench/mesh.py.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest

from harness import Cluster, Daemon, children_of, pid_alive
from tinymodels import write_tiny_gguf

GRAMMAR = 'root ::= "hello there"'


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def cluster(workdir: Path):
    cluster = Cluster(workdir, 3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.kill_all()


@pytest.fixture(autouse=True)
def whole_cluster_after(cluster: Cluster) -> Iterator[None]:
    """Each test leaves the cluster whole for the next; one that fails half-way (a node
    killed, not yet started again) must not fail every test after it. Members that are down
    come back with a plain `gpumesh up` on their data dirs."""
    yield
    down = [n for n in cluster.nodes if not n.alive and (n.data_dir / "node.json").exists()]
    if down:
        cluster.restart(down)
        cluster.wait(lambda: all(cluster.status(n)["quorum"] for n in cluster.nodes),
                     "the cluster is whole again", 60)


@pytest.fixture(scope="module")
def tiny(workdir: Path) -> Path:
    return write_tiny_gguf(workdir / "tiny.gguf")


def chat(node: Daemon, model: str = "tiny", timeout: float = 30.0) -> tuple[int, str]:
    """(status, answer text) of one chat through `node`'s gateway; (0, why) if no answer."""
    body = {"model": model, "max_tokens": 16, "grammar": GRAMMAR,
            "messages": [{"role": "user", "content": "Say hello."}]}
    status, answer = node.request("POST", "/v1/chat/completions", body, timeout=timeout)
    if status == 200:
        return status, answer["choices"][0]["message"]["content"]
    return status, str(answer)


def running_on(node: Daemon, model: str = "tiny") -> list[str]:
    """Node ids of the running instances of `model`, as `node` sees them."""
    code, body = node.api(f"/api/models/{model}")
    assert code == 200, body
    return sorted(i["node_id"] for i in body["instances"] if i["state"] == "running")


class Answers(list):
    """(status, text) of each chat so far; `over` once every worker has sent its share."""
    workers: list[threading.Thread]          # set by chat_load as it starts them

    @property
    def over(self) -> bool:
        return not any(worker.is_alive() for worker in self.workers)


@contextlib.contextmanager
def chat_load(front: Daemon, count: int) -> Iterator[Answers]:
    """Two threads chat through `front` until the block ends (bounded: `count` requests
    each); the block gets the results as they come in."""
    results = Answers()
    stop = threading.Event()

    def load() -> None:
        for _ in range(count):                     # bounded in count …
            if stop.is_set():
                return
            results.append(chat(front))

    workers = results.workers = [threading.Thread(target=load) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        yield results
    finally:
        stop.set()
        for worker in workers:
            worker.join(60)


def wait_for_answers(cluster: Cluster, results: Answers, count: int, what: str) -> None:
    """Until `results` holds `count` answers (or the load sent all it may): load is
    counted, not timed, so a slow or busy machine makes the test slower, never wrong
    (bounded: 60 s)."""
    cluster.wait(lambda: len(results) >= count or results.over, f"{count} answers {what}", 60)


def node_id(node: Daemon) -> str:
    return json.loads((node.data_dir / "node.json").read_text())["id"]


# --- forming the cluster --------------------------------------------------------------------------

def test_three_daemons_agree_on_one_leader_and_every_member(cluster: Cluster) -> None:
    statuses = [cluster.status(n) for n in cluster.nodes]
    assert len({s["cluster_id"] for s in statuses}) == 1
    assert len({s["leader"]["node_id"] for s in statuses}) == 1
    assert all(s["quorum"] and len(s["members"]) == 3 for s in statuses)
    ids = {node_id(n) for n in cluster.nodes}
    assert {m["node_id"] for m in statuses[0]["members"]} == ids
    assert Counter(m["role"] for m in statuses[0]["members"]) == {"leader": 1, "follower": 2}

    code, nodes = cluster.nodes[2].api("/api/nodes")
    assert code == 200
    assert [(n["name"], n["state"]) for n in nodes["data"]] == [
        ("n0", "ready"), ("n1", "ready"), ("n2", "ready")]
    assert sorted(n["role"] for n in nodes["data"]) == ["follower", "follower", "leader"]
    assert all(n["api_url"] == d.url for n, d in zip(nodes["data"], cluster.nodes))

    shown = cluster.nodes[1].cli("status")
    assert shown.returncode == 0, shown.stderr
    assert "quorum yes" in shown.stdout and statuses[0]["cluster_id"] in shown.stdout
    # The joiners learnt the cluster from the join: the secret, and no admin key of their own.
    secrets = {(n.data_dir / "cluster.secret").read_text() for n in cluster.nodes}
    assert len(secrets) == 1
    assert not (cluster.nodes[1].data_dir / "admin.key").exists()


def test_a_join_token_is_refused_when_forged_or_for_another_cluster(cluster: Cluster) -> None:
    token = cluster.token(cluster.nodes[0])
    from gpumesh.mesh.joining import JoinRequest, parse_token
    parsed = parse_token(token)
    request = JoinRequest("hello", parsed.cluster_id, parsed.token_id, "n-x", "x",
                          "127.0.0.1:1", "http://127.0.0.1:2", b"0" * 16)
    forged = request.signed(b"not the key")
    for body, code, error in ((forged, 403, "invalid_join_token"),
                              ({**request.signed(parsed.key), "cluster_id": "other"}, 403,
                               "wrong_cluster"),
                              ({"step": "hello"}, 400, "bad_join_request")):
        status, answer = post(cluster.nodes[1], "/api/join", body, key=None)
        assert (status, answer["error"]["code"]) == (code, error), answer
    # The sealed answer to a good proof holds the secret, and nothing in clear does.
    status, answer = post(cluster.nodes[1], "/api/join", request.signed(parsed.key), key=None)
    assert status == 200 and set(answer) == {"server_nonce", "sealed"}
    secret = (cluster.nodes[0].data_dir / "cluster.secret").read_text().strip()
    assert secret not in json.dumps(answer) and secret not in token


def post(node: Daemon, path: str, body: object, key: str | None = "admin") -> tuple[int, dict]:
    return node.request("POST", path, body, key=key)


# --- writes anywhere, reads everywhere ------------------------------------------------------------

def test_a_follower_accepts_writes_and_every_node_reads_them(cluster: Cluster,
                                                             tiny: Path) -> None:
    follower = next(n for n in cluster.nodes if n is not cluster.leader())
    result = follower.cli("deploy", str(tiny), "--name", "tiny", "--replicas", "2", "--wait",
                          "--timeout", "90")
    assert result.returncode == 0, result.stderr + follower.output()[-2000:]
    placed = running_on(follower)
    assert len(placed) == 2 and len(set(placed)) == 2          # spread over two nodes
    for node in cluster.nodes:
        cluster.wait(lambda: running_on(node) == placed, "every node sees both replicas")
        assert chat(node) == (200, "hello there")


def test_an_instance_restarts_from_a_node_that_does_not_run_it(cluster: Cluster) -> None:
    front = cluster.nodes[0]
    code, body = front.api("/api/instances")
    tiny = {i["id"]: i for i in body["data"] if i["model"] == "tiny"}
    target = next(i for i in tiny.values() if i["node_id"] != node_id(front))
    # The request goes into the replicated state; the owner's agent restarts its engine.
    result = front.cli("restart", target["id"], "--wait", "--timeout", "90")
    assert result.returncode == 0, result.stderr
    assert f"restarted {target['id']} (tiny) on node" in result.stdout
    code, body = front.api("/api/instances")
    after = {i["id"]: i for i in body["data"]}
    assert after[target["id"]]["state"] == "running"
    assert after[target["id"]]["pid"] != target["pid"] and not pid_alive(target["pid"])
    assert all(after[i]["pid"] == tiny[i]["pid"] for i in tiny if i != target["id"])
    assert chat(front) == (200, "hello there")
    missing = front.cli("restart", "no-such-model")
    assert missing.returncode == 3 and "no instance or model" in missing.stderr


# --- losing the leader ----------------------------------------------------------------------------

def test_leader_kill_under_load_loses_no_request_and_its_models_serve_elsewhere(
        cluster: Cluster) -> None:
    leader = cluster.leader()
    survivors = [n for n in cluster.nodes if n is not leader]
    # Load goes through a follower that keeps an instance, so the answer never depends on
    # the dead node; instances on the dead node must be skipped, not failed.
    hosts = set(running_on(survivors[0]))
    front = next((n for n in survivors if node_id(n) in hosts), survivors[0])
    with chat_load(front, 2000) as results:
        wait_for_answers(cluster, results, 3, "before the kill")
        old_leader_id = node_id(leader)
        leader_had_instance = old_leader_id in hosts
        killed_at = time.monotonic()
        leader.process.send_signal(signal.SIGKILL)     # type: ignore[union-attr]
        leader.process.wait(10)                        # type: ignore[union-attr]
        new_leader = cluster.leader(survivors, timeout=20, other_than=leader)
        elected_after = time.monotonic() - killed_at
        at_election = len(results)
        wait_for_answers(cluster, results, at_election + 10, "after the election")
    failures = [r for r in results if r != (200, "hello there")]
    print(f"\n{len(results)} requests, leader had an instance: {leader_had_instance}, "
          f"new leader after {elected_after:.3f} s")
    assert failures == [], (len(results), failures[:5])
    assert new_leader is not leader and elected_after < 15, elected_after

    # Scheduling goes on: the dead node is marked unreachable and its instance (if it had
    # one) runs on the third node; the model is back to two running replicas.
    def back_to_two() -> bool:
        placed = running_on(new_leader)
        return len(placed) == 2 and old_leader_id not in placed
    cluster.wait(back_to_two, "tiny back to 2 running replicas off the dead node", 60)
    def dead_node() -> dict:
        return next(n for n in new_leader.api("/api/nodes")[1]["data"]
                    if n["id"] == old_leader_id)
    cluster.wait(lambda: dead_node()["state"] == "unreachable", "the dead node is unreachable",
                 30)
    assert dead_node()["role"] == "follower"      # still a member: only `node rm` removes
    if leader_had_instance:
        assert "unreachable" in new_leader.output() and "moving 1 instance" in \
            new_leader.output()

    # The old leader comes back with a plain `gpumesh up` and runs nothing twice.
    leader.start(60)
    cluster.wait(lambda: all(cluster.status(n)["quorum"] and len(cluster.status(n)["members"])
                             == 3 for n in cluster.nodes), "the old leader rejoined")
    cluster.wait(lambda: next(n for n in new_leader.api("/api/nodes")[1]["data"]
                              if n["id"] == old_leader_id)["state"] == "ready",
                 "the old leader is ready again", 30)
    code, instances = new_leader.api("/api/instances")
    assert len([i for i in instances["data"] if i["model"] == "tiny"]) == 2
    assert children_of(leader.process.pid) == [] or old_leader_id in running_on(new_leader)


# --- draining ----------------------------------------------------------------------------------

def test_drain_moves_a_one_replica_model_under_load_without_a_failed_request(
        cluster: Cluster) -> None:
    front = cluster.nodes[0]
    scaled = front.cli("scale", "tiny", "1", "--wait", "--timeout", "90")
    assert scaled.returncode == 0, scaled.stderr
    cluster.wait(lambda: len(running_on(front)) == 1 and len(front.api("/api/models/tiny")[1]
                                                            ["instances"]) == 1, "one replica")
    holder_id = running_on(front)[0]
    holder = next(n for n in cluster.nodes if node_id(n) == holder_id)
    front = next(n for n in cluster.nodes if n is not holder)   # load through another node
    name = holder.data_dir.name

    with chat_load(front, 3000) as results:
        wait_for_answers(cluster, results, 3, "before the drain")
        before = len(results)
        # The replacement starts elsewhere first; the drained instance stops once it runs.
        drained = front.cli("node", "drain", name, "--wait", "--timeout", "90")
        assert drained.returncode == 0, drained.stderr + holder.output()[-2000:]
        assert f"node {name} is draining: 1 instance(s) moving" in drained.stdout
        assert f"node {name} is drained" in drained.stdout
        wait_for_answers(cluster, results, len(results) + 10, "after the drain")
    failures = [r for r in results if r != (200, "hello there")]
    print(f"\n{len(results)} requests, {len(results) - before} during and after the drain")
    assert failures == [], (len(results), failures[:5])

    placed = running_on(front)
    assert len(placed) == 1 and placed != [holder_id]
    code, nodes = front.api("/api/nodes")
    assert next(n for n in nodes["data"] if n["id"] == holder_id)["state"] == "draining"
    cluster.wait(lambda: children_of(holder.process.pid) == [],   # type: ignore[union-attr]
                 "the drained node's engine stopped", 30)
    undo = front.cli("node", "drain", "--undo", name)
    assert undo.returncode == 0 and "is ready again" in undo.stdout, undo.stderr
    code, nodes = front.api("/api/nodes")
    assert next(n for n in nodes["data"] if n["id"] == holder_id)["state"] == "ready"
    back = front.cli("scale", "tiny", "2", "--wait", "--timeout", "90")
    assert back.returncode == 0, back.stderr


# --- without quorum ------------------------------------------------------------------------------

def test_without_quorum_inference_goes_on_and_writes_are_refused(cluster: Cluster) -> None:
    hosts = running_on(cluster.nodes[0])
    survivor = next(n for n in cluster.nodes if node_id(n) in hosts)
    others = [n for n in cluster.nodes if n is not survivor]
    for node in others:
        node.process.send_signal(signal.SIGKILL)   # type: ignore[union-attr]
        node.process.wait(10)                      # type: ignore[union-attr]
    cluster.wait(lambda: not cluster.status(survivor)["quorum"], "the survivor lost quorum",
                 30)
    # Its own instance still answers, through its own gateway.
    assert chat(survivor) == (200, "hello there")
    code, body = survivor.request("POST", "/api/join-tokens", {"ttl_s": 600}, timeout=60)
    # Refused, or not confirmed (a node that appended it cannot know): never a 2xx.
    assert (code, body["error"]["code"]) in ((503, "no_quorum"), (504, "outcome_unknown")), body
    shown = survivor.cli("status")
    assert shown.returncode == 0 and "quorum NO" in shown.stdout
    assert "inference on running instances" in shown.stdout
    cluster.restart(others)
    cluster.wait(lambda: all(cluster.status(n)["quorum"] for n in cluster.nodes),
                 "quorum is back", 30)
    assert chat(survivor) == (200, "hello there")


# --- removing a node ------------------------------------------------------------------------------

def test_a_removed_node_stops_and_joins_again_only_after_a_wipe(cluster: Cluster) -> None:
    leader = cluster.leader()
    gone = next(n for n in cluster.nodes if n is not leader)
    front = next(n for n in cluster.nodes if n is not leader and n is not gone)
    result = front.cli("node", "rm", gone.data_dir.name)   # through a follower
    assert result.returncode == 0, result.stderr
    assert "wipe its data dir" in result.stdout
    assert gone.process.wait(30) == 0                     # type: ignore[union-attr]
    assert "this node was removed from the cluster" in gone.output()
    cluster.wait(lambda: len(cluster.status(front)["members"]) == 2, "two members left")
    assert node_id(gone) not in {n["id"] for n in front.api("/api/nodes")[1]["data"]}

    refused = gone.cli("up", "--data-dir", str(gone.data_dir), "--api-port",
                       str(gone.api_port), "--raft-port", str(gone.raft_port), timeout=60)
    assert refused.returncode == 1 and "was removed from cluster" in refused.stderr

    shutil.rmtree(gone.data_dir)
    cluster.join(gone, through=front)
    cluster.wait(lambda: all(len(cluster.status(n)["members"]) == 3 for n in cluster.nodes),
                 "three members again")


def test_a_wiped_node_joins_again_in_its_own_place(cluster: Cluster) -> None:
    """Same address, fresh data dir, no `node rm` first: the old member (whose journal is
    gone) is replaced, not left behind as a dead member weakening the quorum."""
    leader = cluster.leader()
    wiped = next(n for n in cluster.nodes if n is not leader)
    old_id = node_id(wiped)
    wiped.process.send_signal(signal.SIGKILL)              # type: ignore[union-attr]
    wiped.process.wait(10)                                 # type: ignore[union-attr]
    shutil.rmtree(wiped.data_dir)
    cluster.join(wiped, through=leader)
    assert node_id(wiped) != old_id
    cluster.wait(lambda: all(len(cluster.status(n)["members"]) == 3 and cluster.status(n)["quorum"]
                             for n in cluster.nodes), "three members, the new one included")
    ids = {n["id"] for n in leader.api("/api/nodes")[1]["data"]}
    assert old_id not in ids and node_id(wiped) in ids
    assert "replacing the old member" in leader.output()


# --- a full stop -----------------------------------------------------------------------------------

def test_a_stopped_cluster_restarted_keeps_every_model_and_key(cluster: Cluster) -> None:
    token = cluster.token(cluster.nodes[0])
    for node in cluster.nodes:
        node.stop(signal.SIGINT, timeout=60)
    cluster.restart(cluster.nodes)
    leader = cluster.leader()
    leader.wait_model("tiny", timeout=90)
    for node in cluster.nodes:                     # the admin key still works everywhere
        assert node.api("/api/status")[0] == 200
    # A join token minted before the stop is still honoured (its record was replicated).
    from gpumesh.mesh.joining import JoinRequest, parse_token
    parsed = parse_token(token)
    hello = JoinRequest("hello", parsed.cluster_id, parsed.token_id, "n-y", "y",
                        "127.0.0.1:1", "http://127.0.0.1:2", b"1" * 16).signed(parsed.key)
    assert post(cluster.nodes[1], "/api/join", hello, key=None)[0] == 200
    assert chat(cluster.nodes[2]) == (200, "hello there")
