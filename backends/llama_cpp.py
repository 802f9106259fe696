"""llama.cpp: serves GGUF models on NVIDIA and AMD GPUs and on the CPU.

Two engines speak the same flags and the same HTTP API:

- a `llama-server` binary, named by `GPUMESH_LLAMA_SERVER` or found on PATH (the build
  the operator chose: CUDA, HIP, Vulkan …);
- otherwise the `xllamacpp` wheel, a gpumesh dependency, through
  `python -m gpumesh.backends.llama_cpp_runner`, so every node can serve GGUF out of the box.

One argv builder serves both: the runner accepts llama-server's flags.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from gpumesh.backends.base import Backend, BackendUnavailable, LaunchRequest, LaunchSpec
from gpumesh.modelfiles import context_length_for, read_gguf_metadata, resolve_model_file

__all__ = ["LlamaCppBackend", "LLAMA_SERVER_ENV", "RUNNER_MODULE"]

LLAMA_SERVER_ENV = "GPUMESH_LLAMA_SERVER"
RUNNER_MODULE = "gpumesh.backends.llama_cpp_runner"
_ALL_LAYERS = "999"          # llama.cpp clamps to the model's layer count: offload everything
_VERSION_TIMEOUT_S = 10
_VISIBLE_DEVICES = {"nvidia": "CUDA_VISIBLE_DEVICES", "amd": "HIP_VISIBLE_DEVICES"}
# `--list-devices` prints "  CUDA0: NVIDIA H200 (143771 MiB, 143156 MiB free)" per device;
# the name's prefix is the ggml backend, which says whose GPUs the build drives.
_DEVICE_LINE = re.compile(r"^\s+([A-Za-z]+)\d*:\s", re.MULTILINE)
_GGML_BACKEND_VENDOR = {"CUDA": "nvidia", "ROCm": "amd", "HIP": "amd"}
_LIST_DEVICES_TIMEOUT_S = 60   # the first CUDA initialisation can take tens of seconds


class LlamaCppBackend(Backend):
    name = "llama.cpp"
    model_formats = frozenset({"gguf"})
    gpu_vendors = frozenset({"nvidia", "amd"})
    runs_on_cpu = True
    health_path = "/health"

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
        binary = self.server_binary()
        if binary is None:
            _xllamacpp_version()   # raises BackendUnavailable when it is missing too
            prefix = [sys.executable, "-m", RUNNER_MODULE]
        else:
            prefix = [binary]
        model_file = resolve_model_file(request.model_path)
        return LaunchSpec(argv=tuple(prefix + _server_args(request, model_file)), env=self._gpu_env(request))

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
        backends = _DEVICE_LINE.findall(done.stdout + done.stderr)
        return frozenset(_GGML_BACKEND_VENDOR[b] for b in backends
                         if b in _GGML_BACKEND_VENDOR) & self.gpu_vendors

    def describe(self) -> dict[str, object]:
        summary = super().describe()
        try:
            summary["engine"] = self.server_binary() or f"{RUNNER_MODULE} (xllamacpp)"
        except BackendUnavailable:
            summary["engine"] = None
        return summary

    def _gpu_env(self, request: LaunchRequest) -> dict[str, str]:
        if request.gpu_vendor is None:
            # A CPU instance must not touch a GPU that the scheduler gave to another
            # instance: GPU builds of llama.cpp use a visible GPU for large batches
            # even with -ngl 0. "-1" hides every device for both runtimes (HIP has
            # treated an empty value as "all devices" in some releases).
            return {"CUDA_VISIBLE_DEVICES": "-1", "HIP_VISIBLE_DEVICES": "-1"}
        if request.gpu_vendor not in self.gpu_vendors:
            raise BackendUnavailable(
                f"llama.cpp in gpumesh runs on {', '.join(sorted(self.gpu_vendors))} GPUs or the CPU,"
                f" not on {request.gpu_vendor}"
            )
        if not request.gpu_indices:
            raise ValueError(f"a {request.gpu_vendor} launch needs gpu_indices (which GPUs this instance may use)")
        devices = ",".join(str(i) for i in request.gpu_indices)
        env = {_VISIBLE_DEVICES[request.gpu_vendor]: devices}
        if request.gpu_vendor == "nvidia":
            # gpumesh numbers GPUs as NVML does (PCI bus order); CUDA's default order is
            # "fastest first", which would put the instance on other GPUs.
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        return env


def _server_args(request: LaunchRequest, model_file: Path) -> list[str]:
    """llama-server flags for `request` (the runner takes the same ones)."""
    args = [
        "-m", str(model_file),
        "--host", request.host,
        "--port", str(request.port),
        "--alias", request.served_name,
        "-c", str(_context_length(request, model_file)),
        "-ngl", _ALL_LAYERS if request.gpu_vendor else "0",
    ]
    return args + list(request.extra_args)   # last, so a deployment's own flags win


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
