"""One Raft TCP connection (`GmConnection`) and the listening socket (`GmServer`), with the
surface pysyncobj's TCPTransport uses (connect, send, disconnect, state, fileno and the
three callbacks; bind and unbind), speaking `wire`.

A connection counts as connected only after the handshake's WELCOME, so a node that is not
(yet) a member never believes it has peers, and never campaigns. A frame over the limit, a
failed proof or authentication, or a message the transport refuses closes it
(`Refused`). The plaintext is `codec` msgpack (never pickle, never zlib). Unauthenticated
connections expire after `HANDSHAKE_DEADLINE_S`. Messages are sealed and buffered; the
transport flushes them after the journal is durable.
"""

from __future__ import annotations

import errno
import hmac
import logging
import os
import socket
from typing import TYPE_CHECKING, Any, Callable

from cryptography.exceptions import InvalidTag
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import CONNECTION_STATE

from . import codec
from .internals import clock
from .wire import (HEADER, MAX_FRAME, NONCE_SIZE, PREAUTH_MAX_FRAME, TAG, VERSION,
                   ClientHandshake, FrameCipher, frame, mac, session_keys)

if TYPE_CHECKING:
    from .transport import GmTransport

__all__ = ["GmConnection", "GmServer", "HANDSHAKE_DEADLINE_S", "Refused"]

log = logging.getLogger("gpumesh.raft")

HANDSHAKE_DEADLINE_S = 5.0
_MAX_UNSENT = 64 << 20               # a peer that stops reading is cut, not buffered for
_RECV_CHUNK = 1 << 16
_WELCOME = {"type": "gm_welcome"}


class Refused(Exception):
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
        if self._buffer(self._send_cipher.seal(codec.dumps(message))):
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
        except Refused as exc:
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
        while self._socket is not None and len(self._read) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._read)
            limit = MAX_FRAME + TAG if self._recv_cipher is not None else PREAUTH_MAX_FRAME
            if length > limit:
                # Checked before a byte of the body is kept: a declared 2 GiB costs nothing.
                raise Refused(f"a frame of {length} bytes (limit {limit})")
            if len(self._read) < HEADER.size + length:
                return
            body = bytes(self._read[HEADER.size:HEADER.size + length])
            del self._read[:HEADER.size + length]
            self._handle(body)

    def _handle(self, body: bytes) -> None:
        if self._recv_cipher is not None:
            try:
                plaintext = self._recv_cipher.open(body)
            except InvalidTag:
                raise Refused("a frame that failed authentication") from None
            try:
                message = codec.loads(plaintext)
            except codec.CodecError as exc:
                raise Refused(f"a frame that is not gpumesh's msgpack ({exc})") from None
            self.last_received = clock()
            if self._step == "welcome":
                if message != _WELCOME:
                    raise Refused("no welcome after the handshake")
                self._become_connected()
                return
            self._transport.check_message(message)
            if self._on_message is not None:
                self._on_message(message)
            return
        try:
            message = codec.loads(body)
        except codec.CodecError:
            raise Refused("a handshake frame that is not msgpack") from None
        if self._step == "hello":
            self._on_hello(message)
        elif self._step == "challenge":
            assert self._client is not None
            try:
                proof, self._send_cipher, self._recv_cipher = \
                    self._client.on_challenge(body)
            except ValueError as exc:
                raise Refused(str(exc)) from None
            self._queue(frame(proof))
            self._step = "welcome"
        elif self._step == "proof":
            self._on_proof(message)
        else:
            raise Refused("an unexpected handshake frame")

    def _on_hello(self, message: Any) -> None:
        if not (isinstance(message, list) and len(message) == 3 and message[0] == VERSION
                and isinstance(message[1], bytes) and len(message[1]) == NONCE_SIZE
                and isinstance(message[2], str) and len(message[2]) <= 64):
            raise Refused("a malformed hello (not a gpumesh Raft peer?)")
        self._nonce_c, self.peer = message[1], message[2]
        self._nonce_s = os.urandom(NONCE_SIZE)
        key, me = self._transport.key, self._transport.self_address
        proof = mac(key, b"server", self._nonce_c, self._nonce_s, self.peer, me)
        self._queue(frame(codec.dumps([self._nonce_s, proof])))
        self._step = "proof"

    def _on_proof(self, message: Any) -> None:
        key, me = self._transport.key, self._transport.self_address
        expected = mac(key, b"client", self._nonce_c, self._nonce_s, self.peer or "", me)
        if not (isinstance(message, list) and len(message) == 1
                and isinstance(message[0], bytes)
                and hmac.compare_digest(message[0], expected)):
            raise Refused("a proof that does not match (wrong cluster secret?)")
        if not self._transport.is_member(self.peer or ""):
            raise Refused(f"{self.peer} is not a member of this cluster")
        c2s, s2c = session_keys(key, self._nonce_c, self._nonce_s)
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
        if self._buffer(data):
            self._flush()

    def _buffer(self, data: bytes) -> bool:
        """Add to what is unsent; a peer that stopped reading is cut instead (False)."""
        if len(self._write) + len(data) > _MAX_UNSENT:
            log.warning("Raft peer %s stopped reading (%d bytes unsent); closing",
                        self.peer or self.remote, len(self._write))
            self.disconnect()
            return False
        self._write += data
        return True

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


class GmServer:
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
