"""`gpumesh deploy` flags for placement and on-demand scaling, and `deploy --dry-run`.

The flags become the deploy request's `placement`, `min_replicas` and `idle_timeout_s`
(checked by the node: `mesh/scheduler/spec.py`); `--dry-run` sends the same request to
`POST /api/models/evaluate` and prints where it would run, or why not, storing nothing.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..client import ApiClient
from .output import CliError, Exit, gib, print_result

__all__ = ["add_flags", "dry_run", "given_flags", "spec_fields"]


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("placement and on-demand scaling")
    group.add_argument("--policy", choices=("binpack", "spread"),
                       help="binpack (default): fill the fullest device that fits; spread: "
                            "the emptiest")
    group.add_argument("--device", choices=("auto", "gpu", "cpu"),
                       help="auto (default): a GPU if one fits, else the CPU")
    group.add_argument("--node-selector", action="append", metavar="LABEL=GLOB",
                       help="only nodes whose label matches (repeatable; `name` and `id` "
                            "always exist), e.g. --node-selector zone=eu-*")
    group.add_argument("--gpu-selector", action="append", metavar="KEY=GLOB",
                       help="only GPUs that match (vendor, name, uuid, index, GPU labels), "
                            "e.g. --gpu-selector name=*H100*")
    group.add_argument("--gpus", metavar="NODE:INDEX,...",
                       help="pin to these GPUs (all on one node; or GPU UUIDs)")
    group.add_argument("--gpus-per-replica", type=int, metavar="N",
                       help="tensor parallel size (default: the fewest GPUs that fit)")
    group.add_argument("--single-node", action="store_true",
                       help="never split one replica over several nodes")
    group.add_argument("--min-replicas", type=int, metavar="N",
                       help="below --replicas: on demand; 0 scales to zero when idle and the "
                            "next request starts an instance")
    group.add_argument("--idle-timeout", type=float, metavar="SECONDS",
                       help="on-demand models stop after this long without a request "
                            "(default 300)")
    group.add_argument("--dry-run", action="store_true",
                       help="say where the model would run (or why it cannot), deploy nothing")


def given_flags(args: argparse.Namespace) -> list[str]:
    """The placement flags set on the command line (for `-f`, which takes none)."""
    names = ("policy", "device", "node_selector", "gpu_selector", "gpus", "gpus_per_replica",
             "min_replicas", "idle_timeout")
    given = ["--" + n.replace("_", "-") for n in names if getattr(args, n, None) is not None]
    return given + (["--single-node"] if getattr(args, "single_node", False) else [])


def spec_fields(args: argparse.Namespace) -> dict[str, Any]:
    placement: dict[str, Any] = {}
    for flag in ("policy", "device", "gpus_per_replica"):
        if getattr(args, flag) is not None:
            placement[flag] = getattr(args, flag)
    for flag in ("node_selector", "gpu_selector"):
        if getattr(args, flag):
            placement[flag] = _selector(getattr(args, flag), flag)
    if args.gpus:
        placement["gpus"] = [g.strip() for g in args.gpus.split(",") if g.strip()]
    if args.single_node:
        placement["multi_node"] = False
    fields: dict[str, Any] = {"placement": placement} if placement else {}
    if args.min_replicas is not None:
        fields["min_replicas"] = args.min_replicas
    if args.idle_timeout is not None:
        fields["idle_timeout_s"] = args.idle_timeout
    return fields


def _selector(pairs: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--{flag.replace('_', '-')} takes LABEL=GLOB, not {pair!r}",
                           Exit.USAGE)
        out[key.strip()] = value.strip()
    return out


def dry_run(args: argparse.Namespace, client: ApiClient, spec: dict[str, Any]) -> int:
    """Evaluate without deploying; exit 0 if every replica fits, 7 if not."""
    answer = client.post("/api/models/evaluate", spec)
    print_result(args, answer, _describe)
    return Exit.OK if answer["fits"] else Exit.NOT_SCHEDULABLE


def _describe(answer: dict[str, Any]) -> str:
    est = answer["estimate"]
    devices = est.get("by_device") or {"one device": est["total_bytes"]}
    needs = ", ".join(f"{gib(size)} on {'a GPU' if d == 'gpu' else 'the CPU' if d == 'cpu' else d}"
                      for d, size in sorted(devices.items(), reverse=True))
    lines = [f"{answer['name']} ({answer['backend']}, {answer['format']}): "
             f"{'fits' if answer['fits'] else 'does not fit'}",
             f"  needs    {needs} (weights {gib(est['weights_bytes'])}, KV cache "
             f"{gib(est['kv_cache_bytes'])} for {est.get('context_length') or '-'} tokens, "
             f"compute {gib(est.get('compute_bytes') or 0)}; from "
             f"{est.get('basis', 'files')})"]
    for check in answer["checks"]:
        if not check["ok"]:
            lines.append(f"  problem  {check['detail']}")
    for n, replica in enumerate(answer["replicas"], 1):
        lines.append(f"  replica {n}: {replica['reason']}")
    lines.append(f"  {answer['summary']}")
    return "\n".join(lines)
