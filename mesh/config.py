"""Daemon configuration: defaults, environment, command-line flags, validated up front.

Every setting has one place where its default lives (the dataclass below) and one
name users see (`--api-port` / `GPUMESH_API_PORT`). Validation errors name the flag the
user typed and say which values are defaults, so a mistake is fixed in one try.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .gateway import GatewaySettings

from .probes import PROBE_KINDS

__all__ = ["Config", "ConfigError", "default_data_dir"]

DEFAULT_API_PORT = 8470
DEFAULT_RAFT_PORT = 8471


class ConfigError(ValueError):
    """A setting is invalid; the message names the flag and the allowed values."""


def default_data_dir() -> Path:
    """`$GPUMESH_DATA_DIR`, else `$XDG_DATA_HOME/gpumesh`, else `~/.local/share/gpumesh`."""
    if env := os.environ.get("GPUMESH_DATA_DIR"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "gpumesh"


@dataclass
class Config:
    """The settings of one `gpumesh up`. Field metadata gives the flag and env names."""

    data_dir: Path = field(default_factory=default_data_dir,
                           metadata={"flag": "--data-dir", "env": "GPUMESH_DATA_DIR"})
    host: str = field(default="127.0.0.1",
                      metadata={"flag": "--host", "env": "GPUMESH_HOST"})
    # Where the Raft port listens, when it must differ from the API's (a cluster network).
    # Empty: the same as --host.
    raft_host: str = field(default="",
                           metadata={"flag": "--raft-host", "env": "GPUMESH_RAFT_HOST"})
    # The address peers use for this node (API and Raft); default: the bind address, or the
    # primary interface's when bound to 0.0.0.0.
    advertise: str | None = field(default=None,
                                  metadata={"flag": "--advertise", "env": "GPUMESH_ADVERTISE"})
    # Joining: a member's API (HOST[:PORT]) and a token from `gpumesh join-token`.
    join: str | None = field(default=None, metadata={"flag": "--join", "env": "GPUMESH_JOIN"})
    token: str | None = field(default=None,
                              metadata={"flag": "--token", "env": "GPUMESH_TOKEN"})
    discovery: str = field(default="mdns",
                           metadata={"flag": "--discovery", "env": "GPUMESH_DISCOVERY"})
    # mDNS runs on one interface only; default: the one holding the advertised address.
    mdns_interface: str | None = field(default=None,
                                       metadata={"flag": "--mdns-interface",
                                                 "env": "GPUMESH_MDNS_INTERFACE"})
    api_port: int = field(default=DEFAULT_API_PORT,
                          metadata={"flag": "--api-port", "env": "GPUMESH_API_PORT"})
    raft_port: int = field(default=DEFAULT_RAFT_PORT,
                           metadata={"flag": "--raft-port", "env": "GPUMESH_RAFT_PORT"})
    node_name: str = field(default_factory=lambda: os.uname().nodename,
                           metadata={"flag": "--node-name", "env": "GPUMESH_NODE_NAME"})
    gpu_probe: str = field(default="auto",
                           metadata={"flag": "--gpu-probe", "env": "GPUMESH_GPU_PROBE"})
    # The device indices this node offers ("0,1"); None: every device the probe finds.
    gpus: tuple[int, ...] | None = field(default=None,
                                         metadata={"flag": "--gpus", "env": "GPUMESH_GPUS"})
    # Labels the scheduler's node selectors match ("zone=eu,tier=fast"; --label repeatable).
    labels: dict[str, str] | str | list[str] | None = field(
        default=None, metadata={"flag": "--label", "env": "GPUMESH_LABELS"})
    # Labels of single GPUs for GPU selectors ("0:pool=batch,1:pool=fast"; --gpu-label
    # repeatable), as {index: {key: value}} in the node record.
    gpu_labels: dict[str, dict[str, str]] | str | list[str] | None = field(
        default=None, metadata={"flag": "--gpu-label", "env": "GPUMESH_GPU_LABELS"})
    # How long the first request to a model scaled to zero waits for an instance to start.
    wake_timeout_s: float = field(default=120.0,
                                  metadata={"flag": "--wake-timeout",
                                            "env": "GPUMESH_WAKE_TIMEOUT"})
    # Memory the scheduler leaves to the OS and the daemon on every node.
    reserved_memory_mib: int = field(default=1024,
                                     metadata={"flag": "--reserved-memory-mib",
                                               "env": "GPUMESH_RESERVED_MEMORY_MIB"})
    # RAM this node offers to instances at most (None: what the machine has). For a machine
    # shared with other work, or several nodes on one machine. Capped in the node record.
    memory_limit_mib: int | None = field(default=None,
                                         metadata={"flag": "--memory-limit-mib",
                                                   "env": "GPUMESH_MEMORY_LIMIT_MIB"})
    # While an engine runs it is probed this often; three failed probes in a row restart it.
    engine_health_interval_s: float = field(default=5.0,
                                            metadata={"flag": "--engine-health-interval",
                                                      "env": "GPUMESH_ENGINE_HEALTH_INTERVAL"})
    # An engine that ran healthy this long restarts after 1 s again, not after its backoff.
    engine_healthy_uptime_s: float = field(default=60.0,
                                           metadata={"flag": "--engine-healthy-uptime",
                                                     "env": "GPUMESH_ENGINE_HEALTHY_UPTIME"})
    log_level: str = field(default="info",
                           metadata={"flag": "--log-level", "env": "GPUMESH_LOG_LEVEL"})
    # The gateway: the largest request body, and how long engines may stay silent.
    max_body_mib: int = field(default=32, metadata={"flag": "--max-body-mib",
                                                    "env": "GPUMESH_MAX_BODY_MIB"})
    engine_connect_timeout_s: float = field(
        default=5.0, metadata={"flag": "--engine-connect-timeout",
                               "env": "GPUMESH_ENGINE_CONNECT_TIMEOUT"})
    engine_response_timeout_s: float = field(
        default=600.0, metadata={"flag": "--engine-response-timeout",
                                 "env": "GPUMESH_ENGINE_RESPONSE_TIMEOUT"})
    stream_idle_timeout_s: float = field(
        default=120.0, metadata={"flag": "--stream-idle-timeout",
                                 "env": "GPUMESH_STREAM_IDLE_TIMEOUT"})
    # Remote image URLs in chats for llama.cpp VLMs, fetched by the gateway: off, public
    # (refusing loopback, link-local, unspecified and multicast addresses) or any.
    image_fetch: str = field(default="public",
                             metadata={"flag": "--image-fetch", "env": "GPUMESH_IMAGE_FETCH"})
    # On stop, how long requests in flight (streams too) may finish before they are cut.
    # The whole stop is bounded: this + the engines' grace (10 s) + a few seconds; the
    # systemd unit's TimeoutStopSec is set from that sum (packaging/gpumesh.service).
    drain_seconds: float = field(default=10.0,
                                 metadata={"flag": "--drain-seconds",
                                           "env": "GPUMESH_DRAIN_SECONDS"})

    @classmethod
    def from_sources(cls, flags: dict[str, object]) -> "Config":
        """Build from environment variables, overridden by flags that were given (not None)."""
        values: dict[str, object] = {}
        for f in fields(cls):
            env_value = os.environ.get(f.metadata["env"])
            if env_value is not None and f.name != "data_dir":  # data_dir reads its env in its default
                values[f.name] = env_value
            if flags.get(f.name) is not None:
                values[f.name] = flags[f.name]
        config = cls(**values)  # type: ignore[arg-type]  # strings from env: normalise() coerces
        config.normalise()
        return config

    def normalise(self) -> None:
        """Coerce types and check ranges; raise ConfigError naming the flag."""
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        self.api_port = _port(self.api_port, "api_port")
        self.raft_port = _port(self.raft_port, "raft_port")
        if self.api_port == self.raft_port:
            raise ConfigError(f"--api-port and --raft-port must differ (both {self.api_port})")
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ConfigError(f"--host must be an IP address, got {self.host!r}") from None
        self.raft_host = str(self.raft_host or self.host)
        try:
            ipaddress.ip_address(self.raft_host)
        except ValueError:
            raise ConfigError(f"--raft-host must be an IP address (default: --host), "
                              f"got {self.raft_host!r}") from None
        probe = str(self.gpu_probe).lower()
        if probe not in PROBE_KINDS:
            raise ConfigError(f"--gpu-probe must be one of {', '.join(PROBE_KINDS)} "
                              f"(default auto), got {self.gpu_probe!r}")
        self.gpu_probe = probe
        self.gpus = _gpu_list(self.gpus)
        if self.gpus is not None and probe == "cpu":
            raise ConfigError("--gpus cannot be combined with --gpu-probe cpu (which offers no GPUs)")
        self.advertise = _advertised_address(self.host, self.advertise)
        self.discovery = str(self.discovery).lower()
        if self.discovery not in ("mdns", "off"):
            raise ConfigError(f"--discovery must be mdns or off (default mdns), "
                              f"got {self.discovery!r}")
        if self.join is not None:
            if not self.token:
                raise ConfigError("--join needs --token (run `gpumesh join-token` on a member)")
            self.join = _join_address(str(self.join))
        self.labels = _labels(self.labels)
        self.gpu_labels = _gpu_labels(self.gpu_labels)
        self.wake_timeout_s = _seconds(self.wake_timeout_s, "wake_timeout_s")
        self.reserved_memory_mib = _int(self.reserved_memory_mib, "reserved_memory_mib", 0)
        if self.memory_limit_mib not in (None, ""):
            self.memory_limit_mib = _int(self.memory_limit_mib, "memory_limit_mib", 1)
        else:
            self.memory_limit_mib = None
        self.engine_health_interval_s = _seconds(self.engine_health_interval_s,
                                                 "engine_health_interval_s")
        self.engine_healthy_uptime_s = _seconds(self.engine_healthy_uptime_s,
                                                "engine_healthy_uptime_s")
        self.log_level = str(self.log_level).lower()
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"--log-level must be debug, info, warning or error (default info), "
                              f"got {self.log_level!r}")
        try:
            self.drain_seconds = float(self.drain_seconds)
        except (TypeError, ValueError):
            raise ConfigError(f"--drain-seconds must be a number of seconds (default 10), "
                              f"got {self.drain_seconds!r}") from None
        if not 0 <= self.drain_seconds <= 3600:
            raise ConfigError(f"--drain-seconds must be from 0 to 3600 (default 10), "
                              f"got {self.drain_seconds:g}")
        if not self.node_name or len(self.node_name) > 63:
            raise ConfigError("--node-name must be 1 to 63 characters")
        self.max_body_mib = _int(self.max_body_mib, "max_body_mib", 1)
        for name in ("engine_connect_timeout_s", "engine_response_timeout_s",
                     "stream_idle_timeout_s"):
            setattr(self, name, _seconds(getattr(self, name), name))
        self.image_fetch = str(self.image_fetch).lower()
        if self.image_fetch not in ("off", "public", "any"):
            raise ConfigError(f"--image-fetch must be off, public or any (default public), "
                              f"got {self.image_fetch!r}")

    def gateway_settings(self) -> "GatewaySettings":
        from .gateway import GatewaySettings   # the gateway's imports only where it runs
        return GatewaySettings(connect_timeout_s=self.engine_connect_timeout_s,
                               response_timeout_s=self.engine_response_timeout_s,
                               stream_idle_timeout_s=self.stream_idle_timeout_s,
                               image_fetch=self.image_fetch)

    @property
    def api_url(self) -> str:
        return f"http://{self.advertise}:{self.api_port}"

    @property
    def local_api_url(self) -> str:
        """The API as a client on this machine reaches it: a wildcard bind through loopback."""
        ip = ipaddress.ip_address(self.host)
        if ip.is_unspecified:
            ip = ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
        host = f"[{ip}]" if ip.version == 6 else str(ip)
        return f"http://{host}:{self.api_port}"

    @property
    def raft_address(self) -> str:
        """This node's Raft identity, as its peers dial it: the advertised address, or
        --raft-host when the Raft port listens on its own (cluster) network."""
        raft_host = ipaddress.ip_address(self.raft_host)
        if self.raft_host != self.host and not raft_host.is_unspecified:
            return f"{self.raft_host}:{self.raft_port}"
        return f"{self.advertise}:{self.raft_port}"


def _advertised_address(host: str, advertise: str | None) -> str:
    if advertise is None:
        if not ipaddress.ip_address(host).is_unspecified:
            return host
        advertise = primary_address()
        if advertise is None:
            raise ConfigError(f"--host {host} listens everywhere, and this machine has no "
                              f"default route to tell which address peers should use: "
                              f"pass --advertise ADDRESS")
    try:
        address = ipaddress.ip_address(advertise)
    except ValueError:
        raise ConfigError(f"--advertise must be an IP address, got {advertise!r}") from None
    if address.is_unspecified:
        raise ConfigError(f"--advertise {advertise} is not an address peers can reach: "
                          f"give this node's own address on the cluster's network")
    return str(address)


def primary_address() -> str | None:
    """The address this machine uses towards the rest of the network (the default route's
    source address), or None without a default route. No packet is sent."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("8.8.8.8", 9))   # routed like any remote address; UDP: nothing is sent
        except OSError:
            return None
        return probe.getsockname()[0]


def _join_address(value: str) -> str:
    """`HOST[:PORT]` (or a URL) → `http://HOST:PORT` of a member's API."""
    text = value.strip().removeprefix("http://").rstrip("/")
    host, _, port = text.rpartition(":") if ":" in text else (text, "", str(DEFAULT_API_PORT))
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--join must be HOST[:PORT] of a member's API, got {value!r}")
    return f"http://{host}:{int(port)}"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")


def _labels(value: object) -> dict[str, str]:
    """"k=v,k2=v2" (env), ["k=v", …] (flags) or a dict -> {k: v}; keys are plain words."""
    if value is None:
        return {}
    if isinstance(value, dict):
        pairs = [f"{k}={v}" for k, v in value.items()]
    elif isinstance(value, str):
        pairs = [p for p in value.split(",") if p.strip()]
    else:
        pairs = [p for item in value for p in str(item).split(",") if p.strip()]
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, label = pair.strip().partition("=")
        if not sep or not _LABEL_KEY.match(key):
            raise ConfigError(f"--label takes KEY=VALUE (KEY: letters, digits, . _ / -), "
                              f"got {pair!r}")
        if key in ("name", "id"):
            raise ConfigError(f"--label {key}=… is taken: node selectors match the node's "
                              f"{key} already")
        labels[key] = label.strip()
    return labels


# Keys a GPU selector matches already (scheduler/capacity.py: GpuSlot.attributes).
_GPU_ATTRIBUTES = ("vendor", "name", "uuid", "index")


def _gpu_labels(value: object) -> dict[str, dict[str, str]]:
    """"0:pool=batch,1:pool=fast" (env), ["0:pool=batch", …] (flags) or a dict ->
    {"0": {"pool": "batch"}, …}. Whether the node has those GPUs is checked once the probe
    has listed them (daemon start-up)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(index): _labels(labels) for index, labels in value.items()}
    items = value.split(",") if isinstance(value, str) else \
        [p for item in value for p in str(item).split(",")]  # type: ignore[union-attr]
    found: dict[str, dict[str, str]] = {}
    for item in (i.strip() for i in items if i.strip()):
        index, sep, pair = item.partition(":")
        key, has_value, label = pair.partition("=")
        if not sep or not index.strip().isdigit() or not has_value \
                or not _LABEL_KEY.match(key.strip()):
            raise ConfigError(f"--gpu-label takes INDEX:KEY=VALUE, e.g. 0:pool=batch "
                              f"(KEY: letters, digits, . _ / -), got {item!r}")
        if key.strip() in _GPU_ATTRIBUTES:
            raise ConfigError(f"--gpu-label {index.strip()}:{key.strip()}=… is taken: GPU "
                              f"selectors match the GPU's {key.strip()} already")
        found.setdefault(str(int(index)), {})[key.strip()] = label.strip()
    return found


def _int(value: object, name: str, minimum: int) -> int:
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ConfigError(f"{_flag(name)} must be a whole number, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{_flag(name)} must be at least {minimum}, got {number}")
    return number


def _gpu_list(value: object) -> tuple[int, ...] | None:
    """"0,1" (flag or env) or a sequence -> (0, 1); None or "" -> None (every device)."""
    if value is None or value == "":
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
    indices: list[int] = []
    for part in parts:
        text = str(part).strip()
        if not text.isdigit():
            raise ConfigError(f"--gpus must list device indices like 0,1 (default: every "
                              f"device), got {value!r}")
        if int(text) not in indices:
            indices.append(int(text))
    if not indices:
        raise ConfigError(f"--gpus must list at least one device index, got {value!r}")
    return tuple(indices)


def _seconds(value: object, name: str) -> float:
    flag = "--" + name.removesuffix("_s").replace("_", "-")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{flag} must be a number of seconds, got {value!r}") from None
    if not 0 < number <= 86400:
        raise ConfigError(f"{flag} must be more than 0 and at most 86400 seconds, got {number:g}")
    return number


def _port(value: object, name: str) -> int:
    default = {"api_port": DEFAULT_API_PORT, "raft_port": DEFAULT_RAFT_PORT}[name]
    try:
        port = _int(value, name, 1)
        if port > 65535:
            raise ConfigError(f"{_flag(name)} must be a TCP port (1-65535), got {port}")
    except ConfigError as exc:
        raise ConfigError(f"{exc} (default {default})") from None
    return port
