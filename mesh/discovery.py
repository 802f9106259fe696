"""Zero-config discovery: every daemon advertises itself by mDNS, and a newcomer holding a
token finds a member of the token's cluster without `--join`.

The service is `_gpumesh._tcp.local.`, one per node, named by node id; its TXT record holds
the node id, the cluster id and the ports, never a secret (a token proves membership, not
the advertisement). mDNS runs on exactly one interface: `--mdns-interface`, else the one
holding the advertised address. Bound to 127.0.0.1 it stays on loopback; it never
multicasts out of every interface the machine has.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import logging
import socket
import struct
from typing import Any

from zeroconf import IPVersion, ServiceInfo, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

__all__ = ["Discovery", "DiscoveryError", "SERVICE_TYPE", "interface_address"]

log = logging.getLogger("gpumesh.discovery")

SERVICE_TYPE = "_gpumesh._tcp.local."
_SIOCGIFADDR = 0x8915


class DiscoveryError(Exception):
    """mDNS cannot run as configured (no such interface, no address on it)."""


def interface_address(name: str) -> str:
    """The IPv4 address of interface `name` (Linux ioctl; no external tool)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR,
                                 struct.pack("256s", name.encode()[:15]))
        except OSError as exc:
            raise DiscoveryError(f"--mdns-interface {name}: {exc.strerror or exc} (no such "
                                 f"interface, or it has no IPv4 address)") from None
    return socket.inet_ntoa(packed[20:24])


class Discovery:
    """One zeroconf instance on one interface: advertises this node, finds members."""

    def __init__(self, address: str) -> None:
        self._address = address
        self._zeroconf: AsyncZeroconf | None = None

    async def start(self) -> None:
        self._zeroconf = AsyncZeroconf(interfaces=[self._address], ip_version=IPVersion.V4Only)

    async def advertise(self, *, node_id: str, node_name: str, cluster_id: str,
                        api_port: int, raft_port: int) -> None:
        assert self._zeroconf is not None
        info = ServiceInfo(
            SERVICE_TYPE, f"{node_id}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(self._address)], port=api_port,
            properties={"node_id": node_id, "cluster_id": cluster_id, "name": node_name,
                        "api_port": str(api_port), "raft_port": str(raft_port)},
            server=f"gpumesh-{node_id}.local.")
        await self._zeroconf.async_register_service(info, allow_name_change=True)
        log.info("advertising node %s of cluster %s by mDNS on %s", node_id, cluster_id,
                 self._address)

    async def close(self) -> None:
        if self._zeroconf is not None:
            try:
                await self._zeroconf.async_unregister_all_services()
            finally:
                await self._zeroconf.async_close()
                self._zeroconf = None

    async def find_members(self, cluster_id: str, timeout: float = 4.0) -> list[str]:
        """API urls of the members of `cluster_id` that answer within `timeout`; returns as
        soon as one is found (then a moment more, to collect others answering together)."""
        assert self._zeroconf is not None
        zc = self._zeroconf.zeroconf
        found: list[str] = []
        first = asyncio.Event()
        pending: set[asyncio.Task[None]] = set()

        async def resolve(name: str) -> None:
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if not await info.async_request(zc, 1500):
                return
            props = _text_properties(info.properties)
            addresses = info.parsed_addresses(IPVersion.V4Only)
            if props.get("cluster_id") != cluster_id or not addresses:
                return
            url = f"http://{addresses[0]}:{props.get('api_port', info.port)}"
            if url not in found:
                found.append(url)
                first.set()

        def on_change(zeroconf: Any, service_type: str, name: str,
                      state_change: ServiceStateChange) -> None:
            if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
                task = asyncio.ensure_future(resolve(name))
                pending.add(task)
                task.add_done_callback(pending.discard)

        browser = AsyncServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        try:
            try:
                await asyncio.wait_for(first.wait(), timeout)
                await asyncio.sleep(0.2)
            except asyncio.TimeoutError:
                pass
        finally:
            await browser.async_cancel()
            for task in list(pending):
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        return found


def mdns_address(interface: str | None, advertised: str) -> str:
    """The address mDNS binds to: the named interface's, else the advertised one."""
    if interface:
        return interface_address(interface)
    if ipaddress.ip_address(advertised).version != 4:
        raise DiscoveryError(f"mDNS needs an IPv4 address; {advertised} is not one "
                             f"(use --discovery off and --join)")
    return advertised


def _text_properties(properties: dict[bytes, bytes | None]) -> dict[str, str]:
    return {k.decode(errors="replace"): (v or b"").decode(errors="replace")
            for k, v in properties.items()}
