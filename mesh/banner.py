"""The start-up banner: where this node listens, which cluster it is in, what it can run."""

from __future__ import annotations

from typing import Any

from gpumesh import __version__

from .config import Config
from .sizes import format_bytes
from .state import ClusterStore

__all__ = ["print_banner"]


def print_banner(*, config: Config, node_id: str, cluster_id: str, store: ClusterStore,
                 data_root: str, backends: list[dict[str, Any]], discovery: str) -> None:
    node = store.view.nodes[node_id]
    inv = node["inventory"]
    gpus = ", ".join(f"{g['name']} ({format_bytes(g['memory_total_bytes'])})"
                     for g in inv["gpus"]) or "none"
    status = store.status
    members = len(status.members)
    print(f"gpumesh {__version__} · node {node_id} ({config.node_name}) · "
          f"cluster {cluster_id} of {members}, leader: "
          f"{'this node' if status.is_leader else status.leader}\n"
          f"  OpenAI API   {config.api_url}/v1\n"
          f"  management   {config.api_url}/api\n"
          f"  Raft         {config.raft_address}\n"
          f"  discovery    {discovery}\n"
          f"  data dir     {data_root}\n"
          f"  resources    {inv['cpu_cores']} CPU cores, "
          f"{format_bytes(inv['memory_total_bytes'])} RAM, GPUs: {gpus} "
          f"(probe: {inv['probe']})\n"
          f"  backends     {backend_summary(backends)}\n"
          f"  Add a node:  `gpumesh join-token` here, then `gpumesh up --token TOKEN` there.\n"
          f"  Press Ctrl-C to stop.", flush=True)


def backend_summary(backends: list[dict[str, Any]]) -> str:
    """"llama.cpp 0.2 (cpu)" per engine, or why it is unavailable."""
    parts = []
    for b in backends:
        if b["available"]:
            devices = (["cpu"] if b["runs_on_cpu"] else []) + list(b["gpu_vendors"])
            parts.append(f"{b['name']} {b['version']} ({', '.join(devices)})")
        else:
            parts.append(f"{b['name']} unavailable: {b['problem']}")
    return "; ".join(parts) or "none"
