"""The backend interface: what every inference engine module provides.

A backend is a small object that knows how to *describe* a launch of its engine; it
never starts processes itself. The node agent (`gpumesh.mesh.agent`) owns the
processes: it asks a backend for a `LaunchSpec`, starts it, probes readiness through
`Backend.health_path`, and kills it on stop. Keeping the two apart means a backend
can be unit-tested by inspecting the spec alone.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

__all__ = ["Backend", "BackendUnavailable", "LaunchRequest", "LaunchSpec", "SUPERVISOR_PID_ENV"]

# Every engine process gpumesh starts gets the starting daemon's pid in this variable, so an
# engine that can watch its parent (our runners) can tell a dead supervisor from a live one.
SUPERVISOR_PID_ENV = "GPUMESH_SUPERVISOR_PID"


class BackendUnavailable(Exception):
    """The engine cannot run on this node (not installed, wrong platform ...).

    The message is shown to users as is, so it says what is missing and how to get it.
    """


@dataclass(frozen=True)
class LaunchRequest:
    """Everything a backend needs to build one instance's launch."""

    model_path: str            # a file (GGUF) or a directory (safetensors + config.json)
    served_name: str           # the name clients use in the OpenAI `model` field
    port: int                  # the engine listens on host:port, nothing else
    host: str = "127.0.0.1"    # engines have no auth of their own: loopback only
    gpu_vendor: str | None = None          # "nvidia" / "amd" / None for CPU
    gpu_indices: tuple[int, ...] = ()      # devices this instance may use
    context_length: int | None = None      # None: the backend's default
    extra_args: tuple[str, ...] = ()       # passed through from the deployment spec
    # A per-instance key that only the gateway knows: engines that can check a bearer key
    # are started with it, so nothing else on the host can call them. None: no key.
    api_key: str | None = None


@dataclass(frozen=True)
class LaunchSpec:
    """A process to start: argv + environment additions. Plain data, easy to assert on."""

    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)


class Backend(abc.ABC):
    """One inference engine. Subclasses set the class attributes and implement `launch`."""

    name: str = ""                          # the `--backend` value users type
    model_formats: frozenset[str] = frozenset()   # "gguf", "safetensors", ...
    gpu_vendors: frozenset[str] = frozenset()     # vendors it can use; empty: CPU only
    runs_on_cpu: bool = False
    health_path: str = "/health"            # GET returns 200 once the model is loaded

    @abc.abstractmethod
    def version(self) -> str:
        """The installed engine's version; raises BackendUnavailable if it is missing."""

    @abc.abstractmethod
    def launch(self, request: LaunchRequest) -> LaunchSpec:
        """The process that serves `request`; raises BackendUnavailable if it cannot."""

    def usable_gpu_vendors(self) -> frozenset[str]:
        """The GPU vendors this *installation* can drive: a CPU-only build drives none.

        Blocking (it may ask the engine itself); the daemon calls it once at start-up.
        """
        return self.gpu_vendors

    def describe(self) -> dict[str, object]:
        """What this node's installation offers, as plain data for the node record, the API
        and the CLI (`gpumesh backends`). Blocking; call once, off the event loop."""
        summary: dict[str, object] = {
            "name": self.name,
            "model_formats": sorted(self.model_formats),
            "runs_on_cpu": self.runs_on_cpu,
        }
        try:
            summary.update(version=self.version(), gpu_vendors=sorted(self.usable_gpu_vendors()),
                           available=True, problem=None)
        except BackendUnavailable as exc:
            summary.update(version=None, gpu_vendors=[], available=False, problem=str(exc))
        return summary
