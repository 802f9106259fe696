"""This node's place in its cluster: which cluster (found, join, or rejoin), its record in the
replicated state, and the small refresh that keeps that record current.

At start-up, before the Raft store exists, `establish` decides one of:

* **rejoin**: `cluster.json` says this node completed a join (or founded the cluster): start
  with the members it last saw; no flags needed.
* **join**: a token was given: ask a member (`--join`, else one found by mDNS, else the
  token's addresses) for the cluster secret and members (`hello`); the daemon then starts
  its store and asks the leader to add it (`confirm`). See joining.py for the protocol.
* **found**: nothing known, no token: a new cluster of one, with a new cluster id.

While running, `NodePresence` registers the node record (inventory, backends, addresses),
reads free memory and GPU memory every few seconds and writes them to the record when they
moved by a step the scheduler cares about (or a minute went by), and notices when this node
was removed from the cluster. Liveness does not need these writes: the leader hears every
node's Raft answers ten times a second (liveness.py). An idle cluster therefore writes
nothing, instead of one Raft entry (a journal fsync on every node, an apply, every watcher
woken) per node every 5 s.

`cluster.json` keeps the cluster id, this node's Raft address and whether its join
completed; the Raft member list itself is the store's (`<journal>.members`, kept current
by the raft layer), and wins over the members recorded here at join time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import aiohttp

from gpumesh import __version__
from gpumesh.backends.registry import node_backends

from .auth import ADMIN, new_api_key, new_user
from .config import Config
from .datadir import DataDir
from .joining import JoinError, JoinRequest, JoinToken, loopback_mismatch, open_reply, parse_token
from .probes import Probe
from .state import ClusterStore, CommandRejected, StateUnavailable

__all__ = ["ClusterIdentity", "JoinPlan", "NodePresence", "bootstrap_admin_key", "establish",
           "confirm_join", "HEARTBEAT_S"]

log = logging.getLogger("gpumesh.membership")

HEARTBEAT_S = 5.0             # how often this node reads its free memory and load
REFRESH_MAX_S = 60.0          # ...and writes them at least this often, changed or not
# A change of free RAM or of a GPU's used memory smaller than this is not written: it would
# not change a placement, and a write costs every node a journal fsync.
MEMORY_STEP_BYTES = 256 << 20
_JOIN_CONFIRM_DEADLINE_S = 60.0
_HTTP_TIMEOUT = aiohttp.ClientTimeout(total=15, sock_connect=3)

Discover = Callable[[str], Awaitable[list[str]]]   # cluster id -> member API urls


@dataclass
class ClusterIdentity:
    """What this node knows of its cluster from its data dir (cluster.json + the secret)."""

    cluster_id: str
    secret: str
    members: list[str]            # Raft addresses at join time (the store keeps the current)
    self_address: str
    joined: bool = True

    @property
    def partners(self) -> list[str]:
        return sorted(m for m in self.members if m != self.self_address)

    def save(self, data: DataDir) -> None:
        data.write_cluster({"cluster_id": self.cluster_id, "members": sorted(self.members),
                            "self": self.self_address, "joined": self.joined})


@dataclass
class JoinPlan:
    """A join half done: the member answered `hello`; `confirm` follows once Raft runs."""

    token: JoinToken
    ask: list[str]                # API urls to confirm with, the leader's first
    request: JoinRequest
    found_via: str = ""
    members_at_hello: list[str] = field(default_factory=list)


async def establish(config: Config, data: DataDir, node_id: str,
                    session: aiohttp.ClientSession,
                    discover: Discover | None) -> tuple[ClusterIdentity, JoinPlan | None]:
    """Found, join (hello) or rejoin; raise JoinError with the reason when none can work."""
    known = data.read_cluster()
    if known is not None and known.get("joined", True):
        if config.token:
            log.info("this node is already a member of cluster %s; --token/--join ignored",
                     known["cluster_id"])
        if known.get("self") and known["self"] != config.raft_address:
            raise JoinError(
                f"this node's Raft address was {known['self']} and is now "
                f"{config.raft_address}: a node's address is its identity in the cluster. "
                f"Start it with --advertise/--raft-port giving {known['self']}, or remove it "
                f"(`gpumesh node rm`), wipe {data.root}, and join again with a fresh token")
        if known.get("removed"):
            raise JoinError(
                f"this node was removed from cluster {known['cluster_id']}: wipe its journal "
                f"and cluster files ({data.root}/raft, {data.cluster_file}) and join again "
                f"with a fresh token (`gpumesh join-token` on a member)")
        return ClusterIdentity(known["cluster_id"], data.cluster_secret(),
                               list(known["members"]), config.raft_address), None
    if config.token:
        return await _hello(config, data, node_id, session, discover)
    if known is not None:
        raise JoinError("this node's join did not complete; start it again with --token "
                        "(and --join) to finish it")
    identity = ClusterIdentity(uuid.uuid4().hex[:12], data.cluster_secret(),
                               [config.raft_address], config.raft_address)
    identity.save(data)
    log.info("founding cluster %s", identity.cluster_id)
    return identity, None


async def _hello(config: Config, data: DataDir, node_id: str, session: aiohttp.ClientSession,
                 discover: Discover | None) -> tuple[ClusterIdentity, JoinPlan]:
    assert config.token
    token = parse_token(config.token)
    if data.has_journal():
        raise JoinError(f"{data.root} holds a Raft journal from another cluster or an earlier "
                        f"membership: wipe {data.journal_file.parent} before joining")
    request = JoinRequest("hello", token.cluster_id, token.token_id, node_id, config.node_name,
                          config.raft_address, config.api_url, os.urandom(16))
    candidates, via = await _candidates(config, token, discover)
    problems: list[str] = []
    for url in candidates:
        try:
            reply = await _post_join(session, url, token, request)
        except _Unreachable as exc:
            problems.append(f"{url}: {exc}")
            continue
        if problem := loopback_mismatch(config.raft_address, reply["members"]):
            raise JoinError(problem)
        data.write_cluster_secret(reply["cluster_secret"])
        identity = ClusterIdentity(reply["cluster_id"], reply["cluster_secret"],
                                   sorted({*reply["members"], config.raft_address}),
                                   config.raft_address, joined=False)
        identity.save(data)
        ask = [u for u in (reply.get("leader_api"), url) if u]
        log.info("member %s (%s) answered; joining cluster %s of %d member(s)", url,
                 via.get(url, "?"), identity.cluster_id, len(reply["members"]))
        return identity, JoinPlan(token, ask, request, via.get(url, ""), reply["members"])
    raise JoinError("no member of cluster " + token.cluster_id + " answered: "
                    + ("; ".join(problems) or "none found (pass --join HOST:PORT)"))


async def _candidates(config: Config, token: JoinToken,
                      discover: Discover | None) -> tuple[list[str], dict[str, str]]:
    via: dict[str, str] = {}
    if config.join:
        via[config.join] = "--join"
    else:
        if discover is not None:
            for url in await discover(token.cluster_id):
                via.setdefault(url, "mDNS")
        for url in token.api_urls:
            via.setdefault(url, "the token")
    return list(via), via


async def confirm_join(plan: JoinPlan, identity: ClusterIdentity, data: DataDir,
                       session: aiohttp.ClientSession) -> None:
    """Ask the leader to add this node (its Raft store runs now); retry through elections."""
    request = JoinRequest("confirm", plan.request.cluster_id, plan.request.token_id,
                          plan.request.node_id, plan.request.name, plan.request.raft_address,
                          plan.request.api_url, os.urandom(16))
    deadline = time.monotonic() + _JOIN_CONFIRM_DEADLINE_S
    last = ""
    while time.monotonic() < deadline:
        for url in plan.ask:
            try:
                reply = await _post_join(session, url, plan.token, request)
            except _Unreachable as exc:
                last = f"{url}: {exc}"
                continue
            identity.members = sorted({*reply["members"], identity.self_address})
            identity.joined = True
            identity.save(data)
            return
        await asyncio.sleep(0.5)
    raise JoinError(f"the leader did not add this node within "
                    f"{_JOIN_CONFIRM_DEADLINE_S:.0f} s ({last})")


class _Unreachable(Exception):
    """This member cannot answer now (down, no quorum): another may."""


async def _post_join(session: aiohttp.ClientSession, url: str, token: JoinToken,
                     request: JoinRequest) -> dict[str, Any]:
    try:
        async with session.post(f"{url}/api/join", json=request.signed(token.key),
                                timeout=_HTTP_TIMEOUT) as response:
            body = await response.json(content_type=None)
            status = response.status
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        raise _Unreachable(str(exc) or type(exc).__name__) from None
    if status >= 500:
        raise _Unreachable(_message(body, status))
    if status != 200:
        raise JoinError(f"{url} refused the join: {_message(body, status)}")
    return open_reply(token.key, request.nonce, body)


def _message(body: Any, status: int) -> str:
    try:
        return str(body["error"]["message"])
    except (KeyError, TypeError):
        return f"HTTP {status}"


class NodePresence:
    """This node's record in the state, kept current while the daemon runs."""

    def __init__(self, *, config: Config, data: DataDir, node_id: str, store: ClusterStore,
                 identity: ClusterIdentity, probe: Probe,
                 backends: list[dict[str, Any]], on_removed: Callable[[], None],
                 gpu_usage: Callable[[], list[dict[str, int]] | None] | None = None) -> None:
        self._config = config
        self._data = data
        self._node_id = node_id
        self._store = store
        self._identity = identity
        self._probe = probe
        self._backends = backends
        self._on_removed = on_removed
        self.removed = False         # set when this node saw its own record removed
        self._gpu_usage = gpu_usage         # the telemetry sampler's latest GPU memory figures

    async def register(self, status: str, timeout: float = 5.0) -> None:
        inventory = await asyncio.to_thread(self._probe.inventory)
        node = {"id": self._node_id, "name": self._config.node_name, "status": status,
                "labels": self._config.labels, "gpu_labels": self._config.gpu_labels,
                "api_url": self._config.api_url, "raft_address": self._config.raft_address,
                "version": __version__,
                "inventory": _capped(inventory.to_dict(), self._memory_limit()),
                "backends": node_backends(self._backends),
                "updated": time.time()}
        await self._store.submit({"op": "upsert_node", "node": node}, timeout=timeout)

    async def run(self) -> None:
        """Read the resources every HEARTBEAT_S and write those worth writing; stop the
        daemon as soon as this node's record disappears (it was removed from the cluster)."""
        loop = asyncio.get_running_loop()
        view = self._store.view
        next_beat = loop.time() + HEARTBEAT_S
        written: dict[str, Any] | None = None     # what the last committed refresh carried
        written_at = 0.0
        while True:
            view = await self._store.wait_changed(view.version,
                                                  timeout=max(0.0, next_beat - loop.time()))
            if self._node_id not in view.nodes:
                self._removed()
                return
            if loop.time() < next_beat:
                continue
            next_beat = loop.time() + HEARTBEAT_S
            resources = self._resources()
            if not worth_writing(written, resources, age_s=loop.time() - written_at):
                continue
            try:
                await self._store.submit({"op": "node_heartbeat", "id": self._node_id,
                                          "resources": resources, "at": time.time()},
                                         timeout=HEARTBEAT_S)
            except CommandRejected:
                continue                     # record gone: noticed at once on the next view
            except StateUnavailable as exc:
                log.debug("heartbeat not committed: %s", exc)
                continue
            written, written_at = resources, loop.time()

    def _resources(self) -> dict[str, Any]:
        resources = _capped(_resources(), self._memory_limit())
        gpus = self._gpu_usage() if self._gpu_usage is not None else None
        if gpus:
            resources["gpus"] = gpus
        return resources

    def _memory_limit(self) -> int | None:
        limit = self._config.memory_limit_mib
        return limit << 20 if limit else None

    def _removed(self) -> None:
        self.removed = True
        log.error("this node was removed from the cluster: stopping. To join again, wipe "
                  "%s/raft and %s and use a fresh token", self._data.root,
                  self._data.cluster_file)
        known = self._data.read_cluster() or {}
        self._data.write_cluster({**known, "removed": True})
        self._on_removed()


def _capped(record: dict[str, Any], limit: int | None) -> dict[str, Any]:
    """`--memory-limit-mib`: the node offers at most `limit` bytes of RAM (or less, when the
    machine itself has less free); bookings account for the instances within it."""
    if limit is None:
        return record
    return {**record, **{key: min(int(record[key]), limit) for key in
                         ("memory_total_bytes", "memory_available_bytes") if key in record}}


def worth_writing(written: dict[str, Any] | None, now: dict[str, Any], *,
                  age_s: float) -> bool:
    """Whether a resource reading is worth a Raft write, given the last one written
    `age_s` seconds ago: the first one, one a minute old, or one where free RAM or a GPU's
    used memory moved by MEMORY_STEP_BYTES or more (or the set of GPUs changed). Load alone
    never is: nothing places by it."""
    if written is None or age_s >= REFRESH_MAX_S:
        return True
    moved = abs(int(now.get("memory_available_bytes") or 0)
                - int(written.get("memory_available_bytes") or 0))
    if moved >= MEMORY_STEP_BYTES:
        return True
    before = {g["index"]: int(g["memory_used_bytes"]) for g in written.get("gpus") or ()}
    after = {g["index"]: int(g["memory_used_bytes"]) for g in now.get("gpus") or ()}
    return before.keys() != after.keys() or any(
        abs(after[i] - before[i]) >= MEMORY_STEP_BYTES for i in after)


def _resources() -> dict[str, Any]:
    """Free memory and load: what changes between inventory probes, read cheaply."""
    available = 0
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return {"memory_available_bytes": available, "load_1m": round(os.getloadavg()[0], 2)}


async def bootstrap_admin_key(store: ClusterStore, data: DataDir) -> None:
    """First start of a cluster: mint the admin key, store only its hash, show it once."""
    if any(k["role"] == ADMIN for k in store.view.api_keys.values()):
        return
    if not store.status.is_leader:
        return
    key, record = new_api_key("admin", ADMIN, user="admin")
    try:
        # The first key belongs to the first user, `admin`, made in the same command.
        await store.submit({"op": "create_api_key", "key": record, "only_if_no_admin": True,
                            "create_user": new_user("admin", ADMIN)})
    except CommandRejected:
        return                                  # another start minted it first
    path = data.write_admin_key(key)
    print(f"\n  Admin API key (shown once; also saved to {path}, mode 0600):\n"
          f"    {key}\n", flush=True)
