"""The Raft port: a pysyncobj transport class (`GmTransport`) with gpumesh's connections.

pysyncobj's own transport buffers a frame of any declared size before checking anything,
and unpickles what it decrypts (../RAFT-NOTES.md §4). This one keeps pysyncobj's
TCPTransport (who dials whom, node bookkeeping) and replaces what travels:

* `wire`: bounded frames, a handshake that proves the cluster secret, ChaCha20-Poly1305
  per frame after it; `connection`: one such connection (`GmConnection`), connected only
  after the handshake, and the listening socket (`GmServer`).
* Only dicts whose `type` is one of pysyncobj's peer messages pass (`check_message`), plus
  gpumesh's own PreVote messages (checked for shape, handled by `prevote.PreVote`, never
  handed to pysyncobj); pysyncobj's utility commands (status, add, remove, set_version,
  transfer: lists) are refused, and so is a forwarded command that is not a plain
  state-machine call (a membership or version change, or bytes that do not decode).
* Unauthenticated connections are cut after `connection.HANDSHAKE_DEADLINE_S`, and at most
  `MAX_PENDING` of them exist at once (more are closed as they are accepted).
* Messages are buffered and leave together (`flush`) at the end of each tick and of each
  batch of received frames, after the journal is made durable (`before_flush`): one
  fdatasync covers a burst of entries, and no ack gets ahead of the disk.
* A follower repeats an unchanged ack (`next_node_idx`: success, same index) on the same
  link at most every `ACK_REPEAT_S`: an idle leader's heartbeats (ten a second) then cost
  it one answer in three, not every one (an idle node's CPU is mostly these wake-ups). The
  leader learns nothing from a repeat; it still hears each follower far inside its 1.5 s
  fallback and the 5 s liveness grace. Any ack that moves the index, and every refusal,
  goes out.

The leader-FIN hook lives here too: when the leader's connection closes, followers start
an election at once, in address order (`RaftNode` explains).
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any, Callable

from pysyncobj.node import TCPNode
from pysyncobj.transport import TCPTransport

from . import codec, internals, prevote
from .connection import HANDSHAKE_DEADLINE_S, GmConnection, GmServer, Refused
from .internals import clock
from .wire import ClientHandshake, cluster_key

__all__ = ["ACK_REPEAT_S", "GmTransport", "MAX_PENDING"]

log = logging.getLogger("gpumesh.raft")

MAX_PENDING = 32
# pysyncobj's peer messages; anything else from a peer is a protocol violation.
_PEER_TYPES = frozenset({"request_vote", "response_vote", "append_entries", "next_node_idx",
                         "apply_command", "apply_command_response", "timeout_now"})
# gpumesh's own peer messages, handled here and never handed to pysyncobj (prevote.py).
_OWN_TYPES = prevote.MESSAGE_TYPES
_REGULAR_COMMAND = 0                 # pysyncobj's _COMMAND_TYPE.REGULAR

# An unchanged ack is repeated at most this often (see the module docstring).
ACK_REPEAT_S = 0.3
# FIN hook timing (see RaftNode): the first follower in address order campaigns after
# ~20 ms, the next one a step later, so their requests do not split the vote.
_FIN_ELECTION_DELAY_S = 0.02
_FIN_RANK_STEP_S = 0.08


class GmTransport(TCPTransport):
    """pysyncobj's TCPTransport with gpumesh's connections (see the module docstring).
    Use as `transportClass=functools.partial(GmTransport, secret=...)`."""

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any, *, secret: str) -> None:
        self.key = cluster_key(secret)
        self.self_address = selfNode.address
        self._refusals: dict[str, float] = {}
        self.pending: set[GmConnection] = set()      # connections with buffered messages
        self.journal: Any = None                     # told where each message starts and ends
        # Called before buffered messages leave: makes the journal durable (RaftNode sets it).
        self.before_flush: Callable[[], None] = lambda: None
        self.prevote: prevote.PreVote | None = None  # RaftNode sets it
        # node → (its link, the last ack sent on it, clock() when): see ACK_REPEAT_S
        self._acks: dict[Any, tuple[Any, tuple[Any, ...], float]] = {}
        self.acks_held = 0                           # repeats not sent (tests, benchmarks)
        super().__init__(syncObj, selfNode, otherNodes)

    def send(self, node: Any, message: Any) -> bool:
        if message.get("type") == "next_node_idx" and self._repeated_ack(node, message):
            self.acks_held += 1
            return True
        return super().send(node, message)

    def _repeated_ack(self, node: Any, message: dict[str, Any]) -> bool:
        """Whether this ack repeats one sent on the same link less than ACK_REPEAT_S ago
        (and records it as sent otherwise). A new link starts afresh."""
        conn = self._connections.get(node)
        if conn is None:
            return False
        link = (conn, conn.started)      # an outgoing connection object redials in place
        key = (message["next_node_idx"], message["success"], message["reset"])
        now = clock()
        last = self._acks.get(node)
        if message["success"] and not message["reset"] and last is not None \
                and last[0] == link and last[1] == key and now - last[2] < ACK_REPEAT_S:
            return True
        self._acks[node] = (link, key, now)
        return False

    # --- hooks TCPTransport calls ----------------------------------------------------------

    def _createServer(self) -> None:
        host, port = self._syncObj.conf.bindAddress.rsplit(":", 1)
        self._server = GmServer(self, host.strip("[]"), int(port))

    def addNode(self, node: Any) -> None:
        self._nodes.add(node)
        self._nodeAddrToNode[node.address] = node
        if self._shouldConnect(node):
            conn = GmConnection(self, peer_address=node.address)
            conn.setOnConnectedCallback(lambda c=conn: self._onOutgoingConnected(c))
            conn.setOnMessageReceivedCallback(lambda m, n=node: self._onMessageReceived(n, m))
            conn.setOnDisconnectedCallback(lambda c=conn: self._onDisconnected(c))
            self._connections[node] = conn

    def _onMessageReceived(self, node: Any, message: Any) -> None:
        kind = message["type"]
        if self.prevote is not None:
            if kind in _OWN_TYPES:
                self.prevote.on_message(self._syncObj, self, node, message)
                return
            if kind == "append_entries":
                self.prevote.saw_append(self._syncObj, message["term"])
        elif kind in _OWN_TYPES:
            return
        journal = self.journal
        if journal is None:
            super()._onMessageReceived(node, message)
            return
        journal.begin_message(message["term"] if message["type"] == "append_entries" else None)
        try:
            super()._onMessageReceived(node, message)
        finally:
            journal.end_message()

    def _onOutgoingConnected(self, conn: GmConnection) -> None:
        node = self._connToNode(conn)
        if node is not None:
            self._onNodeConnected(node)

    def _onTick(self) -> None:
        super()._onTick()
        now = clock()
        for conn in [*self._unknownConnections, *self._connections.values()]:
            if conn.expired(now):
                log.debug("Raft connection %s: no handshake within %.0f s; closed",
                          conn.peer or conn.remote, HANDSHAKE_DEADLINE_S)
                conn.disconnect()

    def _onNodeDisconnected(self, node: Any) -> None:
        super()._onNodeDisconnected(node)
        raft = self._syncObj
        if raft._getLeader() == node and not raft._isLeader():
            others = sorted(n.id for n in raft.otherNodes if n != node)
            rank = sorted([*others, raft.selfNode.id]).index(raft.selfNode.id)
            delay = _FIN_ELECTION_DELAY_S + rank * _FIN_RANK_STEP_S + random.uniform(0, 0.02)
            internals.set_election_deadline(raft, clock() + delay)

    def flush(self) -> None:
        """Send what messages are buffered, after the journal is durable: nothing this node
        says (an ack, a vote, an append) may get ahead of what it has stored."""
        if not self.pending:
            self.before_flush()
            return
        self.before_flush()
        pending, self.pending = self.pending, set()
        for conn in pending:
            conn.flush()

    # --- what connections ask --------------------------------------------------------------

    def client_handshake(self, server: str) -> ClientHandshake:
        return ClientHandshake(self.key, self.self_address, server)

    def is_member(self, address: str) -> bool:
        return address in self._nodeAddrToNode

    def accepting(self) -> bool:
        return len(self._unknownConnections) < MAX_PENDING

    def incoming(self, conn: GmConnection) -> None:
        self._unknownConnections.add(conn)
        conn.setOnConnectedCallback(lambda c=conn: self._on_incoming_authenticated(c))
        conn.setOnDisconnectedCallback(lambda c=conn: self._onDisconnected(c))

    def _on_incoming_authenticated(self, conn: GmConnection) -> None:
        self._unknownConnections.discard(conn)
        node = self._nodeAddrToNode.get(conn.peer or "")
        if node is None or self._shouldConnect(node):
            # We dial that node ourselves (the higher address dials): its dial is a mistake.
            self.refused(conn, "a dial from a node this one dials itself")
            conn.disconnect()
            return
        old = self._connections.get(node)
        self._connections[node] = conn
        conn.setOnMessageReceivedCallback(lambda m, n=node: self._onMessageReceived(n, m))
        if old is not None and old is not conn:
            old.disconnect()                 # it is no longer the node's: no callback fires
        self._onNodeConnected(node)

    def check_message(self, message: Any) -> None:
        """Let through only pysyncobj's peer messages, and only plain forwarded commands."""
        if not isinstance(message, dict) or message.get("type") not in _PEER_TYPES | _OWN_TYPES:
            kind = message.get("type") if isinstance(message, dict) else type(message).__name__
            raise Refused(f"a message of type {kind!r} (not a Raft peer message)")
        if message["type"] in _OWN_TYPES:
            fields = (("round", int), ("granted", bool)) if message["type"] == "pre_vote_answer" \
                else (("round", int), ("term", int), ("last_log_index", int),
                      ("last_log_term", int))
            if not all(isinstance(message.get(name), kind) for name, kind in fields):
                raise Refused(f"a malformed {message['type']}")
            return
        if message["type"] == "append_entries" and not isinstance(message.get("term"), int):
            raise Refused("an append without a term")
        if message["type"] == "apply_command":
            command = message.get("command")
            if not (isinstance(command, bytes) and command[:1] == bytes([_REGULAR_COMMAND])):
                raise Refused("a forwarded command that is not a state-machine call")
            try:
                call = codec.loads(command[1:])
            except codec.CodecError:
                raise Refused("a forwarded command that does not decode") from None
            if not (isinstance(call, tuple) and len(call) == 2 and isinstance(call[0], int)
                    and isinstance(call[1], tuple)):
                raise Refused("a forwarded command of the wrong shape")

    def refused(self, conn: GmConnection, why: str) -> None:
        """Log why a connection was closed, at most once a minute per remote host."""
        host = conn.remote.rsplit(":", 1)[0]
        now = time.monotonic()
        if now - self._refusals.get(host, -1e9) < 60:
            return
        self._refusals[host] = now
        if len(self._refusals) > 1024:
            self._refusals.clear()
        log.warning("Raft port: closed the connection from %s (%s): %s", conn.remote,
                    conn.peer or "unauthenticated", why)

    def last_received(self, node: Any) -> float | None:
        """clock() of the last authenticated frame from `node` on its live link, or None."""
        conn = self._connections.get(node)
        if conn is None or not conn.authenticated:
            return None
        return conn.last_received

    def last_heard(self) -> dict[str, float]:
        """Member address → clock() of its last authenticated frame on the live link."""
        return {node.address: conn.last_received for node, conn in self._connections.items()
                if isinstance(node, TCPNode) and conn.authenticated
                and conn.last_received is not None}
