"""The Raft port's wire: bounded frames, a handshake that proves the cluster secret, AEAD.

pysyncobj's own transport buffers a frame of any declared size before checking anything,
and unpickles what it decrypts (../RAFT-NOTES.md §4). This one is a pysyncobj transport
class (`GmTransport`, with its own connection and server classes) that speaks:

* Frames: a 4-byte big-endian length, checked the moment it arrives — at most
  `PREAUTH_MAX_FRAME` bytes before authentication, `MAX_FRAME` after — then the body.
* Handshake (plain msgpack, tiny frames), K derived from the cluster secret with HKDF:
    dialer   → HELLO      [version, nonce_c, dialer's address]
    listener → CHALLENGE  [nonce_s, HMAC(K, "server" | nonce_c | nonce_s | addresses)]
    dialer   → PROOF      [HMAC(K, "client" | nonce_c | nonce_s | addresses)]
    listener → WELCOME    (the first encrypted frame), only if the dialer is a member.
  Each side proves it holds the secret for this connection's fresh nonces; a wrong secret
  never gets past PROOF. A connection counts as connected only after WELCOME, so a node
  that is not (yet) a member never believes it has peers, and never campaigns.
* After it: ChaCha20-Poly1305 per frame, one key per direction (HKDF over both nonces), the
  frame counter as the nonce, the length header as associated data. A replayed, reordered,
  cut or altered frame fails authentication and closes the connection.
* The plaintext is `codec` msgpack (never pickle, never zlib). Only dicts whose `type` is
  one of pysyncobj's peer messages pass, plus gpumesh's own PreVote messages (checked for
  shape, handled by `prevote.PreVote`, never handed to pysyncobj); pysyncobj's utility
  commands (status, add, remove, set_version, transfer: lists) are refused, and so is a
  forwarded command that is not a plain state-machine call (a membership or version
  change, or bytes that do not decode).
* Unauthenticated connections are cut after `HANDSHAKE_DEADLINE_S`, and at most
  `MAX_PENDING` of them exist at once (more are closed as they are accepted).
* Messages are buffered and leave together (`flush`) at the end of each tick and of each
  batch of received frames, after the journal is made durable (`before_flush`): one
  fdatasync covers a burst of entries, and no ack gets ahead of the disk.

* A follower repeats an unchanged ack (`next_node_idx`: success, same index) on the same link
  at most every `ACK_REPEAT_S`: an idle leader's heartbeats (ten a second) then cost it one
  answer in three, not every one (an idle node's CPU is mostly these wake-ups). The leader
  learns nothing from a repeat; it still hears each follower far inside its 1.5 s fallback
  and the 5 s liveness grace. Any ack that moves the index, and every refusal, goes out.

The leader-FIN hook lives here too: when the leader's connection closes, followers start
an election at once, in address order (`RaftNode` explains).
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
import random
import socket
import struct
import time
from typing import Any, Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pysyncobj.node import TCPNode
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import CONNECTION_STATE
from pysyncobj.transport import TCPTransport

from . import codec, internals, prevote
from .internals import clock

__all__ = ["GmTransport", "MIN_SECRET_LENGTH", "cluster_key", "ClientHandshake",
           "FrameCipher", "frame", "PREAUTH_MAX_FRAME", "MAX_FRAME"]

log = logging.getLogger("gpumesh.raft")

VERSION = b"gm-raft-1"
MIN_SECRET_LENGTH = 16
PREAUTH_MAX_FRAME = 256
MAX_FRAME = 8 << 20                  # ≥ pysyncobj's 64 KiB batch + the 1 MiB command cap
HANDSHAKE_DEADLINE_S = 5.0
MAX_PENDING = 32
_MAX_UNSENT = 64 << 20               # a peer that stops reading is cut, not buffered for
_RECV_CHUNK = 1 << 16
_NONCE = 32
_HEADER = struct.Struct(">I")
_TAG = 16
# pysyncobj's peer messages; anything else from a peer is a protocol violation.
_PEER_TYPES = frozenset({"request_vote", "response_vote", "append_entries", "next_node_idx",
                         "apply_command", "apply_command_response", "timeout_now"})
# gpumesh's own peer messages, handled here and never handed to pysyncobj (prevote.py).
_OWN_TYPES = prevote.MESSAGE_TYPES
_WELCOME = {"type": "gm_welcome"}
_REGULAR_COMMAND = 0                 # pysyncobj's _COMMAND_TYPE.REGULAR

# An unchanged ack is repeated at most this often (see the module docstring).
ACK_REPEAT_S = 0.3
# FIN hook timing (see RaftNode): the first follower in address order campaigns after
# ~20 ms, the next one a step later, so their requests do not split the vote.
_FIN_ELECTION_DELAY_S = 0.02
_FIN_RANK_STEP_S = 0.08


# --- the handshake and the frames, as plain functions (a test client uses them too) -----------

def cluster_key(secret: str) -> bytes:
    return _hkdf(secret.encode(), b"gpumesh raft cluster key", b"")


def _hkdf(material: bytes, info: bytes, salt: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt or None,
                info=info).derive(material)


def _mac(key: bytes, role: bytes, nonce_c: bytes, nonce_s: bytes, client: str,
         server: str) -> bytes:
    data = b"|".join([VERSION, role, nonce_c, nonce_s, client.encode(), server.encode()])
    return hmac.new(key, data, hashlib.sha256).digest()


def frame(body: bytes) -> bytes:
    return _HEADER.pack(len(body)) + body


class FrameCipher:
    """One direction of an authenticated session: ChaCha20-Poly1305, counter nonces."""

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._counter = 0

    def seal(self, plaintext: bytes) -> bytes:
        header = _HEADER.pack(len(plaintext) + _TAG)
        sealed = self._aead.encrypt(self._nonce(), plaintext, header)
        return header + sealed

    def open(self, body: bytes) -> bytes:
        """Raises InvalidTag for anything not sealed by the peer as the next frame."""
        return self._aead.decrypt(self._nonce(), body, _HEADER.pack(len(body)))

    def _nonce(self) -> bytes:
        nonce = self._counter.to_bytes(12, "little")
        self._counter += 1
        return nonce


def _session_keys(key: bytes, nonce_c: bytes, nonce_s: bytes) -> tuple[bytes, bytes]:
    """(client→server key, server→client key)."""
    salt = nonce_c + nonce_s
    return _hkdf(key, b"gpumesh raft c2s", salt), _hkdf(key, b"gpumesh raft s2c", salt)


class ClientHandshake:
    """The dialer's side, step by step: hello() → on_challenge() → PROOF, ciphers."""

    def __init__(self, key: bytes, client: str, server: str) -> None:
        self.key, self.client, self.server = key, client, server
        self.nonce = os.urandom(_NONCE)

    def hello(self) -> bytes:
        return codec.dumps([VERSION, self.nonce, self.client])

    def on_challenge(self, body: bytes) -> tuple[bytes, FrameCipher, FrameCipher]:
        """Check the listener's proof; return (PROOF body, sending cipher, receiving cipher).
        Raises ValueError if the listener does not hold the secret."""
        message = codec.loads(body)
        if not (isinstance(message, list) and len(message) == 2
                and all(isinstance(m, bytes) for m in message) and len(message[0]) == _NONCE):
            raise ValueError("malformed challenge")
        nonce_s, proof = message
        expected = _mac(self.key, b"server", self.nonce, nonce_s, self.client, self.server)
        if not hmac.compare_digest(proof, expected):
            raise ValueError("the listener does not hold the cluster secret")
        c2s, s2c = _session_keys(self.key, self.nonce, nonce_s)
        mine = _mac(self.key, b"client", self.nonce, nonce_s, self.client, self.server)
        return codec.dumps([mine]), FrameCipher(c2s), FrameCipher(s2c)


# --- connections --------------------------------------------------------------------------------

class _Refused(Exception):
    """Why a connection is being closed (a protocol violation, a failed proof)."""


class _Closed(Exception):
    """The socket failed or the peer closed it."""


class GmConnection:
    """One TCP connection to a peer, with TcpConnection's surface as TCPTransport uses it:
    connect, send, disconnect, state, fileno and the three callbacks. `state` is CONNECTED
    only once the handshake is complete; messages are delivered only after that."""

    def __init__(self, transport: "GmTransport", sock: socket.socket | None = None,
                 peer_address: str | None = None) -> None:
        self._transport = transport
        self._poller = transport._syncObj._poller
        self._socket = sock
        self._fileno: int | None = None
        self._outgoing = sock is None
        self.peer = peer_address            # the member's Raft address, once known
        self.remote = ""                    # ip:port the socket talks to, for logs
        self._read = bytearray()
        self._write = bytearray()
        self._state = CONNECTION_STATE.DISCONNECTED
        self._step = ""                     # handshake step awaited
        self._client: ClientHandshake | None = None
        self._nonce_c = self._nonce_s = b""
        self._send_cipher: FrameCipher | None = None
        self._recv_cipher: FrameCipher | None = None
        self.started = clock()
        self.last_received: float | None = None
        self._on_connected: Callable[[], None] | None = None
        self._on_message: Callable[[Any], None] | None = None
        self._on_disconnected: Callable[[], None] | None = None
        if sock is not None:
            self._adopt(sock, step="hello")
            self._state = CONNECTION_STATE.CONNECTING

    # TcpConnection's callback setters
    def setOnConnectedCallback(self, callback: Callable[[], None]) -> None:
        self._on_connected = callback

    def setOnMessageReceivedCallback(self, callback: Callable[[Any], None]) -> None:
        self._on_message = callback

    def setOnDisconnectedCallback(self, callback: Callable[[], None]) -> None:
        self._on_disconnected = callback

    @property
    def state(self) -> int:
        return self._state

    @property
    def authenticated(self) -> bool:
        return self._state == CONNECTION_STATE.CONNECTED

    def fileno(self) -> int | None:
        return self._fileno

    def connect(self, host: str, port: int) -> bool:
        self.disconnect()
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                 socket.SOCK_STREAM)
            sock.setblocking(False)
            err = sock.connect_ex((host, port))
        except OSError:
            return False
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            sock.close()
            return False
        self._adopt(sock, step="connect")
        self._state = CONNECTION_STATE.CONNECTING
        return True

    def _adopt(self, sock: socket.socket, step: str) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _keepalive(sock)
        self._socket = sock
        self._fileno = sock.fileno()
        self._step = step
        self._read, self._write = bytearray(), bytearray()
        self._send_cipher = self._recv_cipher = None
        self.started = clock()
        self.last_received = None
        try:
            self.remote = "%s:%s" % sock.getpeername()[:2]
        except OSError:
            self.remote = self.peer or "?"
        self._poller.subscribe(self._fileno, self._on_event,
                               POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.WRITE
                               | POLL_EVENT_TYPE.ERROR)

    def send(self, message: Any) -> None:
        """Seal and buffer; the transport flushes after the journal is durable (`flush`)."""
        if self._send_cipher is None:
            return
        data = self._send_cipher.seal(codec.dumps(message))
        if len(self._write) + len(data) > _MAX_UNSENT:
            log.warning("Raft peer %s stopped reading (%d bytes unsent); closing",
                        self.peer or self.remote, len(self._write))
            self.disconnect()
            return
        self._write += data
        self._transport.pending.add(self)

    def disconnect(self) -> None:
        notify = self._on_disconnected is not None and \
            self._state != CONNECTION_STATE.DISCONNECTED
        if self._fileno is not None:
            self._poller.unsubscribe(self._fileno)
            self._fileno = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._read, self._write = bytearray(), bytearray()
        self._send_cipher = self._recv_cipher = None
        self._state = CONNECTION_STATE.DISCONNECTED
        if notify:
            self._on_disconnected()

    def expired(self, now: float) -> bool:
        """Still unauthenticated after the deadline."""
        return (self._state == CONNECTION_STATE.CONNECTING
                and now - self.started > HANDSHAKE_DEADLINE_S)

    # --- events ----------------------------------------------------------------------------

    def _on_event(self, fileno: int, event: int) -> None:
        if fileno != self._fileno:
            self._poller.unsubscribe(fileno)
            return
        # Only socket failures and protocol violations close the connection here; whatever
        # pysyncobj raises while handling a message (a journal that cannot write) goes up
        # to the tick loop, which knows what to do with it.
        try:
            self._process(event)
        finally:
            # Whatever handling the frames queued (acks, answers) leaves now, in one go,
            # once the journal entries it acknowledges are on disk.
            self._transport.flush()

    def _process(self, event: int) -> None:
        try:
            if event & POLL_EVENT_TYPE.ERROR:
                raise _Closed()
            if self._step == "connect":
                if self._socket is None or \
                        self._socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    raise _Closed()
                self._step = "challenge"
                self._client = self._transport.client_handshake(self.peer or "")
                self._queue(frame(self._client.hello()))
            if event & POLL_EVENT_TYPE.READ:
                self._receive()
            if self._fileno is not None and event & POLL_EVENT_TYPE.WRITE:
                self._flush()
        except _Refused as exc:
            self._transport.refused(self, str(exc))
            self.disconnect()
        except _Closed:
            self.disconnect()

    def _receive(self) -> None:
        # Bounded per event, so one busy peer cannot starve the tick (poll is level-triggered
        # and comes back for the rest).
        for _ in range(64):
            if self._socket is None:
                return
            size = _RECV_CHUNK if self._recv_cipher is not None else 1024
            try:
                chunk = self._socket.recv(size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                raise _Closed() from None
            if not chunk:
                raise _Closed()
            self._read += chunk
            self._parse()

    def _parse(self) -> None:
        while self._socket is not None and len(self._read) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._read)
            limit = MAX_FRAME + _TAG if self._recv_cipher is not None else PREAUTH_MAX_FRAME
            if length > limit:
                # Checked before a byte of the body is kept: a declared 2 GiB costs nothing.
                raise _Refused(f"a frame of {length} bytes (limit {limit})")
            if len(self._read) < _HEADER.size + length:
                return
            body = bytes(self._read[_HEADER.size:_HEADER.size + length])
            del self._read[:_HEADER.size + length]
            self._handle(body)

    def _handle(self, body: bytes) -> None:
        if self._recv_cipher is not None:
            try:
                plaintext = self._recv_cipher.open(body)
            except InvalidTag:
                raise _Refused("a frame that failed authentication") from None
            try:
                message = codec.loads(plaintext)
            except codec.CodecError as exc:
                raise _Refused(f"a frame that is not gpumesh's msgpack ({exc})") from None
            self.last_received = clock()
            if self._step == "welcome":
                if message != _WELCOME:
                    raise _Refused("no welcome after the handshake")
                self._become_connected()
                return
            self._transport.check_message(message)
            if self._on_message is not None:
                self._on_message(message)
            return
        try:
            message = codec.loads(body)
        except codec.CodecError:
            raise _Refused("a handshake frame that is not msgpack") from None
        if self._step == "hello":
            self._on_hello(message)
        elif self._step == "challenge":
            assert self._client is not None
            try:
                proof, self._send_cipher, self._recv_cipher = \
                    self._client.on_challenge(body)
            except ValueError as exc:
                raise _Refused(str(exc)) from None
            self._queue(frame(proof))
            self._step = "welcome"
        elif self._step == "proof":
            self._on_proof(message)
        else:
            raise _Refused("an unexpected handshake frame")

    def _on_hello(self, message: Any) -> None:
        if not (isinstance(message, list) and len(message) == 3 and message[0] == VERSION
                and isinstance(message[1], bytes) and len(message[1]) == _NONCE
                and isinstance(message[2], str) and len(message[2]) <= 64):
            raise _Refused("a malformed hello (not a gpumesh Raft peer?)")
        self._nonce_c, self.peer = message[1], message[2]
        self._nonce_s = os.urandom(_NONCE)
        key, me = self._transport.key, self._transport.self_address
        proof = _mac(key, b"server", self._nonce_c, self._nonce_s, self.peer, me)
        self._queue(frame(codec.dumps([self._nonce_s, proof])))
        self._step = "proof"

    def _on_proof(self, message: Any) -> None:
        key, me = self._transport.key, self._transport.self_address
        expected = _mac(key, b"client", self._nonce_c, self._nonce_s, self.peer or "", me)
        if not (isinstance(message, list) and len(message) == 1
                and isinstance(message[0], bytes)
                and hmac.compare_digest(message[0], expected)):
            raise _Refused("a proof that does not match (wrong cluster secret?)")
        if not self._transport.is_member(self.peer or ""):
            raise _Refused(f"{self.peer} is not a member of this cluster")
        c2s, s2c = _session_keys(key, self._nonce_c, self._nonce_s)
        self._recv_cipher, self._send_cipher = FrameCipher(c2s), FrameCipher(s2c)
        self._queue(self._send_cipher.seal(codec.dumps(_WELCOME)))
        self._become_connected()

    def _become_connected(self) -> None:
        self._step = ""
        self._state = CONNECTION_STATE.CONNECTED
        self.last_received = clock()
        if self._on_connected is not None:
            self._on_connected()

    def _queue(self, data: bytes) -> None:
        if len(self._write) + len(data) > _MAX_UNSENT:
            log.warning("Raft peer %s stopped reading (%d bytes unsent); closing",
                        self.peer or self.remote, len(self._write))
            self.disconnect()
            return
        self._write += data
        self._flush()

    def flush(self) -> None:
        self._flush()

    def _flush(self) -> None:
        while self._write and self._socket is not None:
            try:
                sent = self._socket.send(self._write)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.disconnect()
                return
            del self._write[:sent]
        if self._fileno is not None:
            events = POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR
            if self._write or self._step == "connect":
                events |= POLL_EVENT_TYPE.WRITE
            self._poller.subscribe(self._fileno, self._on_event, events)


def _keepalive(sock: socket.socket) -> None:
    """Find a silently dead peer in ~10 s (idle links are never timed out otherwise)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 4), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3),
                          ("TCP_USER_TIMEOUT", 10_000)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class _Server:
    """The listening socket; TcpServer's surface (bind, unbind) as TCPTransport uses it."""

    def __init__(self, transport: "GmTransport", host: str, port: int) -> None:
        self._transport = transport
        self._poller = transport._syncObj._poller
        self._address = (host, int(port))
        self._socket: socket.socket | None = None

    def bind(self) -> None:
        family = socket.AF_INET6 if ":" in self._address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(self._address)
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self._poller.subscribe(sock.fileno(), self._on_accept,
                               POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR)

    def unbind(self) -> None:
        if self._socket is not None:
            self._poller.unsubscribe(self._socket.fileno())
            self._socket.close()
            self._socket = None

    def _on_accept(self, fileno: int, event: int) -> None:
        for _ in range(16):                  # drain a burst, but yield to the tick
            if self._socket is None:
                return
            try:
                sock, _ = self._socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not self._transport.accepting():
                sock.close()                 # too many unauthenticated: refuse at once
                continue
            self._transport.incoming(GmConnection(self._transport, sock))


# --- the transport ------------------------------------------------------------------------------

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
        self._server = _Server(self, host.strip("[]"), int(port))

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
            raise _Refused(f"a message of type {kind!r} (not a Raft peer message)")
        if message["type"] in _OWN_TYPES:
            fields = (("round", int), ("granted", bool)) if message["type"] == "pre_vote_answer" \
                else (("round", int), ("term", int), ("last_log_index", int),
                      ("last_log_term", int))
            if not all(isinstance(message.get(name), kind) for name, kind in fields):
                raise _Refused(f"a malformed {message['type']}")
            return
        if message["type"] == "append_entries" and not isinstance(message.get("term"), int):
            raise _Refused("an append without a term")
        if message["type"] == "apply_command":
            command = message.get("command")
            if not (isinstance(command, bytes) and command[:1] == bytes([_REGULAR_COMMAND])):
                raise _Refused("a forwarded command that is not a state-machine call")
            try:
                call = codec.loads(command[1:])
            except codec.CodecError:
                raise _Refused("a forwarded command that does not decode") from None
            if not (isinstance(call, tuple) and len(call) == 2 and isinstance(call[0], int)
                    and isinstance(call[1], tuple)):
                raise _Refused("a forwarded command of the wrong shape")

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
