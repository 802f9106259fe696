"""This node's engines tell the cluster which model architectures they serve.

For every engine installation on this node (the built-in one and each installed version)
whose version the replicated `engine_architectures` table lacks, ask the engine
(`backends/architectures.py`, in a child process under the engine's own interpreter) and
write the answer once (`set_engine_architectures`). A version's venv keeps the answer in
`gpumesh-architectures.json`, so vLLM (which imports torch to answer: seconds) is asked once
per install, not at every start. Runs in the background from start-up, and again after an
engine version is installed; nothing waits for it (until a version is read, deploys of it
are not refused for their architecture). The scheduler's check is `scheduler/architectures.py`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

from gpumesh.backends.architectures import (PROBE_TIMEOUT_S, Architectures,
                                            ArchitecturesUnknown, probe_command, read_answer)
from gpumesh.backends.versions import BackendVersions

from .commands.engines import architectures_key
from .state import ClusterStore, CommandRejected, StateUnavailable

__all__ = ["ArchitectureReporter", "CACHE_FILE"]

log = logging.getLogger("gpumesh.architectures")

CACHE_FILE = "gpumesh-architectures.json"
_RETRY_S = 30.0           # a write the store refused (no quorum) is tried again after this


class ArchitectureReporter:
    def __init__(self, store: ClusterStore, node_id: str,
                 backends: Callable[[], list[dict[str, Any]]], versions: BackendVersions) -> None:
        self._store = store
        self._node_id = node_id
        self._backends = backends            # the node's described engines (kept current)
        self._versions = versions
        self._wake = asyncio.Event()
        self._unknown: set[str] = set()      # installations that could not say: asked once

    def refresh(self) -> None:
        """Engines changed (a version was installed): look again."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            pending = await self.report_missing()
            try:               # (asyncio.timeout: wait_for can swallow a cancel, state.py)
                async with asyncio.timeout(_RETRY_S if pending else None):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    async def report_missing(self) -> int:
        """Read and write every installation the table lacks; how many could not be written."""
        unwritten = 0
        for engine, version, home in self._installations():
            key = architectures_key(engine, version)
            if key in self._store.view.engine_architectures or key in self._unknown:
                continue
            try:
                found = await self._read(engine, home)
            except ArchitecturesUnknown as exc:
                log.info("cannot tell which architectures %s serves: %s", key, exc)
                self._unknown.add(key)
                continue
            try:
                await self._store.submit({
                    "op": "set_engine_architectures", "engine": engine, "version": version,
                    "architectures": list(found.names), "source": found.source,
                    "node_id": self._node_id, "at": time.time()})
                log.info("%s serves %d architectures (%s)", key, len(found.names), found.source)
            except (StateUnavailable, CommandRejected) as exc:
                log.warning("could not record the architectures of %s: %s", key, exc)
                unwritten += 1
        return unwritten

    def _installations(self) -> list[tuple[str, str, Path | None]]:
        """(engine, version, venv or None for the built-in) of every engine here."""
        found = []
        for described in self._backends():
            name = str(described["name"])
            if described.get("builtin_version"):
                found.append((name, str(described["builtin_version"]), None))
            for version in described.get("versions") or []:
                installed = self._versions.find(name, str(version))
                if installed is not None:
                    found.append((name, installed.version, installed.home))
        return found

    async def _read(self, engine: str, home: Path | None) -> Architectures:
        cache = home / CACHE_FILE if home is not None else None
        if cache is not None and (cached := _load(cache)) is not None:
            return cached
        argv, env = await asyncio.to_thread(probe_command, engine,
                                            str(home) if home is not None else None)
        found = await _run_probe(engine, argv, env)
        if cache is not None:
            _save(cache, found)
        return found


async def _run_probe(engine: str, argv: list[str], env: dict[str, str]) -> Architectures:
    """The probe as a child process that a cancel (daemon stop) kills at once."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True)
    except OSError as exc:
        raise ArchitecturesUnknown(f"could not start {argv[0]}: {exc}") from None
    try:
        out, err = await asyncio.wait_for(process.communicate(), PROBE_TIMEOUT_S)
    except asyncio.TimeoutError:
        _kill_group(process.pid)
        await process.wait()
        raise ArchitecturesUnknown(f"{engine} did not answer within {PROBE_TIMEOUT_S:.0f} s") \
            from None
    except asyncio.CancelledError:  # the daemon stops: the probe and its children go now
        _kill_group(process.pid)
        raise
    return read_answer(engine, out.decode(errors="replace"), err.decode(errors="replace"),
                       process.returncode)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _load(path: Path) -> Architectures | None:
    try:
        data = json.loads(path.read_text())
        return Architectures(tuple(data["architectures"]), str(data["source"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save(path: Path, found: Architectures) -> None:
    """Atomically: several daemons (tests) may share one backends dir."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        temporary.write_text(json.dumps(found.to_dict()))
        temporary.replace(path)
    except OSError as exc:
        log.debug("could not keep %s: %s", path, exc)
        temporary.unlink(missing_ok=True)
