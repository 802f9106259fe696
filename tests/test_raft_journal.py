"""The Raft journal on real files: records survive a reopen, a torn tail is cut and said,
damage and a missing journal refuse to start with the file and byte named, and a full disk
(a real tmpfs, as root) refuses writes with a clear error while the process lives on."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
from harness import free_port
from inprocess import raft_threads
from raftcluster import leader_of, make_store, running_store, until

from gpumesh.mesh.errors import write_unavailable
from gpumesh.mesh.raft.journal import DurableJournal, JournalWriteError
from gpumesh.mesh.state import StartupRefused, StorageFull


@pytest.fixture(autouse=True)
def no_thread_left_behind():
    yield
    assert raft_threads() == []


def _journal(tmp_path: Path, entries: int = 4) -> DurableJournal:
    journal = DurableJournal(tmp_path / "journal")
    for idx in range(1, entries + 1):
        journal.add(f"command {idx}".encode(), idx, 1)
    return journal


def test_entries_survive_a_reopen_and_deletions_are_durable(tmp_path):
    journal = _journal(tmp_path, 6)
    journal.setCurrentTerm(3, "127.0.0.1:1")
    journal.setRaftCommitIndex(5)
    journal.deleteEntriesFrom(4)                    # a follower drops a conflicting tail
    journal.add(b"replacement", 5, 3)
    journal._destroy()                              # saves the lazy commit index
    reopened = DurableJournal(tmp_path / "journal")
    assert [e[1] for e in reopened] == [1, 2, 3, 4, 5]
    assert reopened[-1] == (b"replacement", 5, 3)
    assert (reopened.getCurrentTerm(), reopened.getVotedForNodeId(),
            reopened.getRaftCommitIndex()) == (3, "127.0.0.1:1", 5)
    reopened.deleteEntriesTo(2)                     # compaction keeps entries 3..5
    reopened._destroy()
    again = DurableJournal(tmp_path / "journal")
    assert [e[1] for e in again] == [3, 4, 5] and again[0] == (b"command 3", 3, 1)
    again._destroy()


def test_a_torn_tail_is_cut_off_and_reported(tmp_path):
    _journal(tmp_path)._destroy()
    path = tmp_path / "journal"
    intact = path.stat().st_size
    with open(path, "ab") as handle:                # a crash in the middle of a write
        handle.write(b"\x40\x00\x00\x00\x12\x34")
    journal = DurableJournal(path)
    assert len(journal) == 4
    assert f"at byte {intact}" in journal.repaired and "last 6 bytes" in journal.repaired
    assert path.stat().st_size == intact
    journal.add(b"after the repair", 5, 1)
    journal._destroy()
    assert [e[0] for e in DurableJournal(path)][-1] == b"after the repair"


def test_damage_before_the_end_refuses_to_start_and_names_the_byte(tmp_path):
    journal = _journal(tmp_path)
    second = journal._offsets[1]
    journal._destroy()
    path = tmp_path / "journal"
    data = bytearray(path.read_bytes())
    data[second + 30] ^= 0xFF                       # a flipped bit inside entry 2
    path.write_bytes(bytes(data))
    with pytest.raises(StartupRefused, match=f"journal at {path} is damaged at byte {second}"):
        DurableJournal(path)
    path.write_bytes(b"not a journal at all")
    with pytest.raises(StartupRefused, match="damaged at byte 0"):
        DurableJournal(path)


def test_a_missing_journal_or_a_damaged_meta_file_is_named(tmp_path):
    journal = _journal(tmp_path)
    journal.setCurrentTerm(7, None)
    journal._destroy()
    (tmp_path / "journal").unlink()
    with pytest.raises(StartupRefused, match="journal at .* is missing, but .*journal.meta "
                       "says this node has been a member of a cluster \\(term 7\\)"):
        DurableJournal(tmp_path / "journal")
    (tmp_path / "journal.meta").write_bytes(b"\0" * 1024)
    with pytest.raises(StartupRefused, match="journal.meta is damaged"):
        DurableJournal(tmp_path / "journal")


def test_the_term_file_keeps_the_last_whole_save(tmp_path):
    journal = DurableJournal(tmp_path / "journal")
    for term in range(1, 6):
        journal.setCurrentTerm(term, f"127.0.0.1:{term}")
    journal._destroy()
    meta = tmp_path / "journal.meta"
    assert meta.stat().st_size == 1024                # fixed size: saves never grow it
    data = bytearray(meta.read_bytes())
    data[30] ^= 0xFF                                  # the newest save (term 5), torn
    meta.write_bytes(bytes(data))
    reopened = DurableJournal(tmp_path / "journal")
    assert (reopened.getCurrentTerm(), reopened.getVotedForNodeId()) == (4, "127.0.0.1:4")
    reopened._destroy()


def test_a_store_restarts_from_a_compacted_log_and_refuses_a_missing_journal(tmp_path):
    address = f"127.0.0.1:{free_port()}"

    async def write():
        async with running_store(tmp_path, address, []) as store:
            for n in range(5):
                await store.submit({"op": "upsert_node", "node": {"id": f"n{n}"}})
            store._node.call(lambda raft: raft.forceLogCompaction()).result(5)
            await until(lambda: (tmp_path / address.replace(":", "_") / "snapshot").exists())
            await store.submit({"op": "upsert_node", "node": {"id": "after"}})

    async def read():
        async with running_store(tmp_path, address, []) as store:
            return set(store.view.nodes)

    asyncio.run(write())
    assert asyncio.run(read()) == {"n0", "n1", "n2", "n3", "n4", "after"}
    (tmp_path / address.replace(":", "_") / "journal").unlink()
    with pytest.raises(StartupRefused, match="journal at .* is missing"):
        asyncio.run(read())


# --- a full disk (root: a real tmpfs) --------------------------------------------------------

@pytest.fixture
def tiny_disks(tmp_path):
    """Mount points of tmpfs file systems, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    mounted: list[Path] = []

    def mount(name: str, size: str = "2m") -> Path:
        point = tmp_path / name
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                        str(point)], check=True)
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_fails_the_write_cleanly(tiny_disks):
    journal = _journal(tiny_disks("j"))
    before = os.path.getsize(journal.path)
    filler = _fill(journal.path.parent)
    with pytest.raises(JournalWriteError) as info:
        journal.add(b"x" * 65536, 5, 1)
    assert info.value.errno == errno.ENOSPC and info.value.command == b"x" * 65536
    assert "No space left on device" in journal.failure
    assert len(journal) == 4 and os.path.getsize(journal.path) == before   # rolled back
    filler.unlink()
    assert journal.probe() and journal.failure is None
    journal.add(b"x" * 65536, 5, 1)
    journal._destroy()
    assert len(DurableJournal(journal.path)) == 5


def test_a_full_disk_refuses_writes_hands_over_and_recovers(tiny_disks):
    addresses = sorted(f"127.0.0.1:{free_port()}" for _ in range(3))
    disks = {a: tiny_disks(f"disk{n}") for n, a in enumerate(addresses)}

    async def main():
        stores = {a: make_store(disks[a], a, addresses) for a in addresses}
        await asyncio.gather(*(s.start() for s in stores.values()))
        try:
            leader = await leader_of(list(stores.values()))
            await leader.submit({"op": "upsert_node", "node": {"id": "before"}})
            filler = _fill(disks[leader.status.self_address])
            big = {"op": "upsert_node", "node": {"id": "big", "blob": "x" * 200_000}}
            with pytest.raises(StorageFull, match="could not write it to its Raft journal"):
                await leader.submit(big, timeout=5)
            # The node lives, says why, and hands the leadership to a follower.
            assert leader._node.running
            await until(lambda: leader.status.storage_error is not None)
            assert "No space left on device" in leader.status.storage_error
            await until(lambda: leader.status.leader not in (None, leader.status.self_address),
                        timeout=10)
            with pytest.raises(StorageFull, match="cannot write its Raft journal") as refused:
                await leader.submit({"op": "upsert_node", "node": {"id": "refused"}})
            reply = write_unavailable(refused.value)
            assert reply.status == 503
            assert json.loads(reply.body)["error"]["code"] == "storage_full"
            # The others go on; once space is back, the full node catches up and writes.
            others = [s for s in stores.values() if s is not leader]
            new_leader = await leader_of(others)
            await new_leader.submit({"op": "upsert_node", "node": {"id": "meanwhile"}})
            filler.unlink()
            await until(lambda: leader.status.storage_error is None, timeout=10)
            await leader.submit({"op": "upsert_node", "node": {"id": "after"}}, timeout=10)
            await until(lambda: {"before", "meanwhile", "after"} <= set(leader.view.nodes))
        finally:
            await asyncio.gather(*(s.stop() for s in stores.values()))
    asyncio.run(main())


def test_a_resent_append_of_the_same_term_keeps_entries_and_a_conflict_drops_them(tmp_path):
    journal = DurableJournal(tmp_path / "journal")
    for idx in range(1, 6):
        journal.add(f"c{idx}".encode(), idx, 2)
    # pysyncobj handling a stale resend of entry 3 (term 2) asks to truncate from 3 and
    # re-adds entry 3: nothing this node acked (4, 5) may go.
    journal.begin_message(2)
    journal.deleteEntriesFrom(2)
    journal.add(b"c3", 3, 2)
    journal.end_message()
    assert [e[1] for e in journal] == [1, 2, 3, 4, 5]
    # A leader of term 3 whose log differs from index 4: those entries are replaced.
    journal.begin_message(3)
    journal.deleteEntriesFrom(3)
    journal.add(b"other", 4, 3)
    journal.end_message()
    assert list(journal)[3:] == [(b"other", 4, 3)]
    journal._destroy()
    assert [e[1] for e in DurableJournal(tmp_path / "journal")] == [1, 2, 3, 4]
