"""Deployment specs: validate what a user asked to deploy and build the model record.

Everything that can be known before scheduling is checked here, so a bad deploy is refused
with a reason and nothing is stored: the name, the source (path exists / repo id), the
kind (detected from the files, or `kind` given), the backend and its version (`vllm==0.25.1`:
known, serves this format and kind), an image (runs the engine in a container), the replica
count, the context length (not beyond what the model was trained for) and the memory
estimate. Each refusal says which rule failed.

Names are ASCII on purpose: a model's name is what clients send as `model`, and it travels
through URLs (/api/models/NAME), shells, engine flags, log lines and metrics labels. Letters
from other scripts would be legal in most of those, but look-alikes (Cyrillic "а" and Latin
"a") would let two models look identical, and NFC/NFD spellings of "è" would be two names
that print the same. Unicode belongs in descriptions, not identifiers.

Blocking work (reading GGUF headers, asking the hub for sizes) runs in `build_model_record`,
which the API calls through `asyncio.to_thread`.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from gpumesh.backends.registry import UnknownBackend, default_backend_for, get_backend
from gpumesh.backends.versions import parse_backend_spec

from gpumesh import modelfiles
from .scheduler.spec import SpecError, scheduling_fields
from .sources import ModelCache, SourceError, parse_source, remote_facts

__all__ = ["DeploymentError", "MAX_NAME_LENGTH", "MAX_REPLICAS", "build_model_record",
           "default_name", "validate_name", "validate_replicas"]

MAX_REPLICAS = 64
MAX_NAME_LENGTH = 128
_NAME_CHARS = "letters, digits and . _ : / -"
_NAME_CHAR = re.compile(r"[A-Za-z0-9._:/-]")
# registry/name:tag or name@sha256:digest, as docker accepts them
_IMAGE = re.compile(r"^[a-z0-9][a-z0-9._/:@-]{0,254}$")


class DeploymentError(ValueError):
    """The deploy request is invalid; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def build_model_record(spec: dict[str, Any],
                       node_backends: list[dict[str, Any]] | None = None,
                       cache_dir: Path | None = None) -> dict[str, Any]:
    """Blocking. Validate a deploy request and return the model record to replicate.

    `node_backends`: each node record's `backends`, which the default engine depends on
    (registry.default_backend_for: vLLM where it runs, transformers on CPU-only nodes).
    `cache_dir`: this node's model cache; a hub model whose hub cannot be asked (offline,
    unreachable) is read from there if it is complete, and the record's `notes` say so."""
    explicit_name = spec.get("name")
    if explicit_name is not None:
        validate_name(explicit_name)
    replicas = validate_replicas(spec.get("replicas", 1))
    context_length = _optional_positive_int(spec.get("context_length"), "context_length")
    args = _args(spec.get("args", []))
    try:
        source = parse_source(str(spec.get("source") or ""))
    except SourceError as exc:
        raise DeploymentError(str(exc), "source") from None
    name = explicit_name if explicit_name is not None else default_name(source)
    if context_length is not None and source["kind"] == "local":
        _check_context(source["path"], context_length)
    facts, cached, notes = _facts(source, cache_dir)
    model_format = facts.format
    kind = _kind(spec.get("kind"), source, cached)
    backend, version = _backend(spec.get("backend"), model_format, kind, node_backends)
    estimate = _estimate(source, facts, context_length, backend.name,
                         basis="cache" if cached is not None else None)
    image = _image(spec.get("image"), backend)
    _refuse_reserved_flags(args, backend)
    try:
        scheduling = scheduling_fields(spec, replicas)
    except SpecError as exc:
        raise DeploymentError(str(exc), exc.param) from None
    return {
        "name": name,
        "source": source,
        "format": model_format,
        "kind": kind,
        "backend": backend.name,
        "backend_version": version,
        "image": image,
        "replicas": replicas,
        "context_length": context_length,
        "args": args,
        "estimate": estimate,
        "created": time.time(),
        "schedule_error": None,
        **({"notes": notes} if notes else {}),
        **scheduling,            # placement, min_replicas, idle_timeout_s
    }


def _facts(source: dict[str, Any], cache_dir: Path | None
           ) -> tuple[modelfiles.ModelFacts, Path | None, list[str]]:
    """What the model is, from its headers (local files, or byte ranges of a remote repo's),
    or, when a remote repo's headers cannot be read, from its files' sizes alone; with the
    cached copy it came from (if so) and notes for the user."""
    try:
        if source["kind"] == "local":
            return modelfiles.model_facts(source["path"]), None, []
        return remote_facts(source), None, []
    except modelfiles.ModelFileError as exc:
        raise DeploymentError(str(exc), "source") from None
    except SourceError as exc:
        cached = _cached_copy(source, cache_dir)
        if cached is None:
            raise DeploymentError(str(exc), "source") from None
        note = (f"read from this node's cache ({cached}): the hub could not be asked "
                f"({exc})")
    try:
        return modelfiles.model_facts(str(cached)), cached, [note]
    except modelfiles.ModelFileError as exc:
        raise DeploymentError(f"{note}, and the cached files are not a model: {exc}",
                              "source") from None


def _cached_copy(source: dict[str, Any], cache_dir: Path | None) -> Path | None:
    """The complete copy of a hub model in this node's cache, if there is one."""
    if cache_dir is None:
        return None
    cache = ModelCache(cache_dir)
    return cache.cached_entry(cache.folder(source), source)


def _estimate(source: dict[str, Any], facts: modelfiles.ModelFacts, context_length: int | None,
              engine: str, basis: str | None = None) -> dict[str, Any]:
    if facts.n_layer == 0:           # sizes only: the headers were not readable
        return modelfiles.estimate_from_size(facts.weights_bytes, facts.format, context_length,
                                             engine).to_dict()
    basis = basis or ("files" if source["kind"] == "local" else "headers")
    return modelfiles.estimate_for(facts, context_length, engine, basis).to_dict()


def _kind(requested: Any, source: dict[str, Any], cached: Path | None = None) -> str:
    if requested is not None:
        if requested not in modelfiles.KINDS:
            raise DeploymentError(f"kind must be one of {', '.join(modelfiles.KINDS)}, "
                                  f"got {requested!r}", "kind")
        return str(requested)
    if source["kind"] != "local" and cached is None:
        return "llm"        # not downloaded yet: `kind` says otherwise where it matters
    try:
        return modelfiles.detect_kind(str(cached) if cached is not None else source["path"])
    except modelfiles.ModelFileError as exc:
        raise DeploymentError(str(exc), "source") from None


def _backend(requested: Any, model_format: str, kind: str,
             node_backends: list[dict[str, Any]] | None = None):
    """The backend and the version the deployment pins (None: the node's default)."""
    if requested:
        try:
            name, version = parse_backend_spec(str(requested))
            backend = get_backend(name)
        except ValueError as exc:
            raise DeploymentError(str(exc), "backend") from None
        except UnknownBackend as exc:
            raise DeploymentError(exc.args[0], "backend") from None
        if model_format not in backend.model_formats and backend.model_formats:
            raise DeploymentError(
                f"backend {backend.name} cannot serve {model_format} models "
                f"(it serves {', '.join(sorted(backend.model_formats))})", "backend")
        if kind not in backend.kinds:
            raise DeploymentError(
                f"backend {backend.name} does not serve {kind} models (it serves "
                f"{', '.join(k for k in modelfiles.KINDS if k in backend.kinds)}); "
                "if the kind was detected wrongly, say it with --kind", "backend")
        return backend, version
    try:
        return default_backend_for(model_format, kind, node_backends), None
    except (KeyError, ValueError) as exc:
        raise DeploymentError(str(exc.args[0] if exc.args else exc), "backend") from None


def validate_name(value: Any) -> str:
    """The name clients send as `model`; the refusal names the rule that failed."""
    if not isinstance(value, str):
        raise DeploymentError(f"name must be a string, not {type(value).__name__}", "name")
    if not value:
        raise DeploymentError("name is empty: give one, or leave it out to use the file or "
                              "repo name", "name")
    if len(value) > MAX_NAME_LENGTH:
        raise DeploymentError(f"name is {len(value)} characters long; the most is "
                              f"{MAX_NAME_LENGTH}", "name")
    for position, char in enumerate(value, 1):
        if not char.isascii():
            raise DeploymentError(
                f"name {value!r} has {char!r} at position {position}: names are ASCII "
                f"({_NAME_CHARS}) so they read and type the same in every shell, URL and "
                f"metrics label, and no two look alike", "name")
        if not _NAME_CHAR.match(char):
            raise DeploymentError(f"name {value!r} has {char!r} at position {position}: only "
                                  f"{_NAME_CHARS} are allowed", "name")
    if not value[0].isalnum():
        raise DeploymentError(f"name {value!r} starts with {value[0]!r}: it must start with a "
                              f"letter or digit", "name")
    return value


def _image(requested: Any, backend) -> str | None:
    if requested is None or requested == "":
        if backend.container_only:
            raise DeploymentError(f"backend {backend.name} runs only in a container: "
                                  "give its image (--image)", "image")
        return None
    if not isinstance(requested, str) or not _IMAGE.match(requested):
        raise DeploymentError(f"image {requested!r} is not a container image reference "
                              "(e.g. registry/name:tag)", "image")
    return requested


def default_name(source: dict[str, Any]) -> str:
    """A name from the source: the file's stem (shard suffix dropped), the folder's name, or
    the repo's name; characters a name cannot hold become '-'."""
    if source["kind"] == "local":
        path = Path(source["path"])
        base = path.name if path.is_dir() else path.name.removesuffix(".gguf")
    elif source.get("file"):
        base = Path(source["file"]).name.removesuffix(".gguf")
    else:
        base = source["repo"].split("/")[-1]
    base = _SHARD_SUFFIX.sub("", base)
    cleaned = re.sub(r"[^A-Za-z0-9._:-]+", "-", base).lstrip("._:-")[:MAX_NAME_LENGTH]
    return cleaned.rstrip("-") or "model"


_SHARD_SUFFIX = re.compile(r"-\d{5}-of-\d{5}$")


def _check_context(path: str, requested: int) -> None:
    """Refuse (rather than cap) a context beyond the model's training: a silent cap would
    serve something other than what was asked, and beyond it the model's output degrades."""
    try:
        trained = modelfiles.trained_context_length(path)
    except modelfiles.ModelFileError:
        return                      # _measure reports what is wrong with the files
    if trained and requested > trained:
        raise DeploymentError(
            f"context_length {requested} is more than this model was trained for "
            f"({trained} tokens): give at most {trained}, or leave it out to use "
            f"{min(trained, modelfiles.DEFAULT_CONTEXT_LENGTH)}", "context_length")


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


def _refuse_reserved_flags(args: list[str], backend: Any) -> None:
    """Flags gpumesh sets itself cannot come from a deployment: an engine on another
    address, port or key would be out of the gateway's reach (or open to anyone)."""
    reserved = getattr(backend, "reserved_flags", frozenset())
    taken = sorted({arg.split("=", 1)[0] for arg in args} & reserved)
    if taken:
        raise DeploymentError(
            f"args may not set {', '.join(taken)}: gpumesh sets "
            f"{'it' if len(taken) == 1 else 'them'} for {backend.name} (where the engine "
            f"listens, what it loads and the key only the gateway knows)", "args")


def _args(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise DeploymentError("args must be a list of strings", "args")
    return value
