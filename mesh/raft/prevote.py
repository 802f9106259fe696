"""PreVote (Raft thesis §9.6) in front of pysyncobj's elections, with leader stickiness.

pysyncobj campaigns as soon as a follower's election deadline passes: it raises its term
and asks for votes, and every node that sees the higher term adopts it — a sitting leader
included, which steps down. A node that was cut off (its link down, its process frozen)
campaigns again and again while alone, and the moment it can talk again its high term
deposes a leader that had a quorum all along (seen in the partition test: term 2 → 16 on
healing, and a new election).

Here a node whose deadline passed first asks its peers whether they *would* vote for it
(`pre_vote`), changing no term: a peer says yes only if the asker's log is at least as up
to date as its own and it has not heard from a live leader for `lease_s` (it is not the
leader, its link to its leader is down, or the leader has been silent). Only with a
majority of yeses, itself counted, is pysyncobj let through to campaign; otherwise the
deadline is moved on and the question asked again later. A cut-off node therefore never
raises its term, and on healing follows the leader's next heartbeat.

pysyncobj's election check runs at the start of a tick, so `before_tick` (called by the
tick thread before every tick) is the gate: when pysyncobj would campaign and no majority
said yes for this very deadline, it moves the deadline and asks. The answers arrive as
messages (`on_message`, from the transport, on the same thread); a majority sets the
deadline to a value it remembers, and the next tick campaigns.

Three cases campaign without asking:
* a leadership transfer (pysyncobj's TimeoutNow: the leader itself asked for the election);
* a cluster of one;
* a node whose term is *ahead* of a leader it keeps hearing. pysyncobj ignores appends of
  a lower term without answering, and its acks carry no term, so such a leader would never
  learn of the higher term, and the node would neither follow nor win — stuck. This
  happens only if the node campaigned (with a majority's yes) and was cut off before its
  vote requests arrived. Its real vote request, as in plain Raft, moves everyone to its
  term (the same escape etcd uses with PreVote and CheckQuorum).

The messages travel on gpumesh's transport and never reach pysyncobj. Every method runs on
the tick thread.
"""

from __future__ import annotations

import random
from typing import Any

from pysyncobj import SyncObj

from . import internals
from .internals import clock

__all__ = ["PreVote", "MESSAGE_TYPES"]

MESSAGE_TYPES = frozenset({"pre_vote", "pre_vote_answer"})
# How long after the last append from a lower-term leader a node may still bypass PreVote.
_STALE_LEADER_S = 1.0


class PreVote:
    def __init__(self, *, lease_s: float, retry_min_s: float, retry_max_s: float) -> None:
        self.lease_s = lease_s
        self._retry = (retry_min_s, retry_max_s)
        self._round = 0
        self._round_deadline: float | None = None   # the deadline this round set
        self._yes: set[str] = set()
        self._cleared: float | None = None          # a deadline a majority said yes to
        self._stale_leader_at: float | None = None
        # Counters, for tests and benchmarks.
        self.rounds = 0
        self.campaigns_allowed = 0
        self.stale_leader_bypasses = 0

    # --- the asking side ----------------------------------------------------------------------

    def before_tick(self, raft: SyncObj, transport: Any) -> None:
        """Called before each tick: let pysyncobj campaign only once a majority said yes."""
        if not internals.would_campaign(raft):
            return
        if not raft.otherNodes or internals.transfer_in_progress(raft):
            return
        deadline = internals.election_deadline(raft)
        if self._cleared is not None and deadline == self._cleared:
            self._cleared = None
            self.campaigns_allowed += 1
            return
        now = clock()
        if self._stale_leader_at is not None and now - self._stale_leader_at < _STALE_LEADER_S:
            self._stale_leader_at = None
            self.stale_leader_bypasses += 1
            return
        self._ask(raft, transport, now)

    def _ask(self, raft: SyncObj, transport: Any, now: float) -> None:
        self._round += 1
        self.rounds += 1
        self._yes = set()
        self._round_deadline = now + random.uniform(*self._retry)
        internals.set_election_deadline(raft, self._round_deadline)
        message = {"type": "pre_vote", "round": self._round,
                   "term": raft.raftCurrentTerm + 1,
                   "last_log_index": internals.last_log_index(raft),
                   "last_log_term": internals.last_log_term(raft)}
        for node in raft.otherNodes:
            transport.send(node, message)

    def _on_answer(self, raft: SyncObj, node: Any, message: dict[str, Any]) -> None:
        if message["round"] != self._round or not message["granted"]:
            return
        # An append or a vote since the question moved the deadline: someone leads, or
        # this node already voted; the answers no longer count.
        if internals.election_deadline(raft) != self._round_deadline:
            return
        self._yes.add(node.id)
        if len(self._yes) + 1 > (len(raft.otherNodes) + 1) / 2:
            self._cleared = clock()
            internals.set_election_deadline(raft, self._cleared)
            self._round_deadline = None

    # --- the answering side ---------------------------------------------------------------------

    def on_message(self, raft: SyncObj, transport: Any, node: Any,
                   message: dict[str, Any]) -> None:
        if message["type"] == "pre_vote_answer":
            self._on_answer(raft, node, message)
            return
        transport.send(node, {"type": "pre_vote_answer", "round": message["round"],
                              "granted": self.would_vote(raft, transport, message)})

    def would_vote(self, raft: SyncObj, transport: Any, message: dict[str, Any]) -> bool:
        if raft._isLeader():
            return False
        leader = raft._getLeader()
        if leader is not None and raft.isNodeConnected(leader):
            heard = transport.last_received(leader)
            if heard is not None and clock() - heard < self.lease_s:
                return False                # a live leader: stay with it (stickiness)
        mine = (internals.last_log_term(raft), internals.last_log_index(raft))
        return (message["last_log_term"], message["last_log_index"]) >= mine

    def saw_append(self, raft: SyncObj, term: int) -> None:
        """An append_entries arrived (before pysyncobj handles it)."""
        if term < raft.raftCurrentTerm and not raft._isLeader():
            self._stale_leader_at = clock()
