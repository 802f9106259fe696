"""Model sources: turn what a user typed (`PATH_OR_REPO`) into a source record, and a source
record into files on this node.

A source record is plain data stored with the model in the replicated state:

    {"kind": "local", "path": "/abs/path/model.gguf"}
    {"kind": "huggingface", "repo": "owner/name", "file": "model-Q4_K_M.gguf" | None,
     "revision": "main"}

Deploy time (`parse_source` + `inspect_source`) checks the source and measures it, so
mistakes are refused before anything is stored. Run time (`fetch_source`, on the node that
runs the instance) makes the files present; Hugging Face downloads go into the data dir's
cache through huggingface_hub, on a worker thread (blocking I/O off the event loop).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

__all__ = ["SourceError", "describe_source", "fetch_source", "parse_source", "remote_size_bytes"]

# owner/name with Hugging Face's allowed characters, optionally hf:// and a file after ':'.
_HF_REPO = re.compile(r"^(?:hf://|huggingface://)?([\w.-]+/[\w.-]+)(?::([\w./-]+))?$")


class SourceError(ValueError):
    """The source cannot be used; the message says why in words."""


def parse_source(text: str, *, revision: str = "main") -> dict[str, Any]:
    """Classify `text` as a local path or a Hugging Face repo id, and check what can be checked.

    A path that exists is local. Something that looks like a path (starts with /, ., ~) but
    does not exist is an error, not a repo id: a typo must not become a download attempt.
    """
    text = text.strip()
    if not text:
        raise SourceError("the model source is empty: give a path or a repo id (owner/name)")
    path = Path(text).expanduser()
    if path.exists():
        return {"kind": "local", "path": str(path.resolve())}
    if text.startswith(("/", ".", "~")) or text.endswith(".gguf"):
        raise SourceError(f"model path {text!r} does not exist")
    match = _HF_REPO.match(text)
    if match is None:
        raise SourceError(f"{text!r} is neither an existing path nor a Hugging Face repo id "
                          "(owner/name, optionally owner/name:file.gguf)")
    return {"kind": "huggingface", "repo": match.group(1), "file": match.group(2),
            "revision": revision}


def describe_source(source: dict[str, Any]) -> str:
    if source["kind"] == "local":
        return source["path"]
    suffix = f":{source['file']}" if source.get("file") else ""
    return f"hf://{source['repo']}{suffix}"


def fetch_source(source: dict[str, Any], cache_dir: Path) -> Path:
    """Blocking: make the model's files present on this node and return the path to load.

    Call through `asyncio.to_thread`. Raises SourceError with a reason a user can act on.
    """
    if source["kind"] == "local":
        path = Path(source["path"])
        if not path.exists():
            raise SourceError(f"model path {path} does not exist on this node")
        return path
    if source["kind"] == "huggingface":
        return _fetch_huggingface(source, cache_dir)
    raise SourceError(f"unknown model source kind {source['kind']!r}")


def _fetch_huggingface(source: dict[str, Any], cache_dir: Path) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise SourceError(f"huggingface_hub is not installed: {exc}") from None
    repo, wanted, revision = source["repo"], source.get("file"), source.get("revision", "main")
    try:
        if wanted is None:
            files = huggingface_hub.list_repo_files(repo, revision=revision)
            wanted = _pick_gguf(repo, files)
        if wanted is not None:
            return Path(huggingface_hub.hf_hub_download(
                repo, wanted, revision=revision, cache_dir=str(cache_dir)))
        return Path(huggingface_hub.snapshot_download(
            repo, revision=revision, cache_dir=str(cache_dir),
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py"]))
    except HfHubHTTPError as exc:
        raise SourceError(f"Hugging Face refused {repo}: {exc}") from None
    except OSError as exc:  # no network, DNS, disk full ...
        raise SourceError(f"could not download {repo} from Hugging Face: {exc}") from None


def _pick_gguf(repo: str, files: list[str]) -> str | None:
    """The repo's GGUF file if there is exactly one; None for a safetensors repo."""
    ggufs = [f for f in files if f.endswith(".gguf")]
    if not ggufs:
        return None
    if len(ggufs) == 1:
        return ggufs[0]
    raise SourceError(f"{repo} has {len(ggufs)} GGUF files; name one as {repo}:FILE "
                      f"(for example {repo}:{ggufs[0]})")


def remote_size_bytes(source: dict[str, Any]) -> int:
    """Blocking: the bytes a Hugging Face source will download (for the scheduler's estimate
    before any download). Raises SourceError when the hub cannot be asked."""
    try:
        import huggingface_hub
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise SourceError(f"huggingface_hub is not installed: {exc}") from None
    try:
        info = huggingface_hub.HfApi().model_info(
            source["repo"], revision=source.get("revision", "main"), files_metadata=True)
    except HfHubHTTPError as exc:
        raise SourceError(f"Hugging Face refused {source['repo']}: {exc}") from None
    except OSError as exc:
        raise SourceError(f"could not reach Hugging Face for {source['repo']}: {exc}") from None
    siblings = info.siblings or []
    names = [s.rfilename for s in siblings]
    wanted = source.get("file") or _pick_gguf(source["repo"], names)
    if wanted is not None:
        sizes = [s.size or 0 for s in siblings if s.rfilename == wanted]
        if not sizes:
            raise SourceError(f"{source['repo']} has no file {wanted!r}")
        return sizes[0]
    return sum(s.size or 0 for s in siblings if s.rfilename.endswith(".safetensors"))
