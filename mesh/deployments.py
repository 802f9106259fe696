"""Deployment specs: validate what a user asked to deploy and build the model record.

Everything that can be known before scheduling is checked here, so a bad deploy is refused
with a reason and nothing is stored: the name, the source (path exists / repo id), the
backend (known, serves this format), the replica count, and the memory estimate.

Blocking work (reading GGUF headers, asking the hub for sizes) runs in `build_model_record`,
which the API calls through `asyncio.to_thread`.
"""

from __future__ import annotations

import re
import time
from typing import Any

from gpumesh.backends.registry import UnknownBackend, default_backend_for, get_backend

from gpumesh import modelfiles
from .sources import SourceError, parse_source, remote_size_bytes

__all__ = ["DeploymentError", "MAX_REPLICAS", "build_model_record", "validate_replicas"]

MAX_REPLICAS = 64
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
# Remote sources cannot be read before download: weights plus this share for the KV cache
# and compute buffers. Replaced by the exact estimate once issue-5's prefetch reads headers.
_REMOTE_OVERHEAD = 0.25


class DeploymentError(ValueError):
    """The deploy request is invalid; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def build_model_record(spec: dict[str, Any]) -> dict[str, Any]:
    """Blocking. Validate a deploy request and return the model record to replicate."""
    name = _name(spec.get("name"))
    replicas = validate_replicas(spec.get("replicas", 1))
    context_length = _optional_positive_int(spec.get("context_length"), "context_length")
    args = _args(spec.get("args", []))
    try:
        source = parse_source(str(spec.get("source") or ""))
    except SourceError as exc:
        raise DeploymentError(str(exc), "source") from None
    model_format, estimate = _measure(source, context_length)
    backend = _backend(spec.get("backend"), model_format)
    return {
        "name": name,
        "source": source,
        "format": model_format,
        "backend": backend.name,
        "replicas": replicas,
        "context_length": context_length,
        "args": args,
        "estimate": estimate,
        "created": time.time(),
        "schedule_error": None,
    }


def _measure(source: dict[str, Any], context_length: int | None) -> tuple[str, dict[str, Any]]:
    if source["kind"] == "local":
        try:
            model_format = modelfiles.detect_format(source["path"])
            return model_format, modelfiles.estimate_memory(source["path"],
                                                            context_length).to_dict()
        except modelfiles.ModelFileError as exc:
            raise DeploymentError(str(exc), "source") from None
    try:
        size = remote_size_bytes(source)
    except SourceError as exc:
        raise DeploymentError(str(exc), "source") from None
    model_format = "gguf" if (source.get("file") or "").endswith(".gguf") else "safetensors"
    overhead = int(size * _REMOTE_OVERHEAD)
    return model_format, {"weights_bytes": size, "kv_cache_bytes": 0, "overhead_bytes": overhead,
                          "total_bytes": size + overhead, "context_length": context_length,
                          "format": model_format, "architecture": None}


def _backend(requested: Any, model_format: str):
    if requested:
        try:
            backend = get_backend(str(requested))
        except UnknownBackend as exc:
            raise DeploymentError(exc.args[0], "backend") from None
        if model_format not in backend.model_formats:
            raise DeploymentError(
                f"backend {backend.name} cannot serve {model_format} models "
                f"(it serves {', '.join(sorted(backend.model_formats))})", "backend")
        return backend
    try:
        return default_backend_for(model_format)
    except (KeyError, ValueError) as exc:
        raise DeploymentError(str(exc.args[0] if exc.args else exc), "backend") from None


def _name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise DeploymentError("name must be 1-128 characters: letters, digits and . _ : / -, "
                              "starting with a letter or digit", "name")
    return value


def validate_replicas(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REPLICAS:
        raise DeploymentError(f"replicas must be a whole number from 0 to {MAX_REPLICAS}",
                              "replicas")
    return value


def _optional_positive_int(value: Any, param: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DeploymentError(f"{param} must be a positive whole number", param)
    return value


def _args(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise DeploymentError("args must be a list of strings", "args")
    return value
