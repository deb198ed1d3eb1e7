"""Counting bytes on the wire: a private network namespace, its loopback, free ports on it.

A benchmark that re-executes itself under `unshare --net --mount` (root) has a loopback of its
own: nothing but its own processes talk there, so the loopback's counters in /proc/net/dev
(which is per namespace) count exactly their traffic, headers and ACKs included.
/sys/class/net/lo/statistics still shows the host's after `unshare -n` unless sysfs is
remounted, so the counters are read from /proc/net/dev.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

NETNS_ENV = "GOSGD_BENCH_NETNS"  # set in the re-executed process, which runs in its own namespace
SHARED_LOOPBACK = "shared loopback, counts include other traffic"
PRIVATE_LOOPBACK = "private network namespace (unshare --net --mount), loopback only"


def loopback_bytes() -> tuple[int, int]:
    """(rx, tx) bytes of `lo` in /proc/net/dev of the calling process's network namespace."""
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        name, _, fields = line.partition(":")
        if name.strip() == "lo":
            values = fields.split()
            return int(values[0]), int(values[8])
    raise RuntimeError("no lo interface in /proc/net/dev")


def in_private_namespace() -> bool:
    """True in the process that enter_private_namespace() re-executed."""
    return os.environ.get(NETNS_ENV) == "1"


def enter_private_namespace(who: str) -> None:
    """Re-execute this command (python -m ... and its arguments) in a new network and mount
    namespace (does not return), or exit with one line, naming `who`, saying why that is
    impossible here."""
    why = None
    if os.geteuid() != 0:
        why = "it needs root"
    elif shutil.which("unshare") is None:
        why = "`unshare` (util-linux) is not installed"
    else:
        probe = subprocess.run(
            ["unshare", "--net", "--mount", "true"], capture_output=True, text=True, timeout=30
        )
        if probe.returncode != 0:
            why = probe.stderr.strip() or f"unshare exited {probe.returncode}"
    if why is not None:
        sys.exit(
            f"{who}: cannot count bytes in a private network namespace ({why}); "
            "run as root, or pass --no-netns to count the shared host loopback"
        )
    sys.stdout.flush()
    argv = ["unshare", "--net", "--mount", sys.executable, *sys.orig_argv[1:]]
    os.execvpe("unshare", argv, dict(os.environ, **{NETNS_ENV: "1"}))


def bring_up_loopback(who: str) -> None:
    """Inside the new namespace: set lo up (the ioctl `ip link set lo up` makes, so iproute2
    need not be installed), and check that lo is all there is."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1  # <linux/sockios.h>, <net/if.h>
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sh14x", b"lo", 0)  # struct ifreq: name, flags
        _, flags = struct.unpack("16sh14x", fcntl.ioctl(sock, siocgifflags, request))
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sh14x", b"lo", flags | iff_up))
    names = [
        line.partition(":")[0].strip()
        for line in Path("/proc/net/dev").read_text().splitlines()[2:]
    ]
    if names != ["lo"]:
        sys.exit(f"{who}: {NETNS_ENV} is set but this namespace has {names}, not lo only")


def free_ports(count: int) -> tuple[int, ...]:
    """`count` distinct TCP ports free on 127.0.0.1, bound together and then released (in a
    private namespace nothing else can take them before the workers bind them)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return tuple(sock.getsockname()[1] for sock in socks)
