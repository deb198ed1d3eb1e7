"""Finding peers on the LAN: mDNS / DNS-SD with python-zeroconf, and which address to advertise.

Each node registers the service `<node id>._gosgd._tcp.local.` with TXT records `id` (node id),
`cluster` and `proto` (wire protocol version), and browses for the others. Services of another
cluster or protocol are ignored. zeroconf runs on its own threads; found peers reach the node
through a callback that only updates the peer table, so the training thread never waits here.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import Protocol

import ifaddr
from zeroconf import (
    InterfaceChoice,
    IPVersion,
    NonUniqueNameException,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

__all__ = [
    "SERVICE_TYPE",
    "Discovery",
    "DiscoveryFactory",
    "MdnsDiscovery",
    "advertise_host",
    "interface_ipv4",
]

log = logging.getLogger(__name__)

#: DNS-SD service type of a gosgd node.
SERVICE_TYPE = "_gosgd._tcp.local."
#: Milliseconds to wait for a found service's SRV/TXT/A records.
RESOLVE_TIMEOUT_MS = 3000


def interface_ipv4(name_or_ip: str) -> str:
    """The IPv4 address of an interface given by name (eth0) or by one of its addresses."""
    for adapter in ifaddr.get_adapters():
        ips = [ip.ip for ip in adapter.ips if isinstance(ip.ip, str)]
        if name_or_ip in ips:
            return name_or_ip
        if adapter.nice_name == name_or_ip or adapter.name == name_or_ip:
            if ips:
                return ips[0]
            raise ValueError(f"interface {name_or_ip} has no IPv4 address")
    raise ValueError(f"no interface named {name_or_ip!r} (see `ip addr`)")


def advertise_host(listen_host: str, interface: str | None) -> str:
    """The host peers should dial when the server listens on `listen_host`.

    A concrete listen address is its own answer. For a wildcard (0.0.0.0, ::, empty) it is
    the IPv4 of `interface` when given, else the first non-loopback IPv4 of this host, else
    127.0.0.1.
    """
    if listen_host not in ("", "0.0.0.0", "::", "[::]"):
        return listen_host
    if interface:
        return interface_ipv4(interface)
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                return ip.ip
    return "127.0.0.1"


class Discovery(Protocol):
    """What membership starts and closes: MdnsDiscovery, here or in the network process."""

    def start(self) -> None: ...

    def close(self) -> None: ...


#: Makes a Discovery from MdnsDiscovery's arguments: (node_id, cluster, protocol_version,
#: address, on_found, interface).
DiscoveryFactory = Callable[
    [str, str, int, tuple[str, int], Callable[[str, str], None], str | None], Discovery
]


class MdnsDiscovery:
    """Registers this node over mDNS and reports the nodes of its cluster that it finds.

    `on_found(address, node_id)` is called from zeroconf's threads for every matching service
    that appears or changes. Use `start()` / `close()`, or `with`.
    """

    def __init__(
        self,
        node_id: str,
        cluster: str,
        protocol_version: int,
        address: tuple[str, int],
        on_found: Callable[[str, str], None],
        interface: str | None = None,
    ) -> None:
        self.node_id = node_id
        self.cluster = cluster
        self.protocol_version = protocol_version
        self.host, self.port = address
        self._on_found = on_found
        self._interfaces = [interface_ipv4(interface)] if interface else InterfaceChoice.All
        self._zc: Zeroconf | None = None
        self._browser: ServiceBrowser | None = None
        self._info: ServiceInfo | None = None
        self._registered = threading.Event()

    def start(self) -> None:
        """Start browsing at once and register in the background (probing takes ~1.5 s)."""
        self._zc = Zeroconf(interfaces=self._interfaces, ip_version=IPVersion.V4Only)
        self._info = ServiceInfo(
            SERVICE_TYPE,
            f"{_label(self.node_id)}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(self.host)],
            port=self.port,
            properties={
                "id": self.node_id,
                "cluster": self.cluster,
                "proto": str(self.protocol_version),
            },
            server=f"{_label(self.node_id)}.local.",
        )
        self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._on_change])
        threading.Thread(target=self._register, name="gosgd-mdns-register", daemon=True).start()

    def _register(self) -> None:
        assert self._zc is not None and self._info is not None
        try:
            self._zc.register_service(self._info)
        except NonUniqueNameException:
            log.warning(
                "mDNS: another node already uses the name %s; not advertising", self.node_id
            )
            return
        except Exception as err:  # zeroconf closed while probing, interface gone, ...
            log.warning("mDNS: could not register: %s", err)
            return
        self._registered.set()
        log.info("mDNS: advertising %s at %s:%d", self.node_id, self.host, self.port)

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change not in (ServiceStateChange.Added, ServiceStateChange.Updated):
            return  # a vanished service is detected by failed calls, not trusted from mDNS
        info = zeroconf.get_service_info(service_type, name, timeout=RESOLVE_TIMEOUT_MS)
        if info is None:
            return
        props = {
            k.decode(errors="replace"): (v or b"").decode(errors="replace")
            for k, v in info.properties.items()
        }
        if props.get("cluster") != self.cluster:
            return
        if props.get("proto") != str(self.protocol_version):
            log.info("mDNS: ignoring %s: protocol %s", name, props.get("proto"))
            return
        node_id = props.get("id", "")
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if not node_id or node_id == self.node_id or not addresses or not info.port:
            return
        self._on_found(f"{addresses[0]}:{info.port}", node_id)

    def close(self) -> None:
        """Unregister (peers see the goodbye) and stop zeroconf."""
        if self._zc is None:
            return
        zc, self._zc = self._zc, None
        if self._browser is not None:
            self._browser.cancel()
        if self._info is not None and self._registered.is_set():
            try:
                zc.unregister_service(self._info)
            except Exception as err:
                log.debug("mDNS: unregister failed: %s", err)
        zc.close()

    def __enter__(self) -> MdnsDiscovery:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _label(node_id: str) -> str:
    """A DNS label (<= 63 bytes) from a node id."""
    label = "".join(c if c.isalnum() or c in "-_" else "-" for c in node_id)
    return label[:63] or "node"
