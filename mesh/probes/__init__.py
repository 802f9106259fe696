"""GPU probes: NVIDIA (NVML), AMD (AMD SMI), and a CPU fallback."""
