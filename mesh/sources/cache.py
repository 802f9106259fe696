"""The node's model cache: one folder per hub repo and revision, shared by every instance.

    <data dir>/models/huggingface/owner--name/main/
        model-Q4_K_M.gguf                   complete files (verified, then renamed into place)
        model-Q8_0.gguf.part                a download in progress (resumed from its size)
        .gpumesh-snapshot.json              what is complete: files, sizes, checksums, and
                                            per source (file/pattern) the files it needs
        .lock                               held while one instance fills the folder

Two instances of one model on a node download it once: the second waits on the lock, then
finds the files complete. `entries()` and `remove()` serve `gpumesh models cache ls|rm`.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .select import Selection
from .spec import SourceError, describe_source, source_key

__all__ = ["MANIFEST", "ModelCache"]

MANIFEST = ".gpumesh-snapshot.json"
_LOCK = ".lock"


class ModelCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def folder(self, source: dict[str, Any]) -> Path:
        return self.root / source_key(source)

    @contextmanager
    def locked(self, folder: Path) -> Iterator[None]:
        """Blocking: hold the folder's lock (threads and processes alike: flock)."""
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / _LOCK, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # --- the manifest --------------------------------------------------------------------

    def read_manifest(self, folder: Path) -> dict[str, Any]:
        try:
            data = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            return {"files": {}, "sources": {}}
        return data if isinstance(data, dict) else {"files": {}, "sources": {}}

    def cached_entry(self, folder: Path, source: dict[str, Any]) -> Path | None:
        """The path to load if `source` is complete here (no network needed), else None."""
        manifest = self.read_manifest(folder)
        known = manifest.get("sources", {}).get(describe_source(source))
        if not known:
            return None
        for name in known["files"]:
            info = manifest["files"].get(name)
            path = folder / name
            if info is None or not path.is_file() or path.stat().st_size != info["size"]:
                return None
        return folder / known["entry"] if known.get("entry") else folder

    def record(self, folder: Path, source: dict[str, Any], selection: Selection) -> None:
        manifest = self.read_manifest(folder)
        for f in selection.files:
            manifest.setdefault("files", {})[f.path] = {"size": f.size, "sha256": f.sha256}
        manifest.setdefault("sources", {})[describe_source(source)] = {
            "entry": selection.entry, "files": [f.path for f in selection.files],
            "format": selection.format}
        manifest.update(hub=source["kind"], repo=source["repo"], revision=source["revision"],
                        completed_at=time.time())
        tmp = folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, folder / MANIFEST)

    # --- listing and removing -------------------------------------------------------------

    def entries(self) -> list[dict[str, Any]]:
        """Every repo folder: complete files, partial downloads, bytes on disk."""
        out = []
        for folder in sorted(self.root.glob("*/*/*")):
            if not folder.is_dir():
                continue
            manifest = self.read_manifest(folder)
            files = [p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, _LOCK)]
            partial = [p for p in files if p.name.endswith(".part")]
            hub, owner_name, revision = folder.relative_to(self.root).parts
            out.append({
                "key": str(folder.relative_to(self.root)), "hub": hub,
                "repo": manifest.get("repo") or owner_name.replace("--", "/", 1),
                "revision": manifest.get("revision") or revision,
                "sources": sorted(manifest.get("sources", {})),
                "files": len(files) - len(partial), "partial_files": len(partial),
                "bytes": sum(p.stat().st_size for p in files),
                "complete": bool(manifest.get("sources")) and not partial,
                "last_used": max((p.stat().st_mtime for p in files), default=None)})
        return out

    def remove(self, key: str) -> dict[str, Any]:
        """Delete one folder (`hub/owner--name/revision`); refuses anything outside the root."""
        folder = (self.root / key).resolve()
        root = self.root.resolve()
        if folder.parent.parent.parent != root or not folder.is_dir():
            raise SourceError(f"no cache entry {key!r} on this node (`gpumesh models cache ls` "
                              f"lists them)")
        entry = next((e for e in self.entries() if e["key"] == key), None)
        with self.locked(folder):        # not while a download fills it
            shutil.rmtree(folder)
        for parent in (folder.parent, folder.parent.parent):   # empty owner/hub folders too
            try:
                parent.rmdir()
            except OSError:
                break
        return {"removed": key, "bytes": entry["bytes"] if entry else 0}
