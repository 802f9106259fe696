"""`gpumesh doctor`: is this machine ready to be a node, and if not, what to do.

Each check reads this machine only (and the local node, if one runs): Python, GPUs and
their drivers, the API and Raft ports, mDNS, disk and memory, the data dir, the engines
and the container runtime. Nothing is started or changed, and no packet leaves the
machine (mDNS is checked by binding its port, not by sending).

A check is `ok`, `info` (worth knowing), `warn` (works, but probably not as you want) or
`fail` (gpumesh will not work as configured); every warn/fail says what to do. The exit
status is 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from gpumesh import __version__

from ..config import Config, ConfigError
from ..datadir import DataDir
from ..startup import port_problem
from .output import (CliError, Exit, Styled, add_json_flag, colour_enabled, name_values,
                     print_result, status_cell)

__all__ = ["Check", "register", "run_checks"]

_GIB = 1 << 30
_DISK_FAIL_BYTES = 1 * _GIB        # less: not even a small model and its logs fit
_DISK_WARN_BYTES = 10 * _GIB       # less: one 7-8B model (Q4 ~4.5 GiB) and little else
_MDNS_PORT = 5353
# PCI vendor ids of the GPU makers whose devices gpumesh probes (class 0x03 display,
# 0x12 processing accelerator).
_PCI_VENDORS = {"0x10de": "nvidia", "0x1002": "amd", "0x19e5": "ascend", "0x1d94": "hygon",
                "0x1ed5": "mthreads", "0x1e3e": "iluvatar", "0x9999": "metax",
                "0xcabc": "cambricon"}
_INSTALL_HINT = {"nvidia": "install the NVIDIA driver, then `pip install 'gpumesh[nvidia]'`",
                 "amd": "install ROCm (amdgpu driver + amd-smi), then `pip install "
                        "'gpumesh[amd]'`; under systemd add SupplementaryGroups=video render"}


@dataclass
class Check:
    name: str
    status: str                        # ok, info, warn, fail
    summary: str
    fix: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


def run_checks(config: Config) -> list[Check]:
    checks: list[Check] = []
    for section in (_python, _gpus, _ports, _mdns, _disk_and_memory, _data_dir, _engines,
                    _containers, _local_node):
        try:
            checks.extend(section(config))
        except Exception as exc:       # a broken check is a finding, not a crash of doctor
            checks.append(Check(section.__name__.strip("_"), "warn",
                                f"the check itself failed: {type(exc).__name__}: {exc}",
                                "report this as a gpumesh bug"))
    return checks


# --- the checks -----------------------------------------------------------------------------

def _python(config: Config) -> Iterator[Check]:
    version = ".".join(map(str, sys.version_info[:3]))
    yield Check("python", "ok", f"Python {version}, gpumesh {__version__}",
                details={"python": version, "gpumesh": __version__,
                         "executable": sys.executable})


def _gpus(config: Config) -> Iterator[Check]:
    from ..probes import GPU_PROBES, ProbeUnavailable
    on_bus = _gpus_on_pci_bus()
    reasons: dict[str, str] = {}
    found: list[dict[str, Any]] = []
    chosen = None
    wanted = [config.gpu_probe] if config.gpu_probe in GPU_PROBES else list(GPU_PROBES)
    if config.gpu_probe != "cpu":
        for name in wanted:
            try:
                probe = GPU_PROBES[name](gpus=None)        # type: ignore[call-arg]
            except ProbeUnavailable as exc:
                reasons[name] = str(exc)
                continue
            try:
                found = [g.to_dict() for g in probe.inventory().gpus]
                chosen = name
            finally:
                probe.close()
            break
    drivers = _driver_versions()
    details = {"probe": chosen or "cpu", "gpus": found, "pci_devices": on_bus,
               "drivers": drivers, "passed_over": reasons}
    if found:
        names = ", ".join(sorted({g["name"] for g in found}))
        driver = f", driver {drivers[chosen]}" if chosen in drivers else ""
        yield Check("gpus", "ok", f"{len(found)} × {names} ({chosen}{driver})", details=details)
    missed = sorted({vendor for vendor in on_bus.values() if vendor != chosen})
    for vendor in missed:
        yield Check(f"gpus:{vendor}", "fail",
                    f"{vendor} GPU(s) on the PCI bus, but gpumesh cannot use them: "
                    f"{reasons.get(vendor, 'not probed (--gpu-probe)')}",
                    _INSTALL_HINT.get(vendor, f"install the {vendor} driver and its "
                                              f"management tool"), details)
    if not found and not missed:
        summary = ("none: this node serves models on its CPU" if config.gpu_probe != "cpu"
                   else "not looked for (--gpu-probe cpu): this node serves on its CPU")
        yield Check("gpus", "info", summary, None, details)


def _gpus_on_pci_bus() -> dict[str, str]:
    """PCI address → vendor for display and accelerator devices of the known vendors."""
    found = {}
    for device in sorted(Path("/sys/bus/pci/devices").glob("*")):
        try:
            pci_class = (device / "class").read_text().strip()
            vendor = (device / "vendor").read_text().strip()
        except OSError:
            continue
        if pci_class[:4] in ("0x03", "0x12") and vendor in _PCI_VENDORS:
            found[device.name] = _PCI_VENDORS[vendor]
    return found


def _driver_versions() -> dict[str, str]:
    versions = {}
    try:
        line = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
        versions["nvidia"] = next(w for w in line.split() if w[:1].isdigit() and "." in w)
    except (OSError, IndexError, StopIteration):
        pass
    try:
        versions["amd"] = Path("/sys/module/amdgpu/version").read_text().strip()
    except OSError:
        pass
    return versions


def _ports(config: Config) -> Iterator[Check]:
    ours = _running_daemon(config)
    for name, flag, host, port in (("api port", "--api-port", config.host, config.api_port),
                                   ("raft port", "--raft-port", config.raft_host,
                                    config.raft_port)):
        details = {"host": host, "port": port}
        problem = port_problem(host, port)
        if problem is None:
            yield Check(name, "ok", f"{host}:{port} is free", details=details)
        elif ours is not None and ours.get(name) == port:
            yield Check(name, "ok", f"{host}:{port} is this data dir's running gpumesh "
                                    f"(pid {ours['pid']})", details={**details, "pid": ours["pid"]})
        else:
            yield Check(name, "fail", f"cannot listen on {host}:{port}: {problem}",
                        f"find the program with `ss -ltnp 'sport = :{port}'` and stop it, or "
                        f"pass {flag} (or set GPUMESH_{flag[2:].upper().replace('-', '_')})",
                        details)


def _running_daemon(config: Config) -> dict[str, Any] | None:
    """The gpumesh that holds this data dir now (its pid and ports), if any."""
    data = DataDir(config.data_dir)
    endpoint = data.read_endpoint()
    try:
        pid = int((config.data_dir / "lock").read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    if b"gpumesh" not in cmdline or endpoint is None or endpoint.get("pid") != pid:
        return None
    raft = str(endpoint.get("raft_address", "")).rsplit(":", 1)[-1]
    return {"pid": pid, "api port": int(str(endpoint["connect_url"]).rsplit(":", 1)[-1]),
            "raft port": int(raft) if raft.isdigit() else None, "url": endpoint["connect_url"]}


def _mdns(config: Config) -> Iterator[Check]:
    if config.discovery == "off":
        yield Check("mdns", "info", "off (--discovery off): other nodes join with "
                                    "`gpumesh up --join HOST --token TOKEN`")
        return
    from ..discovery import DiscoveryError, mdns_address
    try:
        import zeroconf  # noqa: F401  (a dependency; a broken install shows here)
    except ImportError as exc:
        yield Check("mdns", "fail", f"zeroconf cannot be imported: {exc}",
                    "reinstall gpumesh (`pip install --force-reinstall gpumesh`)")
        return
    try:
        address = mdns_address(config.mdns_interface, config.advertise)
    except DiscoveryError as exc:
        yield Check("mdns", "fail", str(exc), "pass --mdns-interface IFACE, or --discovery off "
                                              "and join with --join")
        return
    details = {"address": address, "interface": config.mdns_interface}
    problem = _udp_bind_problem(address)
    if problem:
        yield Check("mdns", "fail", f"UDP port {_MDNS_PORT} cannot be shared: {problem}",
                    "another mDNS responder holds it exclusively; stop it, or use "
                    "--discovery off and --join", details)
    elif address.startswith("127."):
        yield Check("mdns", "info", f"on loopback ({address}): only nodes on this machine find "
                                    f"each other", "for a cluster of machines, start with "
                    "--host 0.0.0.0 (or --advertise ADDRESS) so mDNS uses the LAN; where "
                    "multicast is blocked (most clouds), use --discovery off and --join",
                    details)
    else:
        yield Check("mdns", "ok", f"can listen on {address}:{_MDNS_PORT} (multicast must also "
                                  f"pass the network: clouds usually block it, use --join there)",
                    details=details)


def _udp_bind_problem(address: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(("", _MDNS_PORT))           # how zeroconf binds its listener
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _disk_and_memory(config: Config) -> Iterator[Check]:
    existing = config.data_dir
    while not existing.exists():
        existing = existing.parent
    usage = shutil.disk_usage(existing)
    details = {"path": str(existing), "free_bytes": usage.free, "total_bytes": usage.total}
    free = f"{usage.free / _GIB:.1f} GiB free of {usage.total / _GIB:.1f} GiB at {existing}"
    if usage.free < _DISK_FAIL_BYTES:
        yield Check("disk", "fail", free, "free space, or pass --data-dir on a larger disk "
                                          "(models are downloaded into it)", details)
    elif usage.free < _DISK_WARN_BYTES:
        yield Check("disk", "warn", free, "models are downloaded into the data dir: a 7-8B "
                    "model needs ~5 GiB; pass --data-dir on a larger disk", details)
    else:
        yield Check("disk", "ok", free, details=details)
    meminfo = _meminfo()
    if meminfo:
        total, available = meminfo.get("MemTotal", 0), meminfo.get("MemAvailable", 0)
        yield Check("memory", "ok" if available > 2 * _GIB else "warn",
                    f"{available / _GIB:.1f} GiB available of {total / _GIB:.1f} GiB",
                    None if available > 2 * _GIB else
                    "little memory is free: CPU models need their weights in RAM",
                    {"total_bytes": total, "available_bytes": available,
                     "reserved_bytes": config.reserved_memory_mib << 20})


def _meminfo() -> dict[str, int]:
    values = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return values


def _data_dir(config: Config) -> Iterator[Check]:
    path = config.data_dir
    details: dict[str, Any] = {"path": str(path)}
    if not path.exists():
        parent = next(p for p in path.parents if p.exists())
        if os.access(parent, os.W_OK):
            yield Check("data dir", "ok", f"{path} will be made on first start", details=details)
        else:
            yield Check("data dir", "fail", f"{path} does not exist and {parent} is not "
                                            f"writable by this user",
                        f"create it (`mkdir -p {path}` as its owner) or pass --data-dir",
                        details)
        return
    mode = path.stat().st_mode & 0o777
    details["mode"] = oct(mode)
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        yield Check("data dir", "fail", f"{path} is not writable by this user",
                    f"run as its owner, or pass --data-dir", details)
    elif mode & 0o077:
        yield Check("data dir", "warn", f"{path} is readable by others (mode {oct(mode)}): it "
                                        f"holds the cluster secret and the admin key",
                    f"chmod 700 {path}", details)
    else:
        running = _running_daemon(config)
        state = f"in use by gpumesh pid {running['pid']}" if running else "not in use"
        yield Check("data dir", "ok", f"{path} ({state})", details=details)


def _engines(config: Config) -> Iterator[Check]:
    from gpumesh.backends.registry import describe_backends
    from gpumesh.backends.versions import BackendVersions, backends_dir
    backends = describe_backends(BackendVersions(backends_dir(config.data_dir)))
    usable = [b for b in backends if b["available"]]
    for b in backends:
        devices = ", ".join((["cpu"] if b["runs_on_cpu"] else []) + list(b["gpu_vendors"]))
        details = {k: b.get(k) for k in ("name", "version", "available", "runs_on_cpu",
                                         "gpu_vendors", "model_formats", "problem")}
        if b["available"]:
            version = b["version"] if b["version"] not in (None, "-") else (
                "(installed on first use)" if b.get("installable") or b["version"] is None
                else "")
            yield Check(f"engine:{b['name']}", "ok",
                        f"{b['name']} {version}".rstrip() + (f" ({devices})" if devices else ""),
                        details=details)
        elif b["name"] == "llama.cpp":          # the engine that ships with gpumesh
            yield Check(f"engine:{b['name']}", "fail", f"the built-in engine cannot run: "
                        f"{b['problem']}", _engine_fix(str(b["problem"])), details)
        else:
            yield Check(f"engine:{b['name']}", "info", f"{b['name']}: not available here",
                        str(b["problem"]), details)
    if not usable:
        yield Check("engines", "fail", "no engine can run a model on this machine",
                    "reinstall gpumesh (its llama.cpp engine comes with it: `pip install "
                    "--force-reinstall gpumesh`)")


def _engine_fix(problem: str) -> str:
    if "libgomp" in problem:
        return ("install the OpenMP runtime llama.cpp is built with: `apt-get install libgomp1` "
                "(Debian, Ubuntu), `dnf install libgomp` (Fedora, RHEL)")
    return "reinstall gpumesh (`pip install --force-reinstall gpumesh`); the log line above " \
           "says what the engine lacked"


def _containers(config: Config) -> Iterator[Check]:
    socket_path = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if socket_path.startswith("unix://") and not Path(socket_path[7:]).exists():
        yield Check("containers", "info", "no docker daemon: engines deployed with --image "
                                          "cannot run here", "install docker (and the NVIDIA "
                    "container toolkit on GPU nodes) to run engines from images")
        return
    try:
        import docker
        client = docker.DockerClient(base_url=socket_path, timeout=3)
        version = client.version().get("Version", "?")
        client.close()
    except Exception as exc:          # docker's errors are many; each means "not usable"
        yield Check("containers", "warn", f"docker at {socket_path} does not answer: {exc}",
                    "start dockerd, or check this user may use its socket (group docker)")
        return
    yield Check("containers", "ok", f"docker {version} at {socket_path}",
                details={"docker_host": socket_path, "version": version})


def _local_node(config: Config) -> Iterator[Check]:
    endpoint = DataDir(config.data_dir).read_endpoint()
    if endpoint is None:
        yield Check("node", "info", f"no gpumesh has run with {config.data_dir} yet",
                    "start one: `gpumesh up`")
        return
    url = str(endpoint["connect_url"])
    try:
        with urllib.request.urlopen(url + "/api/health", timeout=3) as reply:
            health = json.loads(reply.read() or b"{}")
    except (OSError, ValueError):
        yield Check("node", "info", f"not running (it last listened at {url})",
                    "start it: `gpumesh up`", {"url": url})
        return
    version = health.get("version", "?") if isinstance(health, dict) else "?"
    yield Check("node", "ok", f"running at {url} (gpumesh {version})",
                details={"url": url, "version": version})


# --- the command ----------------------------------------------------------------------------

_DOCTOR_FLAGS = ("data_dir", "host", "raft_host", "api_port", "raft_port", "gpu_probe",
                 "discovery", "mdns_interface", "advertise")


def cmd_doctor(args: argparse.Namespace) -> int:
    try:
        config = Config.from_sources({name: getattr(args, name) for name in _DOCTOR_FLAGS})
    except ConfigError as exc:
        raise CliError(str(exc), Exit.USAGE) from None
    checks = run_checks(config)
    failed = [c for c in checks if c.status == "fail"]
    warned = [c for c in checks if c.status == "warn"]
    report = {"ok": not failed, "problems": len(failed), "warnings": len(warned),
              "config": {"data_dir": str(config.data_dir), "host": config.host,
                         "api_port": config.api_port, "raft_port": config.raft_port,
                         "discovery": config.discovery, "gpu_probe": config.gpu_probe},
              "checks": [asdict(c) for c in checks]}
    print_result(args, report, lambda r: _human(checks, failed, warned))
    return Exit.ERROR if failed else Exit.OK


def _human(checks: list[Check], failed: list[Check], warned: list[Check]) -> str:
    colour = colour_enabled()
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{status_cell(c.status).render(colour)}{' ' * (5 - len(c.status))} "
                     f"{c.name:<{width}}  {c.summary}")
        if c.fix and c.status in ("warn", "fail", "info"):
            arrow = Styled("→", "dim").render(colour)
            lines.append(f"{'':5} {'':<{width}}  {arrow} {c.fix}")
    verdict = (f"{len(failed)} problem(s)" if failed else "no problems") + \
              (f", {len(warned)} warning(s)" if warned else "")
    lines.append(f"\n{verdict}")
    return "\n".join(lines)


def register(sub: Any) -> None:
    doctor = sub.add_parser(
        "doctor", help="check this machine: GPUs and drivers, ports, mDNS, disk, engines",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog="Reads the same GPUMESH_* variables as `gpumesh up`. Exit status 1 when a "
               "check fails.", formatter_class=argparse.RawDescriptionHelpFormatter)
    doctor.add_argument("--data-dir", help="the data dir to check (default as `up`)")
    doctor.add_argument("--host", help="the address `up` will listen on (default 127.0.0.1)")
    doctor.add_argument("--raft-host", help="the Raft port's address (default: --host)")
    doctor.add_argument("--api-port", type=int, help="API port to check (default 8470)")
    doctor.add_argument("--raft-port", type=int, help="Raft port to check (default 8471)")
    doctor.add_argument("--gpu-probe", help="which accelerators to look for (default auto)")
    doctor.add_argument("--discovery", choices=["mdns", "off"], help="mDNS on or off "
                        "(default mdns)")
    doctor.add_argument("--mdns-interface", metavar="IFACE", help="the interface mDNS would use")
    doctor.add_argument("--advertise", metavar="ADDRESS", help="the address peers would use")
    add_json_flag(doctor)
    name_values(doctor)
    doctor.set_defaults(command="doctor", handler=cmd_doctor)
