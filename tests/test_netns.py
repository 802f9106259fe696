"""A cluster in network namespaces joined by a bridge (root only): real mDNS, no `--join`,
and a real partition (a node's link down: no FIN, no RST).

The tests run in order on one three-node cluster. Names and the subnet are random per run;
the finaliser deletes every namespace and link (netns.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from harness import Cluster, Daemon, children_of
from netns import NetnsDaemon, Topology, unusable_reason
from test_cluster import chat, node_id, running_on
from tinymodels import write_tiny_gguf

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(unusable_reason() is not None,
                                 reason=str(unusable_reason()))]


@pytest.fixture(scope="module")
def topology():
    topology = Topology(3)
    topology.open()
    try:
        yield topology
    finally:
        topology.close()


@pytest.fixture(scope="module")
def nodes(topology: Topology, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("netns")
    daemons = [NetnsDaemon(topology, i, workdir / f"ns{i}") for i in (1, 2, 3)]
    cluster = Cluster(workdir, 0)
    cluster.nodes = daemons
    try:
        yield cluster
    finally:
        cluster.kill_all()


def test_a_token_alone_finds_a_member_by_mdns(nodes: Cluster) -> None:
    founder, *joiners = nodes.nodes
    founder.start(60)
    token = nodes.token(founder)
    for joiner in joiners:
        joiner.key = founder.admin_key
        joiner.extra_args = (*joiner.extra_args, "--token", token)   # no --join
        joiner.start(60)
        assert "(mDNS) answered; joining cluster" in joiner.output(), joiner.output()[-2000:]
    nodes.wait(lambda: all(len(nodes.status(n)["members"]) == 3 and nodes.status(n)["quorum"]
                           for n in nodes.nodes), "three members found by mDNS", 30)
    api_urls = {m["api_url"] for m in nodes.status(founder)["members"]}
    assert api_urls == {n.url for n in nodes.nodes}     # real addresses, not loopback
    # The advertisement carries ids and ports, never the secret.
    secret = (founder.data_dir / "cluster.secret").read_text().strip()
    assert secret not in token


def test_a_partition_stops_the_minority_the_majority_goes_on_and_healing_converges(
        nodes: Cluster, topology: Topology, tmp_path: Path) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    # The model file must be readable inside every namespace: same filesystem, same path.
    deployed = nodes.nodes[0].cli("deploy", str(tiny), "--name", "tiny", "--wait",
                                  "--timeout", "90")
    assert deployed.returncode == 0, deployed.stderr
    holder_id = running_on(nodes.nodes[0])[0]
    index = next(i for i, n in enumerate(nodes.nodes, 1) if node_id(n) == holder_id)
    minority = nodes.nodes[index - 1]
    majority = [n for n in nodes.nodes if n is not minority]
    engines_before = children_of(minority.process.pid)    # type: ignore[union-attr]
    assert engines_before

    topology.partition(index, connected=False)
    try:
        # The majority elects (or keeps) a leader, marks the cut-off node unreachable and
        # runs its model elsewhere.
        # One status read per look: between two reads a new election can leave `leader`
        # null for a moment (it raised TypeError out of the wait).
        def majority_leads() -> bool:
            status = nodes.status(majority[0])
            return bool(status["quorum"] and status["leader"]
                        and status["leader"]["node_id"] != holder_id)
        nodes.wait(majority_leads, "the majority has a leader", 30)
        nodes.wait(lambda: running_on(majority[0]) not in ([], [holder_id]),
                   "the model runs on the majority side", 60)
        assert chat(majority[0]) == (200, "hello there")
        made = majority[0].cli("join-token")               # a write on the majority side
        assert made.returncode == 0, made.stderr
        # The minority cannot write; its own engine still answers its own gateway.
        nodes.wait(lambda: not nodes.status(minority)["quorum"], "the minority lost quorum",
                   30)
        # (A write that changes nothing that is counted below: pysyncobj queues a refused
        # write and may still commit it after healing — the raft half reports that as
        # "outcome unknown".)
        code, body = minority.request("POST", "/api/join-tokens", {"ttl_s": 600}, timeout=60)
        # Refused, or not confirmed (a node that appended it cannot know): never a 2xx.
        assert (code, body["error"]["code"]) in ((503, "no_quorum"), (504, "outcome_unknown")), body
        assert chat(minority) == (200, "hello there")
        # What the majority settled on, which healing must not disturb.
        settled = nodes.status(majority[0])
        minority_term = nodes.status(minority)["term"]
    finally:
        topology.partition(index, connected=True)

    # Healing: one leader, one log, and the stale instance stops instead of running twice.
    nodes.wait(lambda: len({json.dumps(nodes.status(n)["leader"]) for n in nodes.nodes}) == 1
               and all(nodes.status(n)["quorum"] for n in nodes.nodes), "one leader again", 60)
    # PreVote: the cut-off node asked to campaign but never did (its term stayed at most the
    # majority's), so the majority's leader kept leading through the heal, in the same term.
    assert minority_term <= settled["term"], (minority_term, settled["term"])
    time.sleep(1.0)
    for node in nodes.nodes:
        status = nodes.status(node)
        assert status["leader"]["node_id"] == settled["leader"]["node_id"], status
        assert status["term"] == settled["term"], (status["term"], settled["term"])
    nodes.wait(lambda: running_on(minority) == running_on(majority[0])
               and len(running_on(minority)) == 1, "the healed node agrees", 30)
    nodes.wait(lambda: children_of(minority.process.pid) == []            # type: ignore[union-attr]
               or holder_id in running_on(minority), "the stale engine stopped", 30)
    code, nodes_seen = minority.api("/api/nodes")
    assert {n["id"]: n["state"] for n in nodes_seen["data"]}[holder_id] in ("ready",
                                                                           "unreachable")
    time.sleep(0.5)
    code, instances = majority[0].api("/api/instances")
    assert len([i for i in instances["data"] if i["model"] == "tiny"]) == 1


def test_a_loopback_node_cannot_join_a_cluster_on_the_network(nodes: Cluster,
                                                              tmp_path: Path) -> None:
    """Peers could never reach 127.0.0.1: refused before anything is written to the cluster."""
    founder = nodes.nodes[0]
    token = nodes.token(founder)
    stray = Daemon(tmp_path / "stray", "--discovery", "off", "--join",
                   f"{founder.host}:{founder.api_port}", "--token", token)
    stray.launch()
    assert stray.process.wait(60) == 1                    # type: ignore[union-attr]
    assert "loopback" in stray.output() and "--advertise" in stray.output()
    assert len(nodes.status(founder)["members"]) == 3
