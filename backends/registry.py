"""The inference engines gpumesh knows, by the name users type (`--backend llama.cpp`).

Adding an engine is one line in `_BACKENDS`; its position there is also its precedence
when a deployment names no backend and several serve the model's format.
"""

from __future__ import annotations

from gpumesh.backends.base import Backend
from gpumesh.backends.llama_cpp import LlamaCppBackend

__all__ = ["UnknownBackend", "UnsupportedModelFormat", "backend_names", "default_backend_for",
           "describe_backends", "get_backend"]

# In order of preference for default_backend_for.
_BACKENDS: tuple[type[Backend], ...] = (
    LlamaCppBackend,
)


class UnknownBackend(KeyError):
    """No backend has the requested name; the message lists the known ones."""

    def __str__(self) -> str:
        # KeyError's own str() quotes its argument as a repr; users see this message.
        return str(self.args[0]) if self.args else ""


class UnsupportedModelFormat(ValueError):
    """No registered backend serves models in this format."""


def backend_names() -> list[str]:
    """Names of the registered backends, in order of preference."""
    return [cls.name for cls in _BACKENDS]


def describe_backends() -> list[dict[str, object]]:
    """Every registered backend as this node's installation offers it. Blocking: each may
    ask its engine for its devices; the daemon calls this once at start-up."""
    return [cls().describe() for cls in _BACKENDS]


def get_backend(name: str) -> Backend:
    """The backend called `name` (case-insensitive); raises UnknownBackend."""
    for cls in _BACKENDS:
        if cls.name.lower() == name.strip().lower():
            return cls()
    raise UnknownBackend(f"unknown backend {name!r}; known backends: {', '.join(backend_names())}")


def default_backend_for(model_format: str) -> Backend:
    """The preferred backend for a model format ("gguf" …); raises UnsupportedModelFormat."""
    for cls in _BACKENDS:
        if model_format in cls.model_formats:
            return cls()
    served = sorted({fmt for cls in _BACKENDS for fmt in cls.model_formats})
    raise UnsupportedModelFormat(
        f"no backend serves {model_format!r} models yet; formats served: {', '.join(served)}"
    )
