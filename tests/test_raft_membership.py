"""Raft membership on real stores: three founders on loopback, a fourth joins, one leaves,
and a plain restart (no partners given) rejoins with the member list kept on disk."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from harness import free_port
from inprocess import raft_threads
from raftcluster import READY_S, leader_of, make_store as _store, until as _until

from gpumesh.mesh.state import CommandRejected, NotLeader


def _members_file(root: Path, address: str) -> dict:
    return json.loads((root / address.replace(":", "_") / "journal.members").read_text())


@pytest.fixture(autouse=True)
def no_thread_left_behind():
    yield
    assert raft_threads() == []


def test_join_leave_and_restart_with_the_recorded_members(tmp_path):
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(4)]
    founders, joiner = addresses[:3], addresses[3]

    async def main():
        stores = {a: _store(tmp_path, a, founders) for a in founders}
        try:
            await asyncio.gather(*(s.start() for s in stores.values()))
            leader = await leader_of(list(stores.values()))
            await leader.submit({"op": "upsert_node", "node": {"id": "n1", "status": "ready"}})
            follower = next(s for s in stores.values() if s is not leader)
            with pytest.raises(NotLeader) as info:
                await follower.add_member(joiner)
            assert info.value.leader == leader.status.self_address
            with pytest.raises(CommandRejected, match="IP:port"):
                await leader.add_member("not-an-address")

            # A fourth node starts knowing every member, then the leader adds it.
            stores[joiner] = _store(tmp_path, joiner, list(leader.status.members))
            await stores[joiner].start()
            members = await leader.add_member(joiner)
            assert members == tuple(sorted(addresses))
            assert await leader.add_member(joiner) == members          # already a member
            await stores[joiner].wait_ready(READY_S)
            await _until(lambda: "n1" in stores[joiner].view.nodes)
            # The joiner writes through the leader like any follower.
            await stores[joiner].submit({"op": "upsert_node",
                                         "node": {"id": "n4", "status": "ready"}})
            await _until(lambda: all("n4" in s.view.nodes for s in stores.values()))
            await _until(lambda: all(s.status.members == members for s in stores.values()))
            await _until(lambda: _members_file(tmp_path, joiner)["members"] == list(members))

            # The leader cannot remove itself; a follower goes.
            with pytest.raises(CommandRejected) as refused:
                await leader.remove_member(leader.status.self_address)
            assert refused.value.code == "cannot_remove_leader"
            gone = follower.status.self_address
            remaining = await leader.remove_member(gone)
            assert gone not in remaining and len(remaining) == 3
            await stores.pop(gone).stop()
            await leader.submit({"op": "upsert_node", "node": {"id": "n5", "status": "ready"}})
            await _until(lambda: all("n5" in s.view.nodes for s in stores.values()))
            for address in stores:
                await _until(lambda a=address: _members_file(tmp_path, a)["members"]
                             == list(remaining))
        finally:
            await asyncio.gather(*(s.stop() for s in stores.values()))
        return remaining

    remaining = asyncio.run(main())

    async def restart():
        # Every node restarts with no partners at all: the recorded list brings them back.
        stores = [_store(tmp_path, a, []) for a in remaining]
        try:
            await asyncio.gather(*(s.start() for s in stores))
            leader = await leader_of(stores)
            assert all(s.status.members == remaining for s in stores)
            assert all({"n1", "n4", "n5"} <= set(s.view.nodes) for s in stores)
            await leader.submit({"op": "upsert_node", "node": {"id": "n6", "status": "ready"}})
            await _until(lambda: all("n6" in s.view.nodes for s in stores))
            # The leader hands over, and the new one takes writes.
            new_leader = await leader.transfer_leadership()
            assert new_leader != leader.status.self_address and new_leader in remaining
            successor = next(s for s in stores if s.status.self_address == new_leader)
            await _until(lambda: successor.status.is_leader)
            await successor.submit({"op": "upsert_node", "node": {"id": "n7", "status": "ready"}})
        finally:
            await asyncio.gather(*(s.stop() for s in stores))

    asyncio.run(restart())
