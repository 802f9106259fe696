"""The data dir: node identity, cluster secret, Raft journal paths, the admin key file.

Layout (all created 0700/0600 because the Raft journal and the secret are sensitive):

    <data-dir>/node.json        {"id": ..., "created": ...}  stable across restarts
    <data-dir>/cluster.secret   the cluster secret (Raft transport password)
    <data-dir>/cluster.json     the cluster this node belongs to: its id, the Raft members
                                last seen, whether the join completed
    <data-dir>/engine.secret    this node's own secret: its engines' keys derive from it
    <data-dir>/admin.key        the first admin API key, written once on first start
    <data-dir>/endpoint.json    where the running (or last) daemon listens, for the CLI
    <data-dir>/raft/journal     pysyncobj's journal
    <data-dir>/raft/snapshot    pysyncobj's full dumps (log compaction)
    <data-dir>/logs/            one log file per backend instance
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DataDir", "DataDirInUse", "DataDirLock"]


class DataDirInUse(Exception):
    """Another gpumesh process holds this data dir; the message names its pid."""


class DataDirLock:
    """An exclusive lock on the data dir for as long as the daemon runs.

    Two daemons on one journal would corrupt it: the second one is refused. The kernel drops
    an flock when its holder dies, so a crashed daemon never leaves a stale lock behind.
    """

    def __init__(self, root: Path) -> None:
        self._path = root / "lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUse(f"the data dir {self._path.parent} is in use by another gpumesh "
                               f"(pid {holder}); stop it or pick another --data-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)     # closing drops the flock
            self._fd = None


@dataclass(frozen=True)
class DataDir:
    root: Path

    @classmethod
    def open(cls, root: Path) -> "DataDir":
        """Create the folder tree if needed and tighten its permissions."""
        for folder in (root, root / "raft", root / "logs"):
            folder.mkdir(parents=True, exist_ok=True)
            os.chmod(folder, 0o700)
        return cls(root)

    @property
    def journal_file(self) -> Path:
        return self.root / "raft" / "journal"

    @property
    def snapshot_file(self) -> Path:
        return self.root / "raft" / "snapshot"

    @property
    def admin_key_file(self) -> Path:
        return self.root / "admin.key"

    def instance_log(self, instance_id: str) -> Path:
        return self.root / "logs" / f"{instance_id}.log"

    def node_id(self) -> str:
        """This node's id, made on first start and kept: the cluster knows the node by it."""
        path = self.root / "node.json"
        if path.exists():
            return str(json.loads(path.read_text())["id"])
        node_id = uuid.uuid4().hex[:12]
        _write_private(path, json.dumps({"id": node_id, "created": time.time()}) + "\n")
        return node_id

    def cluster_secret(self) -> str:
        """The secret that authenticates and encrypts the Raft port; made on first start."""
        path = self.root / "cluster.secret"
        if path.exists():
            return path.read_text().strip()
        secret = secrets.token_urlsafe(32)
        _write_private(path, secret + "\n")
        return secret

    @property
    def endpoint_file(self) -> Path:
        return self.root / "endpoint.json"

    def write_endpoint(self, api_url: str, connect_url: str, raft_address: str) -> None:
        """Written by the daemon once its API listens: the CLI finds the node on any port.
        Left in place on stop (the address is still where this node serves when it is up)."""
        record = {"api_url": api_url, "connect_url": connect_url, "raft_address": raft_address,
                  "pid": os.getpid(), "started": time.time()}
        _write_private(self.endpoint_file, json.dumps(record) + "\n")

    def read_endpoint(self) -> dict[str, object] | None:
        """The daemon's endpoint record, or None if no daemon has written one (or it is
        unreadable: a CLI of another user, a half-made dir)."""
        try:
            record = json.loads(self.endpoint_file.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and "connect_url" in record else None

    @property
    def cluster_file(self) -> Path:
        return self.root / "cluster.json"

    def read_cluster(self) -> dict | None:
        """What this node knows of its cluster, or None before its first start or join."""
        try:
            return json.loads(self.cluster_file.read_text())
        except FileNotFoundError:
            return None

    def write_cluster(self, record: dict) -> None:
        _write_private(self.cluster_file, json.dumps(record, indent=1, sort_keys=True) + "\n")

    def write_cluster_secret(self, secret: str) -> None:
        """A joiner's secret comes from the cluster, not from this machine."""
        _write_private(self.root / "cluster.secret", secret + "\n")

    def has_journal(self) -> bool:
        return any(self.journal_file.parent.glob("*"))
    def engine_secret(self) -> bytes:
        """This node's secret for its engines' per-instance keys; never leaves the node."""
        path = self.root / "engine.secret"
        if not path.exists():
            _write_private(path, secrets.token_hex(32) + "\n")
        return bytes.fromhex(path.read_text().strip())

    def write_admin_key(self, key: str) -> Path:
        _write_private(self.admin_key_file, key + "\n")
        return self.admin_key_file

    def read_admin_key(self) -> str | None:
        try:
            return self.admin_key_file.read_text().strip() or None
        except OSError:
            return None


def _write_private(path: Path, text: str) -> None:
    """Write a file that only the owner can read, atomically (no half-written secrets)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)
