"""PreVote on real stores: a node cut off from its peers cannot depose a leader that kept
its quorum, and a leader that really is gone is still replaced.

Three stores on loopback talk through a relay (relay.py) that can silence one node's links
the way a partition does (no FIN: bytes are held and delivered on healing).
"""

from __future__ import annotations

import asyncio

import pytest
from harness import free_port
from inprocess import raft_threads
from raftcluster import leader_of, make_store, until
from relay import Relay

CUT_S = 3.0          # several election timeouts (0.4–0.8 s): without PreVote, several terms


@pytest.fixture(autouse=True)
def no_thread_left_behind():
    yield
    assert raft_threads() == []


def _run(tmp_path, body) -> None:
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(3)]

    async def main():
        relay = Relay(addresses)
        await relay.start()
        stores = {a: make_store(tmp_path, a, addresses, bind_host=relay.bind_hosts[a])
                  for a in addresses}
        await asyncio.gather(*(s.start() for s in stores.values()))
        try:
            await body(relay, stores)
        finally:
            await asyncio.gather(*(s.stop() for s in stores.values()))
            await relay.close()
    asyncio.run(main())


def test_a_follower_cut_off_and_healed_does_not_depose_the_leader(tmp_path):
    async def body(relay, stores):
        leader = await leader_of(list(stores.values()))
        term = leader.status.term
        follower = next(s for s in stores.values() if s is not leader)
        other = next(s for s in stores.values() if s not in (leader, follower))
        asked = follower._node.prevote.rounds

        relay.cut(follower.status.self_address)
        await asyncio.sleep(CUT_S)
        # It asked (its deadline passed again and again) but never campaigned: its term
        # is where it was, and the majority never noticed.
        assert follower._node.prevote.rounds > asked
        assert follower.status.term == term
        assert leader.status.is_leader and leader.status.term == term
        await leader.submit({"op": "upsert_node", "node": {"id": "during-cut"}}, timeout=10)

        relay.restore(follower.status.self_address)
        await until(lambda: follower.view.nodes.get("during-cut") is not None, timeout=10)
        await asyncio.sleep(1.0)        # long enough for anything held to arrive and act
        for store in stores.values():
            assert store.status.term == term, [s.status for s in stores.values()]
            assert store.status.leader == leader.status.self_address
        assert leader.status.is_leader and not other.status.is_leader
    _run(tmp_path, body)


def test_a_leader_cut_off_is_replaced_and_follows_once_healed(tmp_path):
    async def body(relay, stores):
        old = await leader_of(list(stores.values()))
        term = old.status.term
        rest = [s for s in stores.values() if s is not old]

        relay.cut(old.status.self_address)
        # No one hears the old leader, so PreVote lets one of the two campaign: exactly one
        # election, one term up.
        await until(lambda: any(s.status.is_leader for s in rest)
                    and rest[0].status.leader == rest[1].status.leader, timeout=10)
        new = next(s for s in rest if s.status.is_leader)
        assert new.status.term == term + 1
        await new.submit({"op": "upsert_node", "node": {"id": "after-cut"}}, timeout=10)
        await until(lambda: not old.status.is_leader, timeout=5)     # its 1.5 s fallback

        relay.restore(old.status.self_address)
        await until(lambda: old.status.leader == new.status.self_address
                    and old.view.nodes.get("after-cut") is not None, timeout=10)
        await asyncio.sleep(1.0)
        assert new.status.is_leader
        assert {s.status.term for s in stores.values()} == {term + 1}
    _run(tmp_path, body)


def test_a_node_whose_term_ran_ahead_of_the_leader_still_rejoins(tmp_path):
    """It campaigned with a majority's yes, then its vote requests were lost (a partition at
    that very moment): its term is ahead of the leader everyone follows. pysyncobj ignores
    the leader's appends of a lower term and its acks carry no term, so only a real vote
    request can reconcile them; PreVote must let that one through."""
    async def body(relay, stores):
        leader = await leader_of(list(stores.values()))
        term = leader.status.term
        ahead = next(s for s in stores.values() if s is not leader)
        # The race is too narrow to provoke; set the term it would have reached directly,
        # on the tick thread, the way pysyncobj does when it campaigns.
        await asyncio.wrap_future(ahead._node.call(
            lambda raft: raft._SyncObj__setCurrentTerm(raft.raftCurrentTerm + 3, None)))
        await until(lambda: ahead.status.term >= term + 3)
        await until(lambda: len({s.status.term for s in stores.values()}) == 1, timeout=15)
        await leader_of(list(stores.values()), timeout=15)
        assert min(s.status.term for s in stores.values()) > term + 3
        assert ahead._node.prevote.stale_leader_bypasses >= 1
        result = await ahead.submit({"op": "upsert_node", "node": {"id": "rejoined"}},
                                    timeout=10)
        assert result["ok"]
    _run(tmp_path, body)
