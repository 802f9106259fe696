"""What one replica of a model asks of the cluster: memory per device, and where it may go.

Memory comes from the model's estimate (`modelfiles.estimate`), split in two kinds:

* parts that divide between devices when a model is split (weights, KV cache): a device
  holding a share `s` of the layers holds `s × (weights + kv)`;
* parts every device (or engine process) holds whole: the runtime (CUDA context, the
  engine's process) and the compute buffers / activation peak.

So one GPU needs `weights + kv + runtime + compute`, and each of k GPUs in tensor parallel
`(weights + kv) / k + runtime + compute`.

Where: the deployment's `placement` (policy, device, selectors, pinned GPUs, GPUs per
replica, multi-node allowed) and what the engine can do (`ENGINES`: tensor-parallel sizes,
its multi-node mechanism, whether it mixes GPU vendors and sizes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Mapping

__all__ = ["ENGINES", "EngineTraits", "Requirement", "POLICIES", "DEVICES"]

POLICIES = ("binpack", "spread")
DEVICES = ("auto", "gpu", "cpu")


@dataclass(frozen=True)
class EngineTraits:
    """How an engine can spread one model over several devices."""

    # GPU counts one replica may use on one node; None: any count (layers split by size)
    tensor_parallel_sizes: tuple[int, ...] | None = (1,)
    # how one replica spans nodes: "llama.cpp-rpc" (rpc-server on each worker, layers split
    # by free memory), "ray-pipeline" (vLLM: pipeline stages on Ray workers, equal layers
    # per stage, tensor parallel inside each), or None
    multi_node: str | None = None
    # devices of different vendors and sizes in one replica (llama.cpp: yes; vLLM: no)
    heterogeneous: bool = False


ENGINES: dict[str, EngineTraits] = {
    "llama.cpp": EngineTraits(tensor_parallel_sizes=None, multi_node="llama.cpp-rpc",
                              heterogeneous=True),
    "vllm": EngineTraits(tensor_parallel_sizes=(1, 2, 4, 8, 16), multi_node="ray-pipeline"),
    "sglang": EngineTraits(tensor_parallel_sizes=(1, 2, 4, 8, 16)),
}
_SINGLE_DEVICE = EngineTraits()


@dataclass
class Requirement:
    model: str
    backend: str
    engine: EngineTraits
    split_bytes: dict[str, int]        # device -> weights + KV cache that divide over devices
    fixed_bytes: dict[str, int]        # device -> runtime + compute each device holds whole
    policy: str = "binpack"
    device: str = "auto"
    node_selector: dict[str, str] = field(default_factory=dict)
    gpu_selector: dict[str, str] = field(default_factory=dict)
    pinned: tuple[str, ...] = ()
    gpus_per_replica: int | None = None
    multi_node: bool = True

    @classmethod
    def of(cls, model: Mapping[str, Any]) -> "Requirement":
        estimate = model.get("estimate") or {}
        split, fixed = _memory_parts(estimate)
        spec = model.get("placement") or {}
        backend = str(model["backend"])
        base = backend.split("==", 1)[0].lower()
        return cls(
            model=str(model["name"]), backend=backend, engine=ENGINES.get(base, _SINGLE_DEVICE),
            split_bytes=split, fixed_bytes=fixed,
            policy=spec.get("policy") or "binpack", device=spec.get("device") or "auto",
            node_selector=dict(spec.get("node_selector") or {}),
            gpu_selector=dict(spec.get("gpu_selector") or {}),
            pinned=tuple(spec.get("gpus") or ()),
            gpus_per_replica=spec.get("gpus_per_replica"),
            multi_node=spec.get("multi_node", True) is not False)

    def need(self, device: str, share: float = 1.0) -> int:
        """Bytes one device holds when it takes `share` of the model's layers."""
        return math.ceil(share * self.split_bytes[device]) + self.fixed_bytes[device]

    def gpu_counts(self, most: int) -> list[int]:
        """GPU counts to try on one node, fewest first (`most`: the largest node's GPUs)."""
        if self.pinned:
            return [len(self.pinned)]
        if self.gpus_per_replica:
            return [self.gpus_per_replica]
        sizes = self.engine.tensor_parallel_sizes
        counts = range(1, most + 1) if sizes is None else [s for s in sizes if s <= most]
        return list(counts) or [1]

    def backend_runs_on_cpu_somewhere(self, index: Any) -> bool:
        return any(n.ready and n.backend_runs_on_cpu(self.backend) for n in index.nodes.values())

    def node_matches(self, labels: Mapping[str, str]) -> bool:
        return _matches(self.node_selector, labels)

    def gpu_matches(self, labels: Mapping[str, str]) -> bool:
        return _matches(self.gpu_selector, labels)


def _matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Every key present, every value matching (shell-style globs: `H100*`, `*80GB*`)."""
    return all(key in labels and fnmatchcase(labels[key], str(pattern))
               for key, pattern in selector.items())


def _memory_parts(estimate: Mapping[str, Any]) -> tuple[dict[str, int], dict[str, int]]:
    """(split, fixed) bytes per device type from a model's estimate record.

    Records from before per-device estimates hold weights, KV cache and one overhead: the
    overhead is taken as fixed per device, the rest as split.
    """
    weights = int(estimate.get("weights_bytes") or 0)
    kv = int(estimate.get("kv_cache_bytes") or 0)
    if "runtime_bytes" in estimate:
        runtime = estimate["runtime_bytes"]
        compute = int(estimate.get("compute_bytes") or 0)
        gpu_weights = int(estimate.get("gpu_weights_bytes", weights))
        split = {"gpu": gpu_weights + kv, "cpu": weights + kv}
        fixed = {"gpu": int(runtime.get("gpu", 0)) + compute,
                 "cpu": int(runtime.get("cpu", 0)) + compute}
        return split, fixed
    total = int(estimate.get("total_bytes") or 0)
    overhead = max(0, total - weights - kv) if weights else 0
    split_all = total - overhead
    return {"gpu": split_all, "cpu": split_all}, {"gpu": overhead, "cpu": overhead}
