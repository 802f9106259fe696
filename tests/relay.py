"""A TCP relay between loopback Raft nodes, to cut a node's links and restore them.

Each node's Raft address is 127.0.0.1:P (what its peers dial); the node itself binds
127.0.0.X:P on a loopback address of its own, and the relay forwards 127.0.0.1:P there.
The relay learns who dialed from the handshake's first frame (the dialer names its
address in clear: raft/wire.py), so it knows which two nodes each connection joins.

`cut(address)` silences every link of that node the way a partition does: no FIN, no
RST, bytes held (here and in the kernel's buffers) and delivered when `restore` heals it,
as TCP would. It runs in the test's event loop, beside the stores.
"""

from __future__ import annotations

import asyncio
import struct

from gpumesh.mesh.raft import codec

__all__ = ["Relay"]

_HEADER = struct.Struct(">I")


class Relay:
    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        # Each node's own bind host: 127.0.0.2, .3, … (free on any Linux loopback).
        self.bind_hosts = {a: f"127.0.0.{i + 2}" for i, a in enumerate(addresses)}
        self._cut: set[str] = set()
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        for address in self.addresses:
            host, port = address.rsplit(":", 1)
            server = await asyncio.start_server(
                lambda r, w, a=address: self._spawn(self._accept(r, w, a)), host, int(port))
            self._servers.append(server)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def cut(self, address: str) -> None:
        self._cut.add(address)

    def restore(self, address: str) -> None:
        self._cut.discard(address)

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      target: str) -> None:
        try:
            header = await reader.readexactly(_HEADER.size)
            hello = await reader.readexactly(_HEADER.unpack(header)[0])
            dialer = codec.loads(hello)[2]
            up_reader, up_writer = await asyncio.open_connection(
                self.bind_hosts[target], int(target.rsplit(":", 1)[1]))
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError, TypeError,
                KeyError, codec.CodecError):
            writer.close()
            return
        link = {dialer, target}
        await self._wait_open(link)
        up_writer.write(header + hello)
        self._spawn(self._pump(reader, up_writer, link))
        await self._pump(up_reader, writer, link)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    link: set[str]) -> None:
        try:
            while True:
                await self._wait_open(link)
                data = await reader.read(1 << 16)
                if not data:
                    break
                await self._wait_open(link)        # cut meanwhile: hold what was read
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _wait_open(self, link: set[str]) -> None:
        while link & self._cut:
            await asyncio.sleep(0.01)
