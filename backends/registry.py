"""The inference engines gpumesh knows, by the name users type (`--backend llama.cpp`).

Adding an engine is one line in `_BACKENDS`; its position there is also its precedence
when a deployment names no backend and several serve the model's format and kind.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from gpumesh.backends.base import Backend
from gpumesh.backends.custom import CustomBackend
from gpumesh.backends.mindie import MindieBackend
from gpumesh.backends.sglang import SglangBackend
from gpumesh.backends.transformers_serve import TransformersBackend
from gpumesh.backends.vox_box import VoxBoxBackend
from gpumesh.backends.llama_cpp import LlamaCppBackend
from gpumesh.backends.versions import BackendVersions
from gpumesh.backends.vllm import VllmBackend

__all__ = ["UnknownBackend", "UnsupportedModelFormat", "backend_names", "default_backend_for",
           "describe_backends", "get_backend", "node_backends"]

# In order of preference for default_backend_for.
_BACKENDS: tuple[type[Backend], ...] = (
    LlamaCppBackend,
    VllmBackend,
    TransformersBackend,  # the light one for safetensors: where vLLM is not worth it (see below)
    SglangBackend,
    VoxBoxBackend,
    MindieBackend,
    CustomBackend,        # serves any format, so never a default: it must be named
)


class UnknownBackend(KeyError):
    """No backend has the requested name; the message lists the known ones."""

    def __str__(self) -> str:
        # KeyError's own str() quotes its argument as a repr; users see this message.
        return str(self.args[0]) if self.args else ""


class UnsupportedModelFormat(ValueError):
    """No registered backend serves models in this format (or of this kind)."""


def backend_names() -> list[str]:
    """Names of the registered backends, in order of preference."""
    return [cls.name for cls in _BACKENDS]


def describe_backends(versions: BackendVersions | None = None) -> list[dict[str, object]]:
    """Every registered backend as this node offers it: the built-in installation, the
    versions installed under the backends dir, and whether more can be installed.

    `available` means an instance can be placed here: something is installed, or gpumesh
    can install it on demand. `runs_on_cpu` / `gpu_vendors` are the union over all of them.
    Blocking: the built-in llama.cpp is asked for its devices; call off the event loop.
    """
    return [_describe(cls(), versions) for cls in _BACKENDS]


def _describe(backend: Backend, versions: BackendVersions | None) -> dict[str, object]:
    summary = backend.describe()
    builtin_ok = bool(summary["available"])
    cpu, vendors = bool(summary["runs_on_cpu"]) and builtin_ok, set(summary["gpu_vendors"])  # type: ignore[arg-type]
    installed = versions.installed(backend.name) if versions else []
    recipe = backend.install_packages(None, versions.gpu_vendors) if versions else None
    from_image = False
    if versions is not None and (installed or recipe is not None or backend.container_only):
        extra_cpu, extra_vendors = backend.installable_traits(versions.gpu_vendors)
        cpu, vendors = cpu or extra_cpu, vendors | extra_vendors
        # An image-only engine can run wherever its devices are (the image is the version).
        from_image = backend.container_only and (extra_cpu or bool(extra_vendors))
    summary.update(
        builtin_version=summary["version"],
        versions=[v.version for v in installed],
        installable=recipe is not None,
        install_packages=list(recipe.packages) if recipe else [],
        runs_on_cpu=cpu, gpu_vendors=sorted(vendors),
        available=builtin_ok or bool(installed) or recipe is not None or from_image)
    if not builtin_ok and installed:
        summary["version"] = installed[-1].version     # what an unpinned model gets here
    if summary["available"]:
        summary["problem"] = None
    return summary


def node_backends(described: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    """What a node record keeps of `describe_backends()`: per available engine, what the
    scheduler places by (`runs_on_cpu`, `gpu_vendors`, and for llama.cpp its `rpc` roles),
    the default `version`, the installed `versions` and whether more can be `installable`
    on demand."""
    return {b["name"]: {"version": b["version"], "runs_on_cpu": b["runs_on_cpu"],  # type: ignore[misc]
                        "gpu_vendors": b["gpu_vendors"], "builtin_version": b["builtin_version"],
                        "versions": b["versions"], "installable": b["installable"],
                        **({"rpc": b["rpc"]} if "rpc" in b else {})}
            for b in described if b["available"]}


def get_backend(name: str) -> Backend:
    """The backend called `name` (case-insensitive); raises UnknownBackend."""
    for cls in _BACKENDS:
        if cls.name.lower() == name.strip().lower():
            return cls()
    raise UnknownBackend(f"unknown backend {name!r}; known backends: {', '.join(backend_names())}")


def default_backend_for(model_format: str, kind: str = "llm",
                        nodes: Iterable[Mapping[str, Any]] | None = None) -> Backend:
    """The preferred backend for a model format ("gguf" …) and kind ("llm" …); raises
    UnsupportedModelFormat.

    `nodes`: each node record's `backends` (`node_backends`), where the cluster is known. An
    engine that is no default on the CPU (`Backend.default_on_cpu`: vLLM) then gives way to
    the next one that serves the model on a CPU, unless it runs somewhere already: installed
    on a node, or with GPUs it drives. So a cluster of CPU-only nodes without vLLM serves
    safetensors with transformers, and vLLM stays the default wherever it runs.
    """
    candidates = [cls for cls in _BACKENDS if model_format in cls.model_formats and kind in cls.kinds]
    if not candidates:
        served = sorted({f"{fmt} {k}" for cls in _BACKENDS for fmt in cls.model_formats
                         for k in cls.kinds if fmt == model_format})
        raise UnsupportedModelFormat(
            f"no backend serves {kind} models in {model_format!r} format yet"
            + (f"; {model_format} kinds served: {', '.join(k.split()[1] for k in served)}" if served
               else f"; formats served: {', '.join(sorted({f for c in _BACKENDS for f in c.model_formats}))}"))
    first = candidates[0]
    known = [node for node in nodes or () if isinstance(node, Mapping)]
    if not first.default_on_cpu and known and not _runs_somewhere(first.name, known):
        lighter = next((c for c in candidates[1:] if c.runs_on_cpu and c.default_on_cpu), None)
        if lighter is not None:
            return lighter()
    return first()


def _runs_somewhere(name: str, nodes: list[Mapping[str, Any]]) -> bool:
    """Whether some node has engine `name` installed (built in or a version) or GPUs it drives."""
    for node in nodes:
        traits = node.get(name)
        if isinstance(traits, Mapping) and (traits.get("gpu_vendors") or traits.get("versions")
                                            or traits.get("builtin_version")):
            return True
    return False
