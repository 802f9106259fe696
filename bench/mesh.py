"""The cluster's figures, with real daemons on loopback: discovery to joined, leader
failover after kill -9, idle CPU and RSS per daemon, dead node to its model serving
elsewhere.

Prints numbers; passes or fails nothing. Run: `.venv/bin/python bench/mesh.py [--kills N]
[--skip joins,failover,idle,dead]`.
Every loop is bounded in count and time. mDNS runs on loopback only (the daemons bind
127.0.0.1, and discovery binds to the advertised address). Raw write latency beside
pysyncobj's defaults is bench/raft.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness import Cluster, Daemon, http_json, rss_kib  # noqa: E402
from tinymodels import write_tiny_gguf  # noqa: E402

POLL_S = 0.01
CHAT = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raft(node: Daemon) -> dict:
    code, body = http_json(node.url + "/api/status", key=node.admin_key, timeout=2)
    return body["raft"] if code == 200 else {}


def wait_until(predicate, limit_s: float) -> float | None:
    """Seconds until `predicate()` holds (polled every POLL_S), or None after `limit_s`."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        try:
            if predicate():
                return time.perf_counter() - started
        except (KeyError, TypeError):
            pass
        time.sleep(POLL_S)
    return None


def summary(values: list[float], unit: str = "s") -> str:
    if not values:
        return "no samples"
    ordered = sorted(values)
    return (f"median {statistics.median(ordered):.3f} {unit}, worst {ordered[-1]:.3f} {unit}, "
            f"best {ordered[0]:.3f} {unit} (n={len(ordered)})")


# --- discovery to joined ---------------------------------------------------------------------

def bench_joins(work: Path, rounds: int) -> None:
    print("\n== discovery to joined (launch of `gpumesh up` → healthy member)")
    founder = Daemon(work / "join-founder", "--node-name", "founder")
    founder.start(60)
    try:
        for how in ("--join", "mDNS"):
            times = []
            for i in range(rounds):
                token = founder.cli("join-token", "--ttl", "600").stdout.strip()
                extra = ("--join", f"127.0.0.1:{founder.api_port}") if how == "--join" else ()
                joiner = Daemon(work / f"join-{how.strip('-')}-{i}", "--node-name",
                                f"j{how.strip('-')}{i}", "--token", token, *extra)
                joiner.key = founder.admin_key
                started = time.perf_counter()
                try:
                    joiner.launch()
                    joiner.wait_healthy(60)
                    members = wait_until(lambda: raft(founder)["members"].count(
                        f"127.0.0.1:{joiner.raft_port}") == 1, 30)
                    times.append(time.perf_counter() - started)
                    found = "(mDNS) answered" in joiner.output()
                    # Leave the cluster again, so every round joins a 1-node cluster.
                    joiner.cli("node", "rm", f"j{how.strip('-')}{i}", "--url", founder.url)
                    joiner.process.wait(30)                 # type: ignore[union-attr]
                finally:
                    joiner.kill()
                if how == "mDNS" and not found:
                    print("   (this round did not find the member by mDNS)")
                assert members is not None
            print(f"  {how:7} {summary(times)}")
    finally:
        founder.kill()


# --- leader failover ---------------------------------------------------------------------------

def bench_failover(cluster: Cluster, kills: int) -> None:
    print(f"\n== leader failover: kill -9 of the leader, {kills} times (3 nodes)")
    elected, rejoined = [], []
    for _ in range(kills):
        leader = cluster.leader()
        survivors = [n for n in cluster.nodes if n is not leader]
        time.sleep(2.0)                                    # steady state, idle links
        old = raft(leader)["leader"]
        leader.process.send_signal(signal.SIGKILL)         # type: ignore[union-attr]
        killed = time.perf_counter()
        leader.process.wait(10)                            # type: ignore[union-attr]
        took = wait_until(lambda: all(raft(n).get("leader") not in (None, old)
                                      for n in survivors), 20)
        if took is not None:
            elected.append(time.perf_counter() - killed - POLL_S / 2)
        leader.launch()
        leader.wait_healthy(60)
        back = wait_until(lambda: all(len(raft(n)["members"]) == 3 and raft(n)["has_quorum"]
                                      and raft(n)["leader"] for n in cluster.nodes), 30)
        rejoined.append(back or float("nan"))
    print(f"  new leader seen by both survivors: {summary(elected)}")
    print(f"  (restarted node healthy → all agree: {summary(rejoined)})")


# --- idle cost ---------------------------------------------------------------------------------

def bench_idle(cluster: Cluster, seconds: float, windows: int) -> None:
    """CPU of each daemon process (every thread; engines are other processes): utime+stime
    from /proc/PID/stat over `windows` windows of `seconds`, the median per node. Roles are
    read before and after each window; a window in which the leader changed is not counted."""
    print(f"\n== idle cost per daemon (3 nodes, one model loaded; /proc/PID/stat utime+stime, "
          f"median of {windows} windows of {seconds:.0f} s)")
    time.sleep(3.0)
    shares: dict[Daemon, list[float]] = {n: [] for n in cluster.nodes}
    roles: dict[Daemon, str] = {}
    writes = []
    for _ in range(windows):
        leader = cluster.leader()
        first = raft(leader).get("commit_index", 0)
        before = {n: cpu_seconds(n.process.pid) for n in cluster.nodes}  # type: ignore[union-attr]
        started = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - started
        after = {n: cpu_seconds(n.process.pid) for n in cluster.nodes}   # type: ignore[union-attr]
        if cluster.leader() is not leader:
            print("  (the leader changed during a window: not counted)")
            continue
        writes.append(raft(leader).get("commit_index", 0) - first)
        for node in cluster.nodes:
            shares[node].append((after[node] - before[node]) / elapsed * 100)
            roles[node] = "leader  " if node is leader else "follower"
    for node in cluster.nodes:
        if not shares[node]:
            continue
        pid = node.process.pid                              # type: ignore[union-attr]
        values = ", ".join(f"{v:.2f}" for v in shares[node])
        print(f"  {node.data_dir.name} {roles[node]} CPU {statistics.median(shares[node]):5.2f} % "
              f"of a core (windows: {values}), RSS {rss_kib(pid) / 1024:6.1f} MiB")
    if writes:
        print(f"  Raft entries committed per window: {writes} (a node writes its resources when "
              f"its free memory moves by 256 MiB, or once a minute)")


# --- dead node to serving elsewhere ------------------------------------------------------------

def bench_dead_node(cluster: Cluster, rounds: int) -> None:
    print("\n== dead node → its model serving elsewhere (kill -9 of the node that runs it)")
    detected, serving = [], []
    for _ in range(rounds):
        leader = cluster.leader()
        code, model = http_json(leader.url + "/api/models/tiny", key=leader.admin_key)
        holder_id = next(i["node_id"] for i in model["instances"] if i["state"] == "running")
        holder = next(n for n in cluster.nodes if json.loads(
            (n.data_dir / "node.json").read_text())["id"] == holder_id)
        front = next(n for n in cluster.nodes if n is not holder)
        holder.process.send_signal(signal.SIGKILL)          # type: ignore[union-attr]
        killed = time.perf_counter()
        holder.process.wait(10)                             # type: ignore[union-attr]

        def node_state() -> str:
            code, nodes = http_json(front.url + "/api/nodes", key=front.admin_key, timeout=2)
            return next(n["state"] for n in nodes["data"] if n["id"] == holder_id)

        def answered() -> bool:
            code, _ = http_json(front.url + "/v1/chat/completions", "POST", CHAT,
                                key=front.admin_key, timeout=5)
            return code == 200
        if wait_until(lambda: node_state() == "unreachable", 30) is not None:
            detected.append(time.perf_counter() - killed)
        if wait_until(answered, 60) is not None:
            serving.append(time.perf_counter() - killed)
        holder.launch()
        holder.wait_healthy(60)
        wait_until(lambda: node_state() == "ready", 30)
    print(f"  marked unreachable after: {summary(detected)}")
    print(f"  a chat through another node answered after: {summary(serving)} "
          f"(grace 5 s + placement + engine start)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--idle-windows", type=int, default=3)
    parser.add_argument("--skip", default="", help="comma-separated parts not to run: "
                        "joins, failover, idle, dead")
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    work = Path(tempfile.mkdtemp(prefix="gpumesh-bench-mesh-"))
    try:
        if "joins" not in skip:
            bench_joins(work, args.rounds)
        cluster = Cluster(work / "cluster", 3)
        cluster.start()
        try:
            if "failover" not in skip:
                bench_failover(cluster, args.kills)
            model = write_tiny_gguf(work / "tiny.gguf")
            deployed = cluster.nodes[0].cli("deploy", str(model), "--name", "tiny", "--wait",
                                            "--timeout", "120")
            assert deployed.returncode == 0, deployed.stderr
            if "idle" not in skip:
                bench_idle(cluster, args.idle_seconds, args.idle_windows)
            if "dead" not in skip:
                bench_dead_node(cluster, args.rounds)
        finally:
            cluster.kill_all()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
