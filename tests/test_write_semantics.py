"""Writes that tell the truth, on real stores: a retried request id applies once, and a
leader cut off from its followers says "outcome unknown" rather than "failed"."""

from __future__ import annotations

import asyncio
import time

import pytest
from harness import free_port
from inprocess import raft_threads
from raftcluster import leader_of, make_store, running_store, until

from gpumesh.mesh.state import CommandRejected, StateUnavailable, WriteOutcomeUnknown

MODEL = {"op": "create_model", "model": {"name": "m1", "backend": "llama.cpp", "replicas": 1}}


@pytest.fixture(autouse=True)
def no_thread_left_behind():
    yield
    assert raft_threads() == []


def test_a_resubmitted_request_id_applies_once(tmp_path):
    async def main():
        async with running_store(tmp_path, f"127.0.0.1:{free_port()}", []) as store:
            first = await store.submit({**MODEL, "rid": "deploy-1"})
            # The same write again (a retry after a lost answer): same answer, applied once.
            again = await store.submit({**MODEL, "rid": "deploy-1"})
            assert again == first and first["ok"]
            assert list(store.view.models) == ["m1"]
            # A new rid is a new write, and the state machine's condition refuses it.
            with pytest.raises(CommandRejected, match="already exists"):
                await store.submit(MODEL)
    asyncio.run(main())


def test_a_leader_cut_off_says_outcome_unknown_and_the_retry_applies_once(tmp_path):
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(3)]

    async def main():
        stores = {a: make_store(tmp_path, a, addresses) for a in addresses}
        await asyncio.gather(*(s.start() for s in stores.values()))
        try:
            leader = await leader_of(list(stores.values()))
            followers = [a for a in addresses if a != leader.status.self_address]
            # The leader hears every follower ~10 times a second (no extra writes needed).
            await until(lambda: all(p.connected and p.silent_for(time.monotonic()) < 0.5
                                    for p in leader.status.peers))
            assert [p.address for p in leader.status.peers] == sorted(followers)
            for address in followers:
                await stores.pop(address).stop()
            # The leader still believes it leads (for its 1.5 s fallback) and appends the
            # write, but no follower acknowledges it: it may commit later, or never.
            command = {**MODEL, "rid": "cut-off-1"}
            ticks = leader._node.ticks
            with pytest.raises(WriteOutcomeUnknown, match="outcome unknown") as info:
                await leader.submit(command, timeout=0.5)
            assert "failed: 7" not in str(info.value)
            # The write stayed in flight for 0.5 s, but the 1 ms busy tick ran only for its
            # first 50 ms: an outage does not keep a core spinning (500 ticks if it did).
            assert leader._node.ticks - ticks < 250
            # Once it has stepped down, a write is refused for sure: no leader to take it.
            await until(lambda: not leader.status.is_leader, timeout=5)
            assert all(not p.connected for p in leader.status.peers)
            with pytest.raises(StateUnavailable, match="was not applied") as refused:
                await leader.submit({"op": "upsert_node", "node": {"id": "n"}}, timeout=0.3)
            assert not isinstance(refused.value, WriteOutcomeUnknown)

            # The followers come back; retrying with the same rid is safe whatever happened.
            for address in followers:
                stores[address] = make_store(tmp_path, address, addresses)
                await stores[address].start()
            await leader_of(list(stores.values()))
            result = await leader.submit(command, timeout=10)
            assert result["ok"] and result["model"]["name"] == "m1"
            await until(lambda: all(list(s.view.models) == ["m1"] for s in stores.values()))
        finally:
            await asyncio.gather(*(s.stop() for s in stores.values()))
    asyncio.run(main())
