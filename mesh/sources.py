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
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["SourceError", "describe_source", "fetch_source", "parse_source", "remote_size_bytes"]

# owner/name with Hugging Face's allowed characters, optionally hf:// and a file after ':'.
_HF_REPO = re.compile(r"^(?:hf://|huggingface://)?([\w.-]+/[\w.-]+)(?::([\w./-]+))?$")


# "model-00001-of-00003.gguf": one shard of a split GGUF model.
_SHARD = re.compile(r"-\d{5}-of-(\d{5})\.gguf$")


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
    match = _HF_REPO.match(text)
    # A missing "dir/model.gguf" is a path typo, but "owner/name:model.gguf" names a repo file.
    if text.startswith(("/", ".", "~")) or (text.endswith(".gguf") and not (match and match[2])):
        raise SourceError(f"model path {text!r} does not exist")
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
    import huggingface_hub

    repo, wanted, revision = source["repo"], source.get("file"), source.get("revision", "main")
    with _hub_errors(repo, "downloading"):
        files = huggingface_hub.list_repo_files(repo, revision=revision)
        wanted = wanted or _pick_gguf(repo, files)
        if wanted is None:
            return Path(huggingface_hub.snapshot_download(
                repo, revision=revision, cache_dir=str(cache_dir),
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py"]))
        # A split GGUF is several shards in one folder; llama.cpp opens the first.
        paths = [huggingface_hub.hf_hub_download(repo, name, revision=revision,
                                                 cache_dir=str(cache_dir))
                 for name in _gguf_shards(wanted, files)]
        return Path(paths[0])


def _pick_gguf(repo: str, files: list[str]) -> str | None:
    """The repo's one GGUF model (first shard if split); None for a safetensors repo.

    Vision projectors (mmproj*.gguf) are not models; shards of one split model count once.
    """
    models = sorted({_SHARD.sub("-00001-of-\\1.gguf", f) for f in files
                     if f.endswith(".gguf") and not Path(f).name.lower().startswith("mmproj")})
    if not models:
        return None
    if len(models) == 1:
        return models[0]
    raise SourceError(f"{repo} has {len(models)} GGUF models; name one as {repo}:FILE "
                      f"(for example {repo}:{models[0]})")


def _gguf_shards(wanted: str, files: list[str]) -> list[str]:
    """`wanted` alone, or every shard of its split model in order."""
    if not _SHARD.search(wanted):
        return [wanted]
    prefix = _SHARD.sub("", wanted)
    return sorted(f for f in files if _SHARD.search(f) and _SHARD.sub("", f) == prefix)


@contextmanager
def _hub_errors(repo: str, doing: str) -> Iterator[None]:
    """Turn every failure of the hub client into a SourceError that says what failed.

    The client's error classes change between huggingface_hub versions (requests, httpx,
    httpx2 underneath), and none of them may reach the API as a 500: this boundary converts
    them all, keeping the type and message, and lets our own SourceError through.
    """
    try:
        yield
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - converted, never swallowed
        raise SourceError(f"{doing} {repo} from Hugging Face failed: "
                          f"{type(exc).__name__}: {exc}") from None


def remote_size_bytes(source: dict[str, Any]) -> int:
    """Blocking: the bytes a Hugging Face source will download (for the scheduler's estimate
    before any download). Raises SourceError when the hub cannot be asked."""
    import huggingface_hub

    with _hub_errors(source["repo"], "looking up"):
        info = huggingface_hub.HfApi().model_info(
            source["repo"], revision=source.get("revision", "main"), files_metadata=True)
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    wanted = source.get("file") or _pick_gguf(source["repo"], list(sizes))
    if wanted is None:
        return sum(size for name, size in sizes.items() if name.endswith(".safetensors"))
    if wanted not in sizes:
        raise SourceError(f"{source['repo']} has no file {wanted!r}")
    return sum(sizes[name] for name in _gguf_shards(wanted, list(sizes)))
