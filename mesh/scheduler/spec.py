"""The scheduling part of a deploy request, checked before anything is stored.

Fields (all optional):

    placement:
      policy: binpack | spread            (default binpack)
      device: auto | gpu | cpu            (default auto: GPUs first, then the CPU)
      node_selector: {label: glob}        node labels, plus `name` and `id`
      gpu_selector: {key: glob}           vendor, name, uuid, index, and GPU labels
      gpus: [NODE:INDEX | UUID, ...]      pinned GPUs, all on one node
      gpus_per_replica: 1..16             tensor parallel size (default: fewest that fit)
      multi_node: true | false            may one replica span nodes (default true)
    min_replicas: 0..replicas             below replicas: on demand (scale to zero at 0);
                                          absent: every replica runs all the time
    idle_timeout_s: > 0                   on-demand models stop after this long idle
"""

from __future__ import annotations

from typing import Any

from .capacity import MAX_GPUS_PER_NODE
from .demand import DEFAULT_IDLE_TIMEOUT_S
from .requirement import DEVICES, POLICIES

__all__ = ["SpecError", "scheduling_fields"]

_PLACEMENT_KEYS = ("policy", "device", "node_selector", "gpu_selector", "gpus",
                   "gpus_per_replica", "multi_node")
_MAX_IDLE_TIMEOUT_S = 30 * 24 * 3600.0


class SpecError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def scheduling_fields(spec: dict[str, Any], replicas: int) -> dict[str, Any]:
    """{"placement", "min_replicas", "idle_timeout_s"} for the model record; SpecError if bad."""
    placement = _placement(spec.get("placement"))
    min_replicas = spec.get("min_replicas")       # None: always `replicas`, whatever they become
    if min_replicas is not None and (isinstance(min_replicas, bool)
                                     or not isinstance(min_replicas, int)
                                     or not 0 <= min_replicas <= replicas):
        raise SpecError(f"min_replicas must be a whole number from 0 to replicas ({replicas})",
                        "min_replicas")
    idle = spec.get("idle_timeout_s", DEFAULT_IDLE_TIMEOUT_S)
    if isinstance(idle, bool) or not isinstance(idle, (int, float)) \
            or not 0 < idle <= _MAX_IDLE_TIMEOUT_S:
        raise SpecError("idle_timeout_s must be a number of seconds above 0 (at most 30 days)",
                        "idle_timeout_s")
    return {"placement": placement, "min_replicas": min_replicas, "idle_timeout_s": float(idle)}


def _placement(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError("placement must be an object", "placement")
    unknown = sorted(set(value) - set(_PLACEMENT_KEYS))
    if unknown:
        raise SpecError(f"placement has unknown field(s) {', '.join(unknown)} (known: "
                        f"{', '.join(_PLACEMENT_KEYS)})", "placement")
    out: dict[str, Any] = {}
    if (policy := value.get("policy")) is not None:
        out["policy"] = _choice(policy, POLICIES, "placement.policy")
    if (device := value.get("device")) is not None:
        out["device"] = _choice(device, DEVICES, "placement.device")
    for key in ("node_selector", "gpu_selector"):
        if value.get(key):
            out[key] = _selector(value[key], f"placement.{key}")
    if value.get("gpus"):
        gpus = value["gpus"]
        if not isinstance(gpus, list) or not all(isinstance(g, str) and g for g in gpus):
            raise SpecError("placement.gpus must be a list of GPUs: NODE:INDEX or a GPU UUID",
                            "placement.gpus")
        out["gpus"] = list(gpus)
    if (count := value.get("gpus_per_replica")) is not None:
        if isinstance(count, bool) or not isinstance(count, int) \
                or not 1 <= count <= MAX_GPUS_PER_NODE:
            raise SpecError(f"placement.gpus_per_replica must be 1 to {MAX_GPUS_PER_NODE}",
                            "placement.gpus_per_replica")
        out["gpus_per_replica"] = count
    if (multi := value.get("multi_node")) is not None:
        if not isinstance(multi, bool):
            raise SpecError("placement.multi_node must be true or false", "placement.multi_node")
        out["multi_node"] = multi
    if out.get("gpus") and out.get("gpus_per_replica") not in (None, len(out["gpus"])):
        raise SpecError(f"placement.gpus names {len(out['gpus'])} GPU(s) but gpus_per_replica "
                        f"is {out['gpus_per_replica']}", "placement.gpus_per_replica")
    if out.get("device") == "cpu" and (out.get("gpus") or out.get("gpus_per_replica")
                                       or out.get("gpu_selector")):
        raise SpecError("placement.device cpu cannot go with GPUs, gpus_per_replica or a "
                        "gpu_selector", "placement.device")
    return out


def _choice(value: Any, allowed: tuple[str, ...], param: str) -> str:
    if value not in allowed:
        raise SpecError(f"{param} must be one of {', '.join(allowed)}, not {value!r}", param)
    return str(value)


def _selector(value: Any, param: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and k and isinstance(v, str)
                                              for k, v in value.items()):
        raise SpecError(f"{param} must map label names to values (strings; globs allowed)",
                        param)
    return dict(value)
