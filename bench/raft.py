"""The Raft layer's figures: gpumesh's store beside raw pysyncobj defaults, in one run.

Three-process clusters on loopback, each node its own process (real sockets, real files):

* write latency p50/p99 of sequential writes, from the leader and from a follower;
* writes/s with many writes in flight;
* idle CPU per node (% of one core, /proc/PID/stat over --idle-s seconds, both clusters
  idle at once);
* gpumesh only: leader failover after kill -9 of the leader's process, median and worst of
  --kills rounds (time from the kill to the first survivor naming a new leader; the killed
  node is restarted on its journal and the cluster left steady before the next round);
  and after SIGSTOP of the leader (--freezes rounds): no FIN reaches the followers, as
  when a host dies or the network splits, so only the election timeout can tell.

Prints numbers; passes or fails nothing. Run: `.venv/bin/python bench/raft.py`.
A node is this file run as `node gpumesh|pysyncobj ...`, driven by lines on its stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SECRET = "bench-raft-cluster-secret-0123456789"


# --- one node (a subprocess) ---------------------------------------------------------------------

def _say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def _serve_gpumesh(address: str, members: list[str], folder: Path) -> None:
    from gpumesh.mesh.state import ClusterStore

    store = ClusterStore(self_address=address, partners=members, journal_file=folder / "journal",
                         snapshot_file=folder / "snapshot", secret=SECRET, bind_host="127.0.0.1")
    await store.start()

    async def watch() -> None:                   # event-driven: no polling while idle
        leader, version = store.status.leader, -1
        while True:
            view = await store.wait_changed(version, timeout=1.0)
            version = view.version
            if store.status.leader != leader:
                leader = store.status.leader
                _say(event="leader", leader=leader, t=time.monotonic())

    async def seq(count: int) -> list[float]:
        latencies = []
        for i in range(count):
            started = time.perf_counter()
            await store.submit({"op": "upsert_node", "node": {"id": "bench", "n": i}})
            latencies.append((time.perf_counter() - started) * 1000)
        return latencies

    async def burst(count: int, width: int) -> float:
        started = time.perf_counter()
        for first in range(0, count, width):
            await asyncio.gather(*(store.submit({"op": "upsert_node",
                                                 "node": {"id": f"b{first + i % width}"}})
                                   for i in range(min(width, count - first))))
        return time.perf_counter() - started

    watcher = asyncio.create_task(watch())
    loop = asyncio.get_running_loop()
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            words = line.split()
            if words[0] == "ready":
                await store.wait_ready(60)
                _say(event="ready", leader=store.status.leader, is_leader=store.status.is_leader)
            elif words[0] == "status":
                _say(event="status", leader=store.status.leader, ready=store.status.ready,
                     is_leader=store.status.is_leader,
                     connected=sum(p.connected for p in store.status.peers))
            elif words[0] == "seq":
                _say(event="seq", ms=await seq(int(words[1])))
            elif words[0] == "burst":
                _say(event="burst", s=await burst(int(words[1]), int(words[2])))
    finally:
        watcher.cancel()
        await store.stop()


def _serve_pysyncobj(address: str, members: list[str]) -> None:
    from pysyncobj import SyncObj, SyncObjConf, replicated

    class Counter(SyncObj):
        def __init__(self) -> None:
            # pysyncobj's defaults, plus the password and bind address any deployment needs.
            super().__init__(address, [m for m in members if m != address],
                             SyncObjConf(password=SECRET, bindAddress=address))
            self.value = 0

        @replicated
        def inc(self) -> int:
            self.value += 1
            return self.value

    counter = Counter()
    for line in sys.stdin:
        words = line.split()
        if words[0] == "ready":
            while not (counter.isReady() and counter._getLeader() is not None):
                time.sleep(0.05)
            _say(event="ready", leader=counter._getLeader().id, is_leader=counter._isLeader())
        elif words[0] == "seq":
            latencies = []
            for _ in range(int(words[1])):
                started = time.perf_counter()
                counter.inc(sync=True, timeout=10)
                latencies.append((time.perf_counter() - started) * 1000)
            _say(event="seq", ms=latencies)
        elif words[0] == "burst":
            count, done = int(words[1]), threading.Event()
            left = [count]
            lock = threading.Lock()

            def answered(result: object, error: object) -> None:
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()
            started = time.perf_counter()
            for _ in range(count):
                counter.inc(callback=answered)
            done.wait(120)
            _say(event="burst", s=time.perf_counter() - started)
    counter.destroy()


# --- the driver ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Node:
    def __init__(self, kind: str, address: str, members: list[str], folder: Path) -> None:
        self.kind, self.address, self.members, self.folder = kind, address, members, folder
        self.events: list[dict] = []
        self._cond = threading.Condition()
        self.start()

    def start(self) -> None:
        self.events = []
        self.process = subprocess.Popen(
            [sys.executable, __file__, "node", self.kind, self.address, str(self.folder),
             *self.members], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, bufsize=1)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()

    def ask(self, command: str, event: str, timeout: float = 120.0) -> dict:
        with self._cond:
            seen = len(self.events)
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.wait_for(lambda e: e["event"] == event, seen, timeout)

    def wait_for(self, match, after: int = 0, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events[after:]:
                    if match(event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.address}: no event in {timeout} s")
                self._cond.wait(left)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def cluster(kind: str, root: Path) -> list[Node]:
    members = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    nodes = []
    for address in members:
        folder = root / kind / address.replace(":", "_")
        folder.mkdir(parents=True)
        nodes.append(Node(kind, address, members, folder))
    for node in nodes:
        node.ask("ready", "ready")
    return nodes


def leader_of(nodes: list[Node]) -> Node:
    for _ in range(200):
        answers = [n.ask("ready", "ready") for n in nodes]
        leaders = {a["leader"] for a in answers}
        if len(leaders) == 1:
            return next(n for n in nodes if n.address in leaders)
        time.sleep(0.05)
    raise RuntimeError("no agreed leader")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latencies(nodes: list[Node], count: int) -> dict[str, list[float]]:
    leader = leader_of(nodes)
    follower = next(n for n in nodes if n is not leader)
    out = {}
    for name, node in (("leader", leader), ("follower", follower)):
        node.ask("seq 30", "seq")                          # warm up
        out[name] = node.ask(f"seq {count}", "seq")["ms"]
    return out


def failover(nodes: list[Node], kills: int, steady_s: float, freeze: bool = False) -> list[float]:
    times = []
    for round_ in range(kills):
        leader = leader_of(nodes)
        time.sleep(steady_s)
        survivors = [n for n in nodes if n is not leader]
        marks = [len(n.events) for n in survivors]
        killed_at = time.monotonic()
        if freeze:
            leader.process.send_signal(signal.SIGSTOP)
        else:
            leader.kill()
        elected = []
        for node, mark in zip(survivors, marks):
            try:
                event = node.wait_for(lambda e: e["event"] == "leader" and e["leader"]
                                      not in (None, leader.address) and e["t"] > killed_at,
                                      mark, timeout=15)
                elected.append(event["t"])
            except TimeoutError:
                pass
        what = "freeze" if freeze else "kill"
        if elected:
            times.append(min(elected) - killed_at)
            print(f"  {what} {round_ + 1}: new leader after {times[-1] * 1000:.0f} ms",
                  flush=True)
        else:
            print(f"  {what} {round_ + 1}: no new leader within 15 s", flush=True)
        if freeze:
            leader.process.send_signal(signal.SIGCONT)      # wakes up deposed, and follows
        else:
            leader.start()                                  # back on its journal
        leader.ask("ready", "ready")
    return times


def summary(times: list[float], rounds: int) -> None:
    if times:
        print(f"  median {statistics.median(times) * 1000:.0f} ms, worst "
              f"{max(times) * 1000:.0f} ms, best {min(times) * 1000:.0f} ms "
              f"({len(times)}/{rounds} elected)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--writes", type=int, default=300)
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--freezes", type=int, default=5)
    parser.add_argument("--steady-s", type=float, default=3.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpumesh-bench-raft-") as tmp:
        root = Path(tmp)
        clusters = {kind: cluster(kind, root) for kind in ("gpumesh", "pysyncobj")}
        try:
            print(f"write latency, {args.writes} sequential writes (ms):")
            for kind, nodes in clusters.items():
                for origin, ms in latencies(nodes, args.writes).items():
                    print(f"  {kind:9} from the {origin:8}  p50 {pct(ms, .5):7.2f}   "
                          f"p99 {pct(ms, .99):7.2f}   mean {statistics.mean(ms):7.2f}")
            print(f"throughput, {args.burst} writes from the leader, 64 in flight:")
            for kind, nodes in clusters.items():
                seconds = leader_of(nodes).ask(f"burst {args.burst} 64", "burst")["s"]
                print(f"  {kind:9} {args.burst / seconds:8.0f} writes/s")
            time.sleep(2)
            print(f"idle CPU over {args.idle_s:.0f} s (% of one core), both clusters idle:")
            everyone = [n for nodes in clusters.values() for n in nodes]
            leaders = {leader_of(nodes).address for nodes in clusters.values()}
            before = {n.address: cpu_seconds(n.process.pid) for n in everyone}
            time.sleep(args.idle_s)
            for kind, nodes in clusters.items():
                shares = [(cpu_seconds(n.process.pid) - before[n.address]) / args.idle_s * 100
                          for n in nodes]
                roles = ["leader" if n.address in leaders else "follower" for n in nodes]
                print(f"  {kind:9} " + "   ".join(f"{r} {s:.2f} %" for r, s in
                                                   zip(roles, shares)))
            for node in clusters.pop("pysyncobj"):
                node.stop()
            print(f"leader failover after kill -9 (gpumesh), {args.kills} kills, "
                  f"{args.steady_s:g} s steady before each:")
            summary(failover(clusters["gpumesh"], args.kills, args.steady_s), args.kills)
            if args.freezes:
                print(f"leader failover after SIGSTOP (gpumesh, no FIN), {args.freezes} rounds:")
                summary(failover(clusters["gpumesh"], args.freezes, args.steady_s, True),
                        args.freezes)
        finally:
            for nodes in clusters.values():
                for node in nodes:
                    node.stop()


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "node":
        kind, address, folder, *members = sys.argv[2:]
        if kind == "gpumesh":
            asyncio.run(_serve_gpumesh(address, members, Path(folder)))
        else:
            _serve_pysyncobj(address, members)
    else:
        main()
