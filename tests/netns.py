"""Private network namespaces for tests: mDNS and multi-host traffic that never leaves them.

`Lab` creates namespaces named after the test run, and removes them (killing whatever runs
inside) on close. Two shapes:
- `lab.loopback_host()`: one namespace whose loopback carries multicast, so every process in
  it sees every other one over mDNS on 127.0.0.1;
- `lab.lan(n)`: n "hosts", each a namespace with one veth interface (eth0, 10.213.0.x/24)
  plugged into a bridge that lives in a namespace of its own (the "switch").
Needs root and iproute2; `netns_unavailable()` says why not, for a skip reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid

import pytest

SUBNET = "10.213.0"  # addresses exist only inside the lab's namespaces


def _ip(*args: str, netns: str | None = None) -> None:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {result.stderr.strip()}")


def netns_unavailable() -> str | None:
    """None when namespaces can be made here, else the reason (for pytest.skip)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"gosgd-probe-{uuid.uuid4().hex[:8]}"
    try:
        _ip("netns", "add", probe)
    except RuntimeError as err:
        return f"cannot create a network namespace: {err}"
    _ip("netns", "del", probe)
    return None


class Lab:
    """A set of namespaces created for one test; close() removes them all."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.namespaces: list[str] = []

    def _add(self, role: str) -> str:
        name = f"gosgd-{self.tag}-{role}"
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("link", "set", "lo", "up", netns=name)
        return name

    def loopback_host(self) -> str:
        """One namespace where mDNS works over 127.0.0.1."""
        ns = self._add("lo")
        _ip("link", "set", "lo", "multicast", "on", netns=ns)
        _ip("route", "add", "224.0.0.0/4", "dev", "lo", netns=ns)
        return ns

    def lan(self, n: int) -> list[tuple[str, str]]:
        """n hosts on one bridge; returns (namespace, IPv4 address) per host."""
        switch = self._add("sw")
        _ip("link", "add", "br0", "type", "bridge", netns=switch)
        # mDNS is link-local multicast: let the bridge flood it without IGMP snooping
        _ip("link", "set", "br0", "type", "bridge", "mcast_snooping", "0", netns=switch)
        _ip("link", "set", "br0", "up", netns=switch)
        hosts = []
        for i in range(n):
            ns = self._add(f"h{i}")
            address = f"{SUBNET}.{10 + i}"
            _ip("link", "add", f"port{i}", "type", "veth", "peer", "name", "eth0", "netns", ns,
                netns=switch)  # fmt: skip
            _ip("link", "set", f"port{i}", "master", "br0", netns=switch)
            _ip("link", "set", f"port{i}", "up", netns=switch)
            _ip("addr", "add", f"{address}/24", "dev", "eth0", netns=ns)
            _ip("link", "set", "eth0", "up", netns=ns)
            _ip("route", "add", "224.0.0.0/4", "dev", "eth0", netns=ns)
            hosts.append((ns, address))
        return hosts

    @staticmethod
    def exec_prefix(ns: str) -> list[str]:
        """Prefix a command with this to run it inside namespace `ns`."""
        return ["ip", "netns", "exec", ns]

    def close(self) -> None:
        """Kill every process left in the lab's namespaces, then delete them."""
        for ns in self.namespaces:
            pids = subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.namespaces.clear()


#: Why network-namespace tests cannot run here (None when they can), and their skip marker.
NETNS_SKIP = netns_unavailable()
needs_netns = pytest.mark.skipif(NETNS_SKIP is not None, reason=NETNS_SKIP or "")
