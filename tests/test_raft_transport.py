"""The Raft port as hostile ground, against real stores on loopback and raw sockets.

A raw peer speaks the wire by hand (the transport's own handshake and frame functions) so
the tests can do what an attacker would: declare huge frames, stay silent, hold the wrong
secret, send pickles and utility commands — and, holding the right secret, show that a
member's frames work and that bad bytes from a member still never poison the log.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import struct
import time
from pathlib import Path

import pysyncobj.serializer
import pysyncobj.syncobj
import pytest
from harness import free_port, rss_kib
from inprocess import raft_threads
from raftcluster import SECRET, leader_of, make_store, running_store, until

from gpumesh.mesh.raft import codec, connection, transport
from gpumesh.mesh.raft.wire import ClientHandshake, FrameCipher, cluster_key, frame
from gpumesh.mesh.state import CommandRejected, StartupRefused

# A member address no process listens on, above the real ones: the real nodes never dial
# it (the higher address dials), so a raw socket can claim it.
FAKE = "127.0.0.2:1"


@pytest.fixture(autouse=True)
def no_thread_left_behind():
    yield
    assert raft_threads() == []


class RawPeer:
    """A blocking client of the Raft port that does only what the test says."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.server = address
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.sealer = self.opener = None

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_frame(self) -> bytes:
        header = self._exactly(4)
        return self._exactly(struct.unpack(">I", header)[0])

    def _exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def handshake(self, secret: str, claim: str = FAKE) -> None:
        """Raises ValueError if the listener's proof fails (it holds another secret)."""
        hs = ClientHandshake(cluster_key(secret), claim, self.server)
        self.send_raw(frame(hs.hello()))
        proof, self.sealer, self.opener = hs.on_challenge(self.read_frame())
        self.send_raw(frame(proof))
        assert codec.loads(self.opener.open(self.read_frame())) == {"type": "gm_welcome"}

    def send(self, message: object) -> None:
        self.send_raw(self.sealer.seal(codec.dumps(message)))

    def closed_within(self, seconds: float) -> bool:
        """True once the listener has closed the connection (reading what it still sends)."""
        self.sock.settimeout(0.1)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if not self.sock.recv(65536):
                    return True
            except socket.timeout:
                continue
            except OSError:
                return True
        return False

    def close(self) -> None:
        self.sock.close()


def _pair_with_a_fake_member(tmp_path: Path):
    addresses = sorted(f"127.0.0.1:{free_port()}" for _ in range(2))
    assert all(FAKE > a for a in addresses)
    return addresses, [make_store(tmp_path, a, [*addresses, FAKE]) for a in addresses]


def _command(store, payload: bytes) -> bytes:
    """The log entry `store.submit` would produce for `payload` (pysyncobj's REGULAR call)."""
    (method_id,) = store._node._raft._idToMethod
    return b"\x00" + codec.dumps((method_id, (payload,)))


def test_a_short_or_empty_cluster_secret_is_refused(tmp_path):
    async def main(secret: str):
        store = make_store(tmp_path, f"127.0.0.1:{free_port()}", [], secret=secret)
        try:
            await store.start()
        finally:
            await store.stop()
    with pytest.raises(StartupRefused, match="cluster secret is empty"):
        asyncio.run(main(""))
    with pytest.raises(StartupRefused, match="too short \\(9 characters; at least 16\\)"):
        asyncio.run(main("123456789"))


def test_a_declared_2_gib_frame_is_cut_before_anything_is_buffered(tmp_path):
    address = f"127.0.0.1:{free_port()}"

    async def main():
        async with running_store(tmp_path, address, []) as store:
            before = rss_kib(os.getpid())
            peer = RawPeer(address)
            sent = 0

            def stream() -> int:
                nonlocal sent
                peer.send_raw(struct.pack(">I", 2 << 30))       # "2 GiB follow"
                try:
                    while sent < (64 << 20):
                        peer.sock.sendall(b"\0" * 65536)
                        sent += 65536
                except OSError:
                    pass
                return sent
            await asyncio.to_thread(stream)
            peer.close()
            # Cut at the header: the rest met a closed socket, and nothing grew.
            assert sent < (16 << 20)
            assert rss_kib(os.getpid()) - before < 8 << 10
            await store.submit({"op": "upsert_node", "node": {"id": "still-writes"}})
    asyncio.run(main())


def test_silent_connections_are_cut_after_the_deadline_and_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(connection, "HANDSHAKE_DEADLINE_S", 0.5)
    monkeypatch.setattr(transport, "MAX_PENDING", 3)
    address = f"127.0.0.1:{free_port()}"

    async def main():
        async with running_store(tmp_path, address, []) as store:
            peers = [RawPeer(address) for _ in range(3)]
            await asyncio.sleep(0.1)
            extra = RawPeer(address)                    # one over the cap: closed at once
            assert await asyncio.to_thread(extra.closed_within, 0.5)
            started = time.monotonic()
            for peer in peers:                          # the others: at the deadline
                assert await asyncio.to_thread(peer.closed_within, 5)
            assert 0.2 < time.monotonic() - started < 3
            await store.submit({"op": "upsert_node", "node": {"id": "still-writes"}})
    asyncio.run(main())


def test_a_wrong_secret_never_gets_a_message_applied(tmp_path):
    addresses, stores = _pair_with_a_fake_member(tmp_path)

    async def main():
        await asyncio.gather(*(s.start() for s in stores))
        try:
            leader = await leader_of(stores)
            peer = RawPeer(leader.status.self_address)
            with pytest.raises(ValueError, match="does not hold the cluster secret"):
                await asyncio.to_thread(peer.handshake, "a-different-secret-0123456789")
            # Pressing on with a made-up proof and an entry sealed under a made-up key.
            peer.send_raw(frame(codec.dumps([os.urandom(32)])))
            attack = codec.dumps({"op": "upsert_node", "node": {"id": "intruder"}})
            entry = {"type": "apply_command", "command": _command(leader, attack)}
            peer.send_raw(FrameCipher(os.urandom(32)).seal(codec.dumps(entry)))
            assert await asyncio.to_thread(peer.closed_within, 3)
            await leader.submit({"op": "upsert_node", "node": {"id": "honest"}})
            await until(lambda: all("honest" in s.view.nodes for s in stores))
            assert all("intruder" not in s.view.nodes for s in stores)
            assert all(not p.connected for p in leader.status.peers if p.address == FAKE)
        finally:
            await asyncio.gather(*(s.stop() for s in stores))
    asyncio.run(main())


class _Trap:
    """Stands in for every way into the standard unpickler and counts the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        raise AssertionError("pickle was used to decode bytes from the network")


class _Payload:
    """Unpickling this would create a directory: the test checks it never appears."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_pickle_is_never_unpickled_and_only_raft_messages_pass(tmp_path, monkeypatch):
    trap = _Trap()
    for name in ("loads", "load", "_loads", "_load", "Unpickler"):
        monkeypatch.setattr(pickle, name, trap)
    marker = tmp_path / "pickle-ran"
    evil = pickle.dumps(_Payload(str(marker)))
    assert len(evil) < 200
    addresses, stores = _pair_with_a_fake_member(tmp_path)

    async def main():
        await asyncio.gather(*(s.start() for s in stores))
        try:
            leader = await leader_of(stores)
            assert pysyncobj.syncobj.pickle is codec and pysyncobj.serializer.pickle is codec
            target = leader.status.self_address

            async def rejected(before_auth: bool, data: bytes) -> None:
                peer = RawPeer(target)
                if not before_auth:
                    await asyncio.to_thread(peer.handshake, SECRET)
                    peer.send(data) if not isinstance(data, bytes) else \
                        peer.send_raw(peer.sealer.seal(data))
                else:
                    peer.send_raw(frame(data))
                assert await asyncio.to_thread(peer.closed_within, 3), data
                peer.close()

            await rejected(True, evil)                                  # as a handshake
            await rejected(False, evil)                                 # sealed, as a message
            await rejected(False, ["status"])                           # a utility command
            await rejected(False, {"type": "apply_command", "command": b"\x00" + evil})
            await rejected(False, {"type": "apply_command",             # a membership change
                                   "command": b"\x02" + codec.dumps(["add", "1.2.3.4:5"])})
            huge = RawPeer(target)                                      # 2 GiB, authenticated
            await asyncio.to_thread(huge.handshake, SECRET)
            huge.send_raw(struct.pack(">I", 2 << 30) + b"\0" * 1024)
            assert await asyncio.to_thread(huge.closed_within, 3)

            # A member's frames work: a well-formed forwarded command is applied...
            member = RawPeer(target)
            await asyncio.to_thread(member.handshake, SECRET)
            good = {"op": "upsert_node", "rid": "raw-1", "node": {"id": "from-raw-peer"}}
            member.send({"type": "apply_command",
                         "command": _command(leader, codec.dumps(good))})
            await until(lambda: all("from-raw-peer" in s.view.nodes for s in stores))
            # ...and a well-formed call whose payload is a pickle is a refused command, not a
            # log entry that fails on every node forever.
            member.send({"type": "apply_command", "command": _command(leader, evil)})
            await asyncio.sleep(0.3)
            await leader.submit({"op": "upsert_node", "node": {"id": "after"}})
            await until(lambda: all("after" in s.view.nodes for s in stores))
            member.close()
            assert trap.calls == 0 and not marker.exists()
            with pytest.raises(CommandRejected):
                await leader.submit({"op": "delete_model", "name": "no-such-model"})
        finally:
            await asyncio.gather(*(s.stop() for s in stores))
    asyncio.run(main())
