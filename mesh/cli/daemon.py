"""`gpumesh up`: run the daemon on this machine, in the foreground."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import fields
from typing import Any

from gpumesh.interrupts import interrupted, remember_interrupts

from ..config import Config, ConfigError
from ..probes import PROBE_KINDS
from .output import CliError, Exit, name_values

__all__ = ["register"]


def cmd_up(args: argparse.Namespace) -> int:
    remember_interrupts()            # the daemon's imports are most of start-up (~0.3 s idle)
    from ..daemon import run_daemon   # the daemon's imports only when needed
    from ..startup import configure_logging

    # Every Config field whose flag `up` defines (a new setting needs only its add_argument).
    flags = {f.name: getattr(args, f.name, None) for f in fields(Config)}
    try:
        config = Config.from_sources(flags)
    except ConfigError as exc:
        raise CliError(str(exc), Exit.USAGE) from None
    configure_logging(config.log_level)
    if interrupted():                # a Ctrl-C some import swallowed: nothing started yet
        return Exit.INTERRUPTED
    return asyncio.run(run_daemon(config))


def register(sub: Any) -> None:
    up = sub.add_parser("up", help="run the daemon on this machine (foreground)")
    up.add_argument("--data-dir", help="state, keys and logs (default ~/.local/share/gpumesh; "
                    "env GPUMESH_DATA_DIR)")
    up.add_argument("--host", help="address for the API and Raft ports (default 127.0.0.1)")
    up.add_argument("--raft-host", help="address for the Raft port when it must differ from "
                    "--host, e.g. a cluster network (env GPUMESH_RAFT_HOST)")
    up.add_argument("--api-port", type=int, help="API port (default 8470)")
    up.add_argument("--raft-port", type=int, help="Raft port (default 8471)")
    up.add_argument("--node-name", help="a name for people (default: the hostname)")
    up.add_argument("--gpu-probe", choices=PROBE_KINDS,
                    help="which accelerators to look for (default auto: NVIDIA, AMD, then the "
                    "other vendors' tools, else none)")
    up.add_argument("--gpus", help="offer only these device indices, e.g. 0,1 (default: all; "
                    "env GPUMESH_GPUS)")
    up.add_argument("--label", dest="labels", action="append", metavar="KEY=VALUE",
                    help="a label for node selectors (repeatable), e.g. --label zone=eu-west")
    up.add_argument("--gpu-label", dest="gpu_labels", action="append",
                    metavar="INDEX:KEY=VALUE",
                    help="a label of one GPU for GPU selectors (repeatable), e.g. "
                         "--gpu-label 0:pool=batch (env GPUMESH_GPU_LABELS=0:pool=batch,…)")
    up.add_argument("--wake-timeout", dest="wake_timeout_s", type=float, metavar="SECONDS",
                    help="how long the first request to a model scaled to zero waits for an "
                         "instance to start before it gets a 503 (default 120; env "
                         "GPUMESH_WAKE_TIMEOUT)")
    up.add_argument("--reserved-memory-mib", type=int,
                    help="RAM the scheduler leaves to the system (default 1024)")
    up.add_argument("--memory-limit-mib", type=int,
                    help="RAM this node offers to instances at most (default: all the "
                    "machine has)")
    up.add_argument("--engine-health-interval", dest="engine_health_interval_s", type=float,
                    help="seconds between health probes of a running engine; 3 failures in a "
                    "row restart it (default 5)")
    up.add_argument("--engine-healthy-uptime", dest="engine_healthy_uptime_s", type=float,
                    help="an engine healthy this many seconds restarts without backoff when "
                    "it next fails (default 60)")
    up.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                    help="how much the daemon logs on stderr (default info; env "
                         "GPUMESH_LOG_LEVEL)")
    up.add_argument("--drain-seconds", type=float, metavar="SECONDS",
                    help="on stop, how long requests in flight may finish before they are cut "
                         "(default 10; env GPUMESH_DRAIN_SECONDS); engines then get 10 s")
    cluster = up.add_argument_group("joining a cluster")
    cluster.add_argument("--advertise", metavar="ADDRESS",
                         help="the address peers use for this node (default: --host, or the "
                              "primary interface's address when --host is 0.0.0.0)")
    cluster.add_argument("--join", metavar="HOST[:PORT]",
                         help="join the cluster through this member's API (env GPUMESH_JOIN; "
                              "needs --token); without it, --token finds a member by mDNS")
    cluster.add_argument("--token", help="a join token from `gpumesh join-token` on a member "
                                         "(env GPUMESH_TOKEN)")
    cluster.add_argument("--discovery", choices=["mdns", "off"],
                         help="advertise and find members by mDNS (default mdns)")
    cluster.add_argument("--mdns-interface", metavar="IFACE",
                         help="the one interface mDNS uses (default: the advertised "
                              "address's)")
    up.add_argument("--max-body-mib", type=int,
                    help="largest request body the gateway takes (default 32)")
    up.add_argument("--engine-connect-timeout", dest="engine_connect_timeout_s", type=float,
                    help="seconds to connect to an engine or a peer (default 5)")
    up.add_argument("--engine-response-timeout", dest="engine_response_timeout_s", type=float,
                    help="seconds an engine may take before its answer begins (default 600)")
    up.add_argument("--stream-idle-timeout", dest="stream_idle_timeout_s", type=float,
                    help="seconds a stream may go without a chunk before it is cut "
                    "(default 120)")
    up.add_argument("--image-fetch", choices=["off", "public", "any"],
                    help="image URLs in chats for llama.cpp VLMs are fetched by the gateway: "
                    "public refuses loopback, link-local, unspecified and multicast "
                    "addresses; any allows them; off asks clients for data: URLs "
                    "(default public)")
    name_values(up)
    up.set_defaults(command="up", handler=cmd_up)

