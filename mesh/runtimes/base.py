"""What the instance supervisor needs from a runtime: start an engine, then one handle to
wait for it, stop it gracefully, or kill it at once."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path

from gpumesh.backends.base import LaunchSpec

__all__ = ["EngineHandle", "Runtime", "EngineStartError", "StartRequest"]


class EngineStartError(Exception):
    """The engine could not be started; the message says why, for users."""


@dataclass(frozen=True)
class StartRequest:
    spec: LaunchSpec
    instance_id: str
    log_file: Path
    gpu_vendor: str | None = None          # the allocation, for runtimes that map devices
    gpu_indices: tuple[int, ...] = ()


class EngineHandle(abc.ABC):
    """One running engine."""

    pid: int | None = None                 # the process (group) id on this host, if any
    container_id: str | None = None

    @property
    @abc.abstractmethod
    def returncode(self) -> int | None:
        """None while it runs; its exit status afterwards."""

    @abc.abstractmethod
    async def wait(self) -> int:
        """Until the engine ends; its exit status."""

    @abc.abstractmethod
    async def stop(self, grace: float) -> None:
        """Ask it to stop; force it after `grace` seconds. Leaves nothing of it running."""

    @abc.abstractmethod
    def kill_now(self) -> None:
        """No grace, no waiting (a second Ctrl-C, or an engine that stopped answering)."""


class Runtime(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    async def start(self, request: StartRequest) -> EngineHandle:
        """Start the engine; raises EngineStartError when it cannot even begin."""

    async def reap_orphans(self) -> int:
        """Remove engines a previous run of this node left behind; how many there were."""
        return 0
