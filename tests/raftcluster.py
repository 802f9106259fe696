"""Several real ClusterStores on loopback in one event loop, for Raft-level tests."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import AsyncIterator, Callable

from gpumesh.mesh.state import ClusterStore

SECRET = "raft-test-cluster-secret-0123456789"
READY_S = 20.0


def make_store(root: Path, address: str, partners: list[str],
               secret: str = SECRET, bind_host: str = "127.0.0.1") -> ClusterStore:
    """A store whose files live in root/<host_port>/ (journal, snapshot, member list)."""
    folder = root / address.replace(":", "_")
    folder.mkdir(parents=True, exist_ok=True)
    return ClusterStore(self_address=address, partners=partners,
                        journal_file=folder / "journal", snapshot_file=folder / "snapshot",
                        secret=secret, bind_host=bind_host)


@contextlib.asynccontextmanager
async def running_store(root: Path, address: str, partners: list[str],
                        **options: str) -> AsyncIterator[ClusterStore]:
    """`make_store`'s store, started and ready (10 s) for the block, stopped after it."""
    store = make_store(root, address, partners, **options)
    await store.start()
    try:
        await store.wait_ready(10)
        yield store
    finally:
        await store.stop()


async def leader_of(stores: list[ClusterStore], timeout: float = READY_S) -> ClusterStore:
    """Wait until every store is ready and all agree on one leader; return it."""
    await asyncio.gather(*(s.wait_ready(timeout) for s in stores))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        leaders = [s for s in stores if s.status.is_leader]
        if len(leaders) == 1 and all(s.status.leader == leaders[0].status.self_address
                                     for s in stores):
            return leaders[0]
        await asyncio.sleep(0.02)
    raise AssertionError([s.status for s in stores])


async def until(predicate: Callable[[], bool], timeout: float = READY_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
