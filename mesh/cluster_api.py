"""The cluster's routes under /api: status, nodes (list, drain, remove), join tokens, joins.

Reads are local (this node's replica). A write that changes the Raft membership (a join's
`confirm`, removing a node) runs on the leader, one at a time: a follower forwards the HTTP
request to the leader's API and relays its answer. Other writes are replicated commands,
which pysyncobj forwards from any node.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from gpumesh import __version__

from .api_common import submit_or_error
from .errors import openai_error
from .joining import (DEFAULT_TOKEN_TTL_S, JoinError, JoinRequest, join_key, loopback_mismatch,
                      new_token, seal_reply, token_expired)
from .state import ClusterStore, CommandRejected, StateUnavailable

__all__ = ["ClusterApi", "ClusterContext", "OPEN_PATHS", "node_state"]

log = logging.getLogger("gpumesh.cluster")

OPEN_PATHS = ("/api/join",)              # a newcomer has no API key: it proves a token
_FORWARDED_HEADER = "X-Gpumesh-Forwarded"
_MEMBERSHIP_TIMEOUT_S = 15.0
_LEADER_TRANSFER_S = 5.0
_REMOVAL_NOTICE_S = 0.5          # five Raft heartbeats
_TOKEN_CATCH_UP_S = 1.0
_REJECTION_STATUS = {"node_not_found": 404}


@dataclass(frozen=True)
class ClusterContext:
    """What the cluster routes need beyond the store: who this node is, and the secret."""

    cluster_id: str
    secret: str
    api_url: str
    raft_address: str


def node_state(node: dict[str, Any]) -> str:
    """`ready`, `unreachable`, `draining` (or `stopped`): one word for people and scripts."""
    if node.get("draining") and node.get("status") != "unreachable":
        return "draining"
    return str(node.get("status", "unknown"))


class ClusterApi:
    def __init__(self, store: ClusterStore, node_id: str, started: float,
                 session: aiohttp.ClientSession, context: ClusterContext | None) -> None:
        self._store = store
        self._node_id = node_id
        self._started = started
        self._session = session
        self._context = context
        self._membership_lock = asyncio.Lock()

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/api/status", self.status)
        r.add_get("/api/nodes", self.list_nodes)
        r.add_post("/api/nodes/{name}/drain", self.drain_node)
        r.add_delete("/api/nodes/{name}", self.remove_node)
        r.add_post("/api/join-tokens", self.create_join_token)
        r.add_post("/api/join", self.join)

    # --- reads -----------------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        view = self._store.view
        raft = self._store.status
        by_address = {n.get("raft_address"): n for n in view.nodes.values()}
        leader = by_address.get(raft.leader) if raft.leader else None
        members = []
        for address in raft.members:
            node = by_address.get(address, {})
            members.append({"raft_address": address, "node_id": node.get("id"),
                            "name": node.get("name"), "api_url": node.get("api_url"),
                            "role": "leader" if address == raft.leader else "follower",
                            "state": node_state(node) if node else "joining"})
        return web.json_response({
            "version": __version__,
            "node_id": self._node_id,
            "cluster_id": self._context.cluster_id if self._context else None,
            "uptime_s": round(time.time() - self._started, 1),
            "leader": ({"node_id": leader.get("id") if leader else None,
                        "api_url": leader.get("api_url") if leader else None,
                        "raft_address": raft.leader} if raft.leader else None),
            "term": raft.term,
            # Writes commit only through a leader with a majority: a node cut off from the
            # majority may still count connections for a while, but it has no leader.
            "quorum": raft.has_quorum and raft.leader is not None,
            "members": members,
            "raft": raft.to_dict(),
            "counts": {"nodes": len(view.nodes), "models": len(view.models),
                       "instances": len(view.instances)},
        })

    async def list_nodes(self, request: web.Request) -> web.Response:
        raft = self._store.status
        data = []
        for node in sorted(self._store.view.nodes.values(), key=lambda n: n["name"]):
            address = node.get("raft_address")
            role = ("leader" if address == raft.leader else
                    "follower" if address in raft.members else "none")
            data.append({**node, "state": node_state(node), "role": role})
        return web.json_response({"data": data})

    # --- node drain and removal ------------------------------------------------------------

    async def drain_node(self, request: web.Request) -> web.Response:
        node = self._find_node(request.match_info["name"])
        if isinstance(node, web.Response):
            return node
        body = await _json_body(request)
        undo = bool(body.get("undo")) if isinstance(body, dict) else False
        result = await self._submit({"op": "drain_node", "id": node["id"], "draining": not undo})
        if isinstance(result, web.Response):
            return result
        # The instances stay until their replacements run elsewhere (commands/nodes.py).
        return web.json_response({"node": node["id"], "name": node["name"],
                                  "state": "ready" if undo else "draining",
                                  "instances_moving": result["instances_leaving"]})

    async def remove_node(self, request: web.Request) -> web.Response:
        node = self._find_node(request.match_info["name"])
        if isinstance(node, web.Response):
            return node
        if not self._store.status.is_leader:
            return await self._forward_to_leader(request, None)
        if node.get("raft_address") == self._store.status.self_address:
            # A leader cannot take itself out: hand leadership over, then let the new
            # leader do it.
            moved = await self._step_down()
            if isinstance(moved, web.Response):
                return moved
            return await self._forward_to_leader(request, None)
        async with self._membership_lock:
            # The record goes first, while the node is still a member and hears it: a node
            # that sees its own record removed stops itself (it would campaign otherwise).
            result = await self._submit({"op": "remove_node", "id": node["id"]})
            if isinstance(result, web.Response):
                return result
            address = node.get("raft_address")
            if address in self._store.status.members:
                if _connected(self._store.status, address):
                    # A follower applies an entry when a later heartbeat carries the commit
                    # index; after remove_member none comes. A few heartbeats' time lets it
                    # learn that its record is gone (and stop itself).
                    await asyncio.sleep(_REMOVAL_NOTICE_S)
                try:
                    await self._store.remove_member(address, timeout=_MEMBERSHIP_TIMEOUT_S)
                except (StateUnavailable, CommandRejected) as exc:
                    return _unavailable(f"the node's record is removed but its Raft membership "
                                        f"is not: {exc}; run the command again")
        log.info("node %s (%s) removed from the cluster", node["name"], node["id"])
        return web.json_response({
            "removed": node["id"], "name": node["name"],
            "instances_moved": result["instances_removed"],
            "note": "to run it again, wipe its data dir (its Raft journal holds the old "
                    "membership) and join with a fresh token"})

    async def _step_down(self) -> web.Response | None:
        try:
            await self._store.transfer_leadership(timeout=_LEADER_TRANSFER_S)
        except (StateUnavailable, CommandRejected) as exc:
            return _unavailable(f"this node leads and could not hand leadership over: {exc}")
        return None

    def _find_node(self, name: str) -> dict[str, Any] | web.Response:
        nodes = self._store.view.nodes
        if name in nodes:
            return nodes[name]
        named = [n for n in nodes.values() if n["name"] == name]
        if len(named) == 1:
            return named[0]
        if named:
            return openai_error(409, f"{len(named)} nodes are named {name!r}: use the node id "
                                     f"({', '.join(n['id'] for n in named)})",
                                code="ambiguous_node")
        return openai_error(404, f"no node named {name!r}", code="node_not_found")

    # --- join tokens and joins -------------------------------------------------------------

    async def create_join_token(self, request: web.Request) -> web.Response:
        if self._context is None:
            return _unavailable("this node has no cluster identity")
        body = await _json_body(request)
        ttl = body.get("ttl_s", DEFAULT_TOKEN_TTL_S) if isinstance(body, dict) else None
        if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not 60 <= ttl <= 30 * 86400:
            return openai_error(400, "ttl_s must be a number of seconds from 60 to 2592000",
                                param="ttl_s")
        urls = [self._context.api_url] + sorted(
            n["api_url"] for n in self._store.view.nodes.values()
            if n.get("api_url") and n["api_url"] != self._context.api_url
            and n.get("status") == "ready")
        token, token_id = new_token(self._context.cluster_id, self._context.secret, urls[:5])
        now = time.time()
        result = await self._submit({"op": "create_join_token", "token": {
            "id": token_id, "created": now, "expires": now + ttl}})
        if isinstance(result, web.Response):
            return result
        return web.json_response({"token": token.encode(), "id": token_id,
                                  "expires": now + ttl, "cluster_id": self._context.cluster_id,
                                  "api_urls": urls[:5]}, status=201)

    async def join(self, request: web.Request) -> web.Response:
        if self._context is None:
            return _unavailable("this node has no cluster identity")
        try:
            body = await request.json()
            join, proof = JoinRequest.from_body(body)
        except (ValueError, JoinError) as exc:
            return openai_error(400, str(exc), code="bad_join_request")
        if join.cluster_id != self._context.cluster_id:
            return openai_error(403, f"this node belongs to cluster {self._context.cluster_id}, "
                                     f"not {join.cluster_id}", code="wrong_cluster")
        record = await self._join_token(join.token_id)
        key = join_key(self._context.secret, join.token_id)
        if record is None or token_expired(record) or not join.verify(key, proof):
            # One answer for unknown, expired and forged: no oracle for guessing.
            return openai_error(403, "the join token is not valid here (unknown, expired or "
                                     "damaged): get a fresh one with `gpumesh join-token`",
                                code="invalid_join_token")
        members = sorted(self._store.status.members)
        if problem := loopback_mismatch(join.raft_address, members):
            return openai_error(400, problem, code="unusable_address")
        if join.step == "hello":
            return web.json_response(seal_reply(key, join.nonce, {
                "cluster_id": self._context.cluster_id, "cluster_secret": self._context.secret,
                "members": members, "leader_api": self._leader_api()}))
        if not self._store.status.is_leader:
            return await self._forward_to_leader(request, body)
        problem = await self._admit(join)
        if problem is not None:
            return problem
        return web.json_response(seal_reply(key, join.nonce, {
            "members": sorted(self._store.status.members)}))

    async def _join_token(self, token_id: str) -> dict[str, Any] | None:
        """The token's record; a token minted a moment ago on another node may reach this
        replica a heartbeat later, so an unknown one is waited for briefly."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _TOKEN_CATCH_UP_S
        view = self._store.view
        while (record := view.join_tokens.get(token_id)) is None:
            left = deadline - loop.time()
            if left <= 0:
                return None
            view = await self._store.wait_changed(view.version, timeout=left)
        return record

    async def _admit(self, join: JoinRequest) -> web.Response | None:
        """Add the newcomer's Raft address, one membership change at a time."""
        async with self._membership_lock:
            members = self._store.status.members
            holder = next((n for n in self._store.view.nodes.values()
                           if n.get("raft_address") == join.raft_address), None)
            if join.raft_address in members:
                if holder is None or holder["id"] == join.node_id:
                    return None                   # already in: a retried confirm
                # The address belongs to a node whose data dir was wiped: the old member is
                # gone (its journal with it), so it leaves before the new one comes in.
                log.info("%s rejoins as node %s (was node %s): replacing the old member",
                         join.raft_address, join.node_id, holder["id"])
                try:
                    await self._store.submit({"op": "remove_node", "id": holder["id"]})
                    await self._store.remove_member(join.raft_address,
                                                    timeout=_MEMBERSHIP_TIMEOUT_S)
                except (StateUnavailable, CommandRejected) as exc:
                    return _unavailable(f"could not replace the old member: {exc}")
            try:
                await self._store.add_member(join.raft_address, timeout=_MEMBERSHIP_TIMEOUT_S)
            except (StateUnavailable, CommandRejected) as exc:
                return _unavailable(f"could not add {join.raft_address}: {exc}")
        log.info("node %s (%s) joined at %s", join.name, join.node_id, join.raft_address)
        return None

    # --- helpers ---------------------------------------------------------------------------

    def _leader_api(self) -> str | None:
        leader = self._store.status.leader
        for node in self._store.view.nodes.values():
            if leader and node.get("raft_address") == leader:
                return node.get("api_url")
        return None

    async def _forward_to_leader(self, request: web.Request, body: Any) -> web.Response:
        url = self._leader_api()
        if url is None or request.headers.get(_FORWARDED_HEADER):
            return _unavailable("there is no leader to take this change now (no quorum, or "
                                "an election)")
        headers = {_FORWARDED_HEADER: self._node_id}
        if auth := request.headers.get("Authorization"):
            headers["Authorization"] = auth
        try:
            async with self._session.request(
                    request.method, url + request.path_qs, json=body, headers=headers,
                    timeout=aiohttp.ClientTimeout(total=60, sock_connect=3)) as answer:
                return web.Response(status=answer.status, body=await answer.read(),
                                    content_type="application/json")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return _unavailable(f"the leader ({url}) did not answer: {exc}")

    async def _submit(self, command: dict[str, Any]) -> dict[str, Any] | web.Response:
        return await submit_or_error(self._store, command, _REJECTION_STATUS)


def _connected(status: Any, address: str) -> bool:
    return any(p.address == address and p.connected for p in getattr(status, "peers", ()))


def _unavailable(message: str) -> web.Response:
    return openai_error(503, message, type_="server_error", code="no_quorum",
                        headers={"Retry-After": "2"})


async def _json_body(request: web.Request) -> Any:
    if not request.can_read_body:
        return {}
    try:
        return await request.json()
    except ValueError:
        return None
