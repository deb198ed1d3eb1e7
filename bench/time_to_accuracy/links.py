"""Shaped links (--link-mbit): every worker a host of its own, on a bridge, at N Mbit/s.

The benchmark already runs in a private network namespace (bench.netns). There, ShapedLinks
makes one named namespace per worker, each with one veth interface (eth0, 10.77.0.<rank + 1>)
whose other end is plugged into a bridge in the benchmark's namespace, and shapes both ends
with `tbf` to the rate: what a worker sends and what it receives each pass a link of N Mbit/s,
as between hosts on a switch (this kernel has tbf, not netem: no added delay). A worker process
enters its namespace first thing (enter()), so its sockets, gloo's and gRPC's, live there.

Bytes are counted on the links: a worker reads its own eth0 (worker_tx_bytes()), the parent the
bridge ends (link_bytes()), which see exactly what the workers send and receive. close() (or
leaving the `with` block, also on an error) deletes every namespace and link it made; the
benchmark's own namespace takes the rest with it when the benchmark exits.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

__all__ = [
    "IFNAME",
    "SHAPED_LINKS",
    "ShapedLinks",
    "enter",
    "host",
    "link_bytes",
    "worker_tx_bytes",
]

IFNAME = "eth0"  # each worker's interface, in its namespace
SUBNET = "10.77.0"  # the workers' addresses: SUBNET.<rank + 1>/24
BRIDGE = "ttabr0"  # the switch, in the benchmark's namespace
#: tbf's queue: packets wait at most this long for tokens before they are dropped, ms.
TBF_LATENCY_MS = 50
#: tbf's bucket: this long at the link's rate, at least two 64 KiB GSO packets, seconds.
TBF_BURST_S = 0.004
_CLONE_NEWNET = 0x40000000
#: How the benchmark's JSON and tables say bytes were counted with shaped links.
SHAPED_LINKS = "each worker in its own network namespace on a bridge, its veth shaped (tbf)"


def namespace(rank: int) -> str:
    """The name of worker `rank`'s namespace (unique to this benchmark process)."""
    return f"gosgd-tta{os.getpid()}-w{rank}"


def host(rank: int) -> str:
    """Worker `rank`'s IPv4 address on the bridge."""
    return f"{SUBNET}.{rank + 1}"


def _run(*cmd: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {result.stderr.strip()}")


def _port(rank: int) -> str:
    return f"ttagw{rank}"  # the bridge's end of worker `rank`'s link


class ShapedLinks:
    """`count` worker namespaces on a bridge, each link shaped to `mbit` Mbit/s both ways.

    Create it only inside the benchmark's private namespace: the bridge and the links' ends
    live in the namespace of the calling process.
    """

    def __init__(self, count: int, mbit: float) -> None:
        self.count = count
        self.mbit = mbit
        self._namespaces: list[str] = []
        self._links: list[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        self._links.append(BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        for rank in range(self.count):
            ns = namespace(rank)
            _run("ip", "netns", "add", ns)
            self._namespaces.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            port = _port(rank)
            _run("ip", "link", "add", port, "type", "veth", "peer", "name", IFNAME, "netns", ns)
            self._links.append(port)
            _run("ip", "link", "set", port, "master", BRIDGE)
            _run("ip", "link", "set", port, "up")
            _run("ip", "-n", ns, "addr", "add", f"{host(rank)}/24", "dev", IFNAME)
            _run("ip", "-n", ns, "link", "set", IFNAME, "up")
            for where in ([], ["ip", "netns", "exec", ns]):
                dev = port if not where else IFNAME
                _run(*where, "tc", "qdisc", "add", "dev", dev, "root", *self._tbf())

    def _tbf(self) -> list[str]:
        rate_bytes = self.mbit * 1e6 / 8
        burst = max(int(rate_bytes * TBF_BURST_S), 2 * (64 << 10) + 2 * 1514)
        return [
            "tbf",
            "rate",
            f"{self.mbit:g}mbit",
            "burst",
            str(burst),
            "latency",
            f"{TBF_LATENCY_MS}ms",
        ]

    def close(self) -> None:
        """Delete every namespace and link made here (safe to call twice)."""
        while self._namespaces:
            subprocess.run(["ip", "netns", "del", self._namespaces.pop()], capture_output=True)
        while self._links:  # a veth goes with either end; the bridge last
            subprocess.run(["ip", "link", "del", self._links.pop()], capture_output=True)

    def __enter__(self) -> ShapedLinks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def enter(name: str) -> None:
    """Move the calling process into the namespace `name` (call before any thread starts:
    threads started later inherit it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _dev_bytes(name: str) -> tuple[int, int]:
    """(rx, tx) bytes of interface `name` in the calling process's namespace."""
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        dev, _, fields = line.partition(":")
        if dev.strip() == name:
            values = fields.split()
            return int(values[0]), int(values[8])
    raise RuntimeError(f"no interface {name} in /proc/net/dev")


def worker_tx_bytes() -> int:
    """Bytes the calling worker has sent on its link (in its namespace)."""
    return _dev_bytes(IFNAME)[1]


def link_bytes(count: int) -> tuple[int, int]:
    """(rx, tx) bytes of all `count` workers together, as they see them, read at the bridge's
    ends of their links (the benchmark's namespace)."""
    rx = tx = 0
    for rank in range(count):
        port_rx, port_tx = _dev_bytes(_port(rank))
        rx, tx = rx + port_tx, tx + port_rx  # what the port sends, the worker receives
    return rx, tx
