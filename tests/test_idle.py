"""An idle cluster does little: the leader ticks on its heartbeat timer rather than on every
answer, followers repeat an unchanged ack only every ACK_REPEAT_S (the leader still hears
each of them far inside its fallback and the liveness grace), a node writes its resources
only when they moved, and the liveness loop wakes when a grace can run out, not 4 times a
second. bench/mesh.py measures what this saves (CPU per idle daemon)."""

from __future__ import annotations

import asyncio
import time

import pytest
from harness import free_port
from inprocess import raft_threads
from raftcluster import leader_of, make_store, until

from gpumesh.mesh import liveness
from gpumesh.mesh.liveness import LivenessMonitor
from gpumesh.mesh.membership import MEMORY_STEP_BYTES, REFRESH_MAX_S, worth_writing
from gpumesh.mesh.raft.transport import ACK_REPEAT_S

GIB = 1 << 30


@pytest.fixture(autouse=True)
def no_thread_left_behind():
    yield
    assert raft_threads() == []


def test_an_idle_leader_ticks_on_its_timer_and_followers_thin_their_acks(tmp_path):
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(3)]

    async def main():
        stores = [make_store(tmp_path, a, addresses) for a in addresses]
        await asyncio.gather(*(s.start() for s in stores))
        try:
            leader = await leader_of(stores)
            followers = [s for s in stores if s is not leader]
            await until(lambda: len(leader.status.peers) == 2
                        and all(p.connected for p in leader.status.peers))
            await asyncio.sleep(0.5)                 # past the start-up writes
            ticks = leader._node.ticks
            follower_ticks = [f._node.ticks for f in followers]
            held = [f._node._transport.acks_held for f in followers]
            worst_silence = 0.0
            started = time.monotonic()
            while time.monotonic() - started < 2.0:
                now = time.monotonic()
                worst_silence = max(worst_silence, *(p.silent_for(now) or 0.0
                                                     for p in leader.status.peers))
                await asyncio.sleep(0.02)
            # Ten heartbeat rounds a second, each answered by two followers: a tick after
            # every answer made ~60 ticks in 2 s (~34 with the thinned acks); the timer
            # alone makes ~20 (fewer on a loaded machine, never more).
            assert leader._node.ticks - ticks < 30
            # A follower still ticks (redials, its journal's timer) about every 0.25 s,
            # although heartbeats arriving every 0.1 s never let its own timer run out
            # (found by bench/raft.py: a restarted follower never redialled the other one,
            # and failovers took 0.5-0.9 s).
            assert all(f._node.ticks - t >= 3 for f, t in zip(followers, follower_ticks))
            # Followers kept most repeats to themselves...
            assert all(f._node._transport.acks_held > h for f, h in zip(followers, held))
            # ...and the leader still heard each of them every few tenths of a second
            # (~0.4 s at worst; its fallback, which matters, is 1.5 s).
            assert worst_silence < 1.2, worst_silence
            # A write is answered at once: its ack moves the index, so it is never held.
            begun = time.perf_counter()
            await leader.submit({"op": "upsert_node", "node": {"id": "n1", "name": "n1"}})
            await followers[0].submit({"op": "upsert_node", "node": {"id": "n2", "name": "n2"}})
            assert time.perf_counter() - begun < ACK_REPEAT_S * 4
        finally:
            await asyncio.gather(*(s.stop() for s in stores))
    asyncio.run(main())


def test_resources_are_written_when_they_move_not_on_every_reading():
    written = {"memory_available_bytes": 10 * GIB, "load_1m": 0.1,
               "gpus": [{"index": 0, "memory_used_bytes": GIB}]}
    same = {**written, "load_1m": 3.5}                # load alone places nothing
    assert worth_writing(None, same, age_s=0.0)       # the first reading always
    assert not worth_writing(written, same, age_s=5.0)
    assert worth_writing(written, same, age_s=REFRESH_MAX_S)
    small = {**written, "memory_available_bytes": 10 * GIB - MEMORY_STEP_BYTES // 2}
    assert not worth_writing(written, small, age_s=5.0)
    moved = {**written, "memory_available_bytes": 10 * GIB - MEMORY_STEP_BYTES}
    assert worth_writing(written, moved, age_s=5.0)
    gpu = {**written, "gpus": [{"index": 0, "memory_used_bytes": GIB + MEMORY_STEP_BYTES}]}
    assert worth_writing(written, gpu, age_s=5.0)
    another_gpu = {**written, "gpus": [*written["gpus"], {"index": 1, "memory_used_bytes": 0}]}
    assert worth_writing(written, another_gpu, age_s=5.0)


def test_liveness_wakes_when_a_grace_can_run_out(tmp_path):
    async def main():
        store = make_store(tmp_path, f"127.0.0.1:{free_port()}", [])
        await store.start()
        try:
            await store.wait_ready(10)
            for name in ("a", "b"):
                await store.submit({"op": "upsert_node",
                                    "node": {"id": name, "name": name, "status": "ready"}})
            monitor = LivenessMonitor(store, grace_s=5.0)
            await monitor.check_once(store.status, 100.0)    # elected: a full grace each
            assert monitor.next_check_in(100.5) == liveness._MAX_CHECK_S
            # Just after the first grace could run out, not a quarter second late.
            assert monitor.next_check_in(104.6) == pytest.approx(0.41, abs=1e-6)
            assert monitor.next_check_in(105.5) == liveness._CHECK_S   # past: retry soon
            await store.submit({"op": "set_node_status", "id": "b", "status": "unreachable",
                                "reason": "test", "at": time.time(), "evict": True})
            # An unreachable node comes back by its Raft answers, which change no state.
            assert monitor.next_check_in(100.5) == liveness._CHECK_S
        finally:
            await store.stop()
    asyncio.run(main())
