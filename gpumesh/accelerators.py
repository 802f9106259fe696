"""The accelerator vendors gpumesh knows, and how an engine is told which devices it may use.

Shared by the probes (`gpumesh.mesh.probes`, which name a device's vendor) and the backends
(`gpumesh.backends`, which start engines on the devices the scheduler chose); it imports
neither. A device index is always the vendor tool's own index on the node (NVML's, AMD SMI's,
`npu-smi`'s logic id, `cnmon`'s card number ...), which is what each runtime's visibility
variable below takes.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["VENDORS", "VISIBLE_DEVICES_ENV", "visible_devices_env"]

# vendor -> the variable its runtime reads to decide which devices a process sees.
VISIBLE_DEVICES_ENV: dict[str, str] = {
    "nvidia": "CUDA_VISIBLE_DEVICES",
    "amd": "HIP_VISIBLE_DEVICES",          # one variable only: ROCR_ would renumber HIP's view
    "hygon": "HIP_VISIBLE_DEVICES",        # DTK is HIP
    "ascend": "ASCEND_RT_VISIBLE_DEVICES",  # CANN runtime; takes npu-smi's logic ids
    "cambricon": "MLU_VISIBLE_DEVICES",    # CNToolkit / torch_mlu
    "mthreads": "MUSA_VISIBLE_DEVICES",    # MUSA runtime / torch_musa
    "iluvatar": "CUDA_VISIBLE_DEVICES",    # CoreX speaks the CUDA runtime API
    "metax": "CUDA_VISIBLE_DEVICES",       # MACA honours the CUDA variable (as GPUStack sets it)
}

VENDORS: tuple[str, ...] = tuple(VISIBLE_DEVICES_ENV)


def visible_devices_env(vendor: str, indices: Iterable[int]) -> dict[str, str]:
    """The environment that shows an engine exactly `indices` of `vendor`'s devices."""
    try:
        variable = VISIBLE_DEVICES_ENV[vendor]
    except KeyError:
        raise ValueError(f"unknown accelerator vendor {vendor!r}; "
                         f"known: {', '.join(VENDORS)}") from None
    devices = [int(i) for i in indices]
    if not devices:
        raise ValueError(f"a {vendor} launch needs at least one device index")
    env = {variable: ",".join(str(i) for i in devices)}
    if variable == "CUDA_VISIBLE_DEVICES":
        # gpumesh numbers devices as the vendor tool does (PCI bus order); CUDA's default
        # order is "fastest first", which would hand the engine other devices.
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return env
