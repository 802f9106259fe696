"""llama.cpp: serves GGUF models on NVIDIA and AMD GPUs and on the CPU.

Two engines speak the same flags and the same HTTP API:

- a `llama-server` binary, named by `GPUMESH_LLAMA_SERVER` or found on PATH (the build
  the operator chose: CUDA, HIP, Vulkan …);
- otherwise the `xllamacpp` wheel, a gpumesh dependency, through
  `python -m gpumesh.backends.llama_cpp_runner`, so every node can serve GGUF out of the box.
  Other xllamacpp versions live in their own virtual envs (`versions.py`); the runner is
  then started as a file by that env's interpreter (`python -I .../llama_cpp_runner.py`),
  which needs nothing of gpumesh installed there.

One argv builder serves both: the runner accepts llama-server's flags. By model kind:
embedding models get `--embeddings`, rerankers `--reranking`, VLMs their projector
(`--mmproj`). Spreading one model over nodes uses llama.cpp's RPC: `rpc_server_launch`
starts an `rpc-server` (`ggml-rpc-server` in newer releases) on each worker node, and the
head names them with `--rpc`, with the scheduler's layer split as `--tensor-split` (and,
when the head runs on the CPU, `-ngl` leaving its share of the layers on it). Both need a
build with GGML_RPC (bench/build_llama_rpc.sh); the xllamacpp wheel has no RPC client.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from gpumesh.backends.base import (Backend, BackendUnavailable, InstallRecipe, LaunchRequest,
                                   LaunchSpec, distribution_version, python_of,
                                   visible_devices_env)
from gpumesh.modelfiles import context_length_for, read_gguf_metadata, resolve_model_file

__all__ = ["LlamaCppBackend", "LLAMA_SERVER_ENV", "RPC_SERVER_ENV", "RUNNER_MODULE"]

LLAMA_SERVER_ENV = "GPUMESH_LLAMA_SERVER"
RPC_SERVER_ENV = "GPUMESH_LLAMA_RPC_SERVER"
RUNNER_MODULE = "gpumesh.backends.llama_cpp_runner"
# Run as a file by other versions' interpreters: the runner needs nothing of gpumesh.
RUNNER_FILE = Path(__file__).resolve().with_name("llama_cpp_runner.py")
_ALL_LAYERS = "999"          # llama.cpp clamps to the model's layer count: offload everything
_VERSION_TIMEOUT_S = 10
# `--list-devices` prints "  CUDA0: NVIDIA H200 (143771 MiB, 143156 MiB free)" per device;
# the name's prefix is the ggml backend, which says whose GPUs the build drives.
_DEVICE_LINE = re.compile(r"^\s+([A-Za-z]+)\d*:\s", re.MULTILINE)
_GGML_BACKEND_VENDOR = {"CUDA": "nvidia", "ROCm": "amd", "HIP": "amd"}
_LIST_DEVICES_TIMEOUT_S = 60   # the first CUDA initialisation can take tens of seconds
_RPC_SERVER_NAMES = ("rpc-server", "ggml-rpc-server")   # renamed in 2026


class LlamaCppBackend(Backend):
    name = "llama.cpp"
    model_formats = frozenset({"gguf"})
    kinds = frozenset({"llm", "vlm", "embedding", "rerank"})
    gpu_vendors = frozenset({"nvidia", "amd"})
    runs_on_cpu = True
    health_path = "/health"
    reserved_flags = frozenset({
        "-m", "--model", "-mu", "--model-url", "-hf", "-hfr", "--hf-repo", "-hff", "--hf-file",
        "--host", "--port", "-a", "--alias", "--api-key", "--api-key-file", "--api-prefix",
        "--path", "--ssl-key-file", "--ssl-cert-file"})
    # llama.cpp closes a connection a few ms after each streamed answer, although it
    # announced keep-alive (measured: 4-9 % of pooled streams failed before the gateway
    # asked these streams for `Connection: close`).
    keeps_stream_connections = False
    # The llama.cpp in xllamacpp answers an image URL with a 500 ("cannot make GET request").
    fetches_image_urls = False

    def version(self) -> str:
        binary = self.server_binary()
        return _binary_version(binary) if binary is not None else _xllamacpp_version()

    def server_binary(self) -> str | None:
        """The llama-server to run, or None to use the xllamacpp runner.

        A binary named in GPUMESH_LLAMA_SERVER must exist: silently falling back to
        another engine would hide a configuration mistake.
        """
        configured = os.environ.get(LLAMA_SERVER_ENV)
        if configured:
            found = shutil.which(configured)
            if found is None:
                raise BackendUnavailable(
                    f"{LLAMA_SERVER_ENV}={configured} is not an executable llama-server;"
                    " fix the path, or unset it to use the xllamacpp engine"
                )
            return found
        return shutil.which("llama-server")

    def launch(self, request: LaunchRequest) -> LaunchSpec:
        model_file = resolve_model_file(request.model_path)
        prefix = self._engine(request)
        if request.rpc_servers and _is_runner(prefix):
            raise BackendUnavailable("spreading a model over nodes (llama.cpp RPC) needs a "
                                     f"llama-server binary built with GGML_RPC ({LLAMA_SERVER_ENV});"
                                     " the xllamacpp wheel has no RPC client")
        env = visible_devices_env(request, self.gpu_vendors, "llama.cpp")
        if request.api_key:
            env["LLAMA_API_KEY"] = request.api_key   # llama-server and the runner read it
        if request.rpc_servers:
            # llama.cpp aborts when an rpc-server goes away (it cannot reconnect); without
            # this it first attaches gdb for a backtrace, which slows the restart for nothing.
            env["GGML_NO_BACKTRACE"] = "1"
        mounts = tuple(p for p in (str(model_file), request.mmproj_path) if p) if request.image else ()
        return LaunchSpec(argv=tuple(prefix + _server_args(request, model_file)), env=env,
                          image=request.image, mounts=mounts)

    def _engine(self, request: LaunchRequest) -> list[str]:
        """The command before the flags: an image's llama-server, a version's runner, the
        operator's binary, or the built-in runner."""
        if request.image:
            return ["llama-server"]
        if request.engine_home:
            return [python_of(request.engine_home), "-I", str(RUNNER_FILE)]
        binary = self.server_binary()
        if binary is not None:
            return [binary]
        _xllamacpp_version()   # raises BackendUnavailable when it is missing too
        return [sys.executable, "-m", RUNNER_MODULE]

    def rpc_server_binary(self) -> str | None:
        """llama.cpp's RPC server: GPUMESH_LLAMA_RPC_SERVER (must exist), else one beside
        the configured llama-server (one build makes both), else on PATH."""
        configured = os.environ.get(RPC_SERVER_ENV)
        if configured:
            found = shutil.which(configured)
            if found is None:
                raise BackendUnavailable(f"{RPC_SERVER_ENV}={configured} is not an executable "
                                         "rpc-server; fix the path, or unset it")
            return found
        server = os.environ.get(LLAMA_SERVER_ENV)
        beside = [str(Path(server).parent / name) for name in _RPC_SERVER_NAMES] if server else []
        for candidate in beside + list(_RPC_SERVER_NAMES):
            found = shutil.which(candidate)
            if found is not None:
                return found
        return None

    def rpc_server_launch(self, host: str, port: int, gpu_vendor: str | None = None,
                          gpu_indices: tuple[int, ...] = ()) -> LaunchSpec:
        """An `rpc-server` that lends this node's devices to a llama-server elsewhere.

        It has no authentication of its own: anyone who reaches its port can run tensors on
        this node and read what it holds. `host` must be the cluster's interface, never a
        wildcard (refused here).
        """
        if host in ("0.0.0.0", "::", ""):
            raise ValueError("an rpc-server has no authentication: bind it to the cluster's "
                             "address, not all interfaces")
        binary = self.rpc_server_binary()
        if binary is None:
            raise BackendUnavailable(f"llama.cpp RPC needs an rpc-server binary (on PATH or in "
                                     f"{RPC_SERVER_ENV}), built with GGML_RPC=ON")
        probe = LaunchRequest(model_path="", served_name="", port=port, host=host,
                              gpu_vendor=gpu_vendor, gpu_indices=gpu_indices)
        # rpc-server computes on one CPU thread unless told (llama-server takes them all).
        return LaunchSpec(argv=(binary, "--host", host, "--port", str(port),
                                "--threads", str(_usable_cpus())),
                          env=visible_devices_env(probe, self.gpu_vendors, "llama.cpp"))

    def rpc_roles(self) -> dict[str, bool]:
        """What this node can do for a model spread over nodes, for the node record: `client`
        (a llama-server built with RPC: it can be the head) and `server` (an rpc-server: it
        can lend its devices). Blocking (runs the binary once)."""
        try:
            binary = self.server_binary()
            rpc_server = self.rpc_server_binary()
        except BackendUnavailable:
            return {"client": False, "server": False}
        return {"client": binary is not None and _supports_rpc(binary),
                "server": rpc_server is not None}

    def install_packages(self, version: str | None, gpu_vendors: frozenset[str]) -> InstallRecipe:
        return InstallRecipe(packages=(f"xllamacpp=={version}" if version else "xllamacpp",),
                             distribution="xllamacpp")

    def installable_traits(self, gpu_vendors: frozenset[str]) -> tuple[bool, frozenset[str]]:
        return True, frozenset()     # PyPI's xllamacpp wheels are CPU builds

    def installed_version(self, engine_home: Path) -> str:
        return distribution_version(engine_home, ("xllamacpp",))

    def usable_gpu_vendors(self) -> frozenset[str]:
        """Ask the engine which devices its build sees (`--list-devices`): the PyPI xllamacpp
        wheel is CPU-only, and placing a model "on a GPU" it cannot use would be a lie."""
        binary = self.server_binary()
        argv = [binary] if binary else [sys.executable, "-m", RUNNER_MODULE]
        try:
            done = subprocess.run(argv + ["--list-devices"], capture_output=True, text=True,
                                  timeout=_LIST_DEVICES_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendUnavailable(f"{argv[-1]} --list-devices failed: {exc}") from exc
        if done.returncode != 0:     # e.g. xllamacpp's libgomp.so.1 missing on a minimal OS
            last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
            raise BackendUnavailable(f"the engine cannot start here: {last}")
        backends = _DEVICE_LINE.findall(done.stdout + done.stderr)
        return frozenset(_GGML_BACKEND_VENDOR[b] for b in backends
                         if b in _GGML_BACKEND_VENDOR) & self.gpu_vendors

    def describe(self) -> dict[str, object]:
        summary = super().describe()
        try:
            summary["engine"] = self.server_binary() or f"{RUNNER_MODULE} (xllamacpp)"
        except BackendUnavailable:
            summary["engine"] = None
        summary["rpc"] = self.rpc_roles() if summary.get("available") else \
            {"client": False, "server": False}
        return summary



def _is_runner(prefix: list[str]) -> bool:
    return RUNNER_MODULE in prefix or str(RUNNER_FILE) in prefix


def _server_args(request: LaunchRequest, model_file: Path) -> list[str]:
    """llama-server flags for `request` (the runner takes the same ones)."""
    args = [
        "-m", str(model_file),
        "--host", request.host,
        "--port", str(request.port),
        "--alias", request.served_name,
        "-c", str(_context_length(request, model_file)),
        "-ngl", _ALL_LAYERS if request.gpu_vendor or request.rpc_servers else "0",
    ]
    if request.kind == "embedding":
        args.append("--embeddings")
    elif request.kind == "rerank":
        args.append("--reranking")
    if request.mmproj_path:
        args += ["--mmproj", request.mmproj_path]
    if request.rpc_servers:
        args = _rpc_split(args + ["--rpc", ",".join(request.rpc_servers)], request, model_file)
    return args + list(request.extra_args)   # last, so a deployment's own flags win


def _rpc_split(args: list[str], request: LaunchRequest, model_file: Path) -> list[str]:
    """The scheduler's layer split as llama.cpp's flags.

    llama.cpp puts the remote devices first, then local GPUs, and splits the offloaded
    layers between them by `--tensor-split`. The CPU is not one of those devices: layers it
    keeps are the first `n_layer + 1 - ngl` (the output layer counts as one more, always
    offloaded), so a head on the CPU keeps its share by offloading fewer layers.
    """
    shares = list(request.rpc_layer_split)
    if not shares:
        return args
    if request.gpu_vendor is None:
        layers = _layer_count(model_file)
        head_share, shares = shares[-1], shares[:-1]
        kept = min(layers, round(layers * head_share / max(1, head_share + sum(shares))))
        args[args.index("-ngl") + 1] = str(layers + 1 - kept)
    total = sum(shares) or 1
    return args + ["--tensor-split", ",".join(f"{share / total:.4f}" for share in shares)]


def _layer_count(model_file: Path) -> int:
    meta = read_gguf_metadata(model_file)
    count = meta.get(f"{meta.get('general.architecture')}.block_count")
    if not isinstance(count, int) or count <= 0:
        raise ValueError(f"{model_file.name} has no layer count ({meta.get('general.architecture')}"
                         ".block_count): cannot split it over nodes")
    return count


_NO_RPC_SERVER = "127.0.0.1:1"     # nothing listens on port 1


def _usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _supports_rpc(binary: str) -> bool:
    """Whether a llama-server binary has llama.cpp's RPC client (GGML_RPC=ON): such a build
    tries to reach the server named by `--rpc` and aborts with "Failed to connect to
    127.0.0.1:1"; other builds say "RPC not supported" (or do not know the flag)."""
    try:
        done = subprocess.run([binary, "--rpc", _NO_RPC_SERVER, "--list-devices"],
                              capture_output=True, text=True, timeout=_VERSION_TIMEOUT_S,
                              check=False, env={**os.environ, "GGML_NO_BACKTRACE": "1"})
    except (OSError, subprocess.TimeoutExpired):
        return False
    output = done.stdout + done.stderr
    return _NO_RPC_SERVER in output and "not supported" not in output


def _context_length(request: LaunchRequest, model_file: Path) -> int:
    # The same rule as the scheduler's memory estimate (modelfiles.estimate_memory), so
    # an instance never reserves a bigger KV cache than it was placed with.
    if request.context_length is not None:
        return context_length_for(None, request.context_length)
    meta = read_gguf_metadata(model_file)
    model_context = meta.get(f"{meta.get('general.architecture')}.context_length")
    return context_length_for(model_context if isinstance(model_context, int) else None, None)


def _xllamacpp_version() -> str:
    try:
        return importlib.metadata.version("xllamacpp")
    except importlib.metadata.PackageNotFoundError:
        raise BackendUnavailable(
            "llama.cpp is not installed: install the xllamacpp package (pip install xllamacpp),"
            f" or put a llama-server binary on PATH or in {LLAMA_SERVER_ENV}"
        ) from None


def _binary_version(binary: str) -> str:
    """`llama-server --version` prints e.g. "version: 6496 (2a1a5c33)" (on stderr)."""
    try:
        done = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=_VERSION_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendUnavailable(f"{binary} --version failed: {exc}") from exc
    output = done.stdout + done.stderr
    match = re.search(r"^version:\s*(.+)$", output, re.MULTILINE)
    if done.returncode != 0 or match is None:
        raise BackendUnavailable(
            f"{binary} does not look like llama-server: `--version` exited {done.returncode}"
            f" and printed {output.strip()[:200]!r}"
        )
    return match.group(1).strip()
