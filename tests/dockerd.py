"""A private dockerd for container tests, and an engine image made from this machine's files.

No registry is reachable here, so the image is imported from a root filesystem the test
assembles: this Python interpreter, its standard library, the shared libraries a running
llama.cpp runner has mapped, the xllamacpp package and the runner file, each at the path it
has on the host. The result is a real engine image (~150 MB) that serves GGUF models.

The daemon gets its own socket, data root and exec root under a unique temporary directory
(other tests on this machine may run their own), no bridge and no iptables changes: engines
use the host network, as gpumesh starts them.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from harness import free_port

RUNNER_FILE = Path(__file__).resolve().parent.parent / "backends" / "llama_cpp_runner.py"


class PrivateDockerd:
    def __init__(self) -> None:
        # Short: the exec root holds unix sockets (108-byte path limit).
        self.root = Path(tempfile.mkdtemp(prefix="gmdk-", dir="/tmp"))
        self.socket = self.root / "docker.sock"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 30.0) -> str | None:
        """Start it; None when it serves, else why not (the caller skips with that)."""
        binary = shutil.which("dockerd")
        if binary is None:
            return "dockerd is not installed (apt-get install docker.io)"
        if os.geteuid() != 0:
            return "dockerd needs root"
        log = open(self.root / "dockerd.log", "wb")
        self.process = subprocess.Popen(
            [binary, "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "x"),
             "-H", self.host, "--pidfile", str(self.root / "dockerd.pid"), "--bridge=none",
             "--iptables=false", "--ip-masq=false", "--ip-forward=false"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return f"dockerd exited with {self.process.returncode}: {self.log_tail()}"
            if self.socket.exists() and self._pings():
                return None
            time.sleep(0.1)
        return f"dockerd did not answer within {timeout:.0f} s: {self.log_tail()}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # dockerd leaves its network namespace file (and, if killed, overlay mounts) mounted.
        for mounted in ("x/netns/default", "x", "data"):
            subprocess.run(["umount", "-R", str(self.root / mounted)], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def client(self):  # -> docker.DockerClient
        import docker
        return docker.DockerClient(base_url=self.host, version="auto")

    def log_tail(self) -> str:
        try:
            return (self.root / "dockerd.log").read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    def _pings(self) -> bool:
        try:
            return bool(self.client().ping())
        except Exception:  # noqa: BLE001 - not up yet
            return False


def build_llama_cpp_image(client, tag: str, gguf: Path) -> str:  # type: ignore[no-untyped-def]
    """Import an image that can run `python RUNNER_FILE -m MODEL ...`; returns the python path
    inside it (the same as on the host)."""
    python = os.path.realpath(sys.executable)
    files = _runner_files(python, gguf)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        seen: set[str] = set()
        for path in sorted(files):
            _add(tar, path, seen)
        _add(tar, "/lib64/ld-linux-x86-64.so.2", seen)
        tmp = tarfile.TarInfo("tmp")
        tmp.type, tmp.mode = tarfile.DIRTYPE, 0o1777
        tar.addfile(tmp)
    buffer.seek(0)
    site = _site_of_xllamacpp()
    client.api.import_image_from_data(buffer.getvalue(), repository=tag.split(":")[0],
                                      tag=tag.split(":")[1],
                                      changes=[f"ENV PYTHONPATH={site}", "ENV PYTHONDONTWRITEBYTECODE=1"])
    return python


def _site_of_xllamacpp() -> str:
    import xllamacpp
    return str(Path(xllamacpp.__file__).parent.parent)


def _runner_files(python: str, gguf: Path) -> set[str]:
    """What a serving runner needs: its mapped files (interpreter, libraries, extension
    modules), the standard library's sources, xllamacpp and the runner itself."""
    port = free_port()
    runner = subprocess.Popen([python, str(RUNNER_FILE), "-m", str(gguf), "--port", str(port),
                               "-c", "256", "-ngl", "0", "-lv", "1"],
                              env={**os.environ, "PYTHONPATH": _site_of_xllamacpp()},
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert runner.stdout is not None
        runner.stdout.readline()                         # "... listening on ..." once serving
        mapped = {line.split(None, 5)[5].strip()
                  for line in Path(f"/proc/{runner.pid}/maps").read_text().splitlines()
                  if len(line.split(None, 5)) == 6 and line.split(None, 5)[5].startswith("/")}
    finally:
        runner.kill()
        runner.wait()
    stdlib = Path(os.__file__).parent
    skip = {"site-packages", "test", "idlelib", "tkinter", "lib2to3", "ensurepip", "turtledemo",
            "__pycache__"}
    sources = {str(p) for p in stdlib.rglob("*")
               if p.is_file() and not skip & set(p.relative_to(stdlib).parts)}
    package = Path(_site_of_xllamacpp()) / "xllamacpp"
    libraries = {p for p in mapped if os.path.exists(p) and not p.startswith(str(gguf))}
    return (libraries | _soname_links(libraries) | sources
            | {str(p) for p in package.rglob("*") if p.is_file()}
            | {python, str(RUNNER_FILE), "/etc/ld.so.cache"})


def _soname_links(libraries: set[str]) -> set[str]:
    """The names the loader looks for (libffi.so.8) are symlinks beside the mapped files
    (libffi.so.8.1.2); ld.so.cache may name them under /lib as well as /usr/lib."""
    links = set()
    for library in libraries:
        directory = Path(library).parent
        for sibling in directory.glob(Path(library).name.split(".so")[0] + ".so*"):
            if sibling.is_symlink() and os.path.realpath(sibling) == os.path.realpath(library):
                links.add(str(sibling))
                if str(directory).startswith("/usr/lib/"):
                    links.add(str(sibling).removeprefix("/usr"))
    return links


def _add(tar: tarfile.TarFile, path: str, seen: set[str]) -> None:
    """Add `path` at the same place, with every symlink on the way (and its target)."""
    parts = Path(path).parts
    for i in range(1, len(parts)):
        prefix = os.path.join(*parts[:i + 1])
        if os.path.islink(prefix):
            if prefix not in seen:
                seen.add(prefix)
                tar.addfile(tar.gettarinfo(prefix, arcname=prefix.lstrip("/")))
            target = os.path.normpath(os.path.join(os.path.dirname(prefix), os.readlink(prefix)))
            rest = parts[i + 1:]
            _add(tar, os.path.join(target, *rest) if rest else target, seen)
            return
    if path not in seen and os.path.exists(path):
        seen.add(path)
        tar.add(path, arcname=path.lstrip("/"), recursive=False)
