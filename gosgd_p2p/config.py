"""Configuration of a node and of the built-in trainer: defaults in one place, one line each.

The CLI maps flags onto these dataclasses and nothing else; the Python API takes them directly.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass, field

from gosgd_p2p.wire import CHUNK_BYTES, ENCODINGS, MAX_CHUNK_BYTES, MAX_WEIGHT

__all__ = [
    "DATASETS",
    "MODELS",
    "SCHEDULES",
    "NodeConfig",
    "TrainConfig",
    "cluster_seed",
    "default_node_id",
    "parse_address",
    "text_seed",
]


def text_seed(text: str) -> int:
    """A 32-bit seed derived from `text`, the same in every process (unlike hash())."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def cluster_seed(cluster: str) -> int:
    """The model-initialisation seed all founders of `cluster` share (from its name)."""
    return text_seed(f"cluster:{cluster}")


def default_node_id() -> str:
    """A node id unique enough for a LAN: host name, process id and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(2).hex()}"


def parse_address(text: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:port") into (host, port); ValueError if malformed."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"address {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


#: Push schedules (gosgd_p2p.algorithm.PushSchedule), here so that the CLI can check its flag
#: without importing torch: the paper's coin per step, a Poisson clock in seconds at the
#: cluster's pace, a per-step coin made stronger when the weight is above its share.
SCHEDULES: tuple[str, ...] = ("step", "clock", "weight")


@dataclass
class NodeConfig:
    """How a node talks to its peers, and how it gossips."""

    @property
    def mdns_enabled(self) -> bool:
        """mDNS is on when asked for, or by default when no seed peer is given."""
        return self.mdns if self.mdns is not None else not self.peers

    listen: str = "127.0.0.1:0"  # HOST:PORT of the gRPC server; port 0 picks a free port
    advertise: str | None = None  # HOST:PORT peers should use; None: the bound listen address
    peers: list[str] = field(default_factory=list)  # seed list of HOST:PORT
    node_id: str = field(default_factory=default_node_id)  # unique per node; free text <= 128 B
    cluster: str = "gosgd"  # nodes of another cluster name are refused
    mdns: bool | None = None  # find peers by mDNS on the LAN; None: on when `peers` is empty
    mdns_interface: str | None = None  # interface name or IPv4 for mDNS; None: all interfaces
    discovery_wait_s: float = 3.0  # with mDNS, listen this long before founding or joining
    p: float = 0.1  # probability of a push per step (the paper's p); 0 disables gossip
    # when to push: "clock" pushes on a Poisson clock in seconds, p times the cluster's median
    # step rate, so a slow node does not gather weight (docs/benchmarks.md, "Stragglers");
    # "step" is the paper's coin per step; "weight" a coin made stronger above one's share
    schedule: str = "clock"
    push_rate: float | None = None  # "clock": pushes per second; None: p x cluster's step rate
    seed: int | None = None  # seed of the gossip coin and peer choice; None: from node_id
    inbox_size: int = 4  # received messages waiting to be merged; more -> RESOURCE_EXHAUSTED
    send_buffers: int = 2  # snapshots in flight at once; a push finding none free is skipped
    push_timeout_s: float = 60.0  # deadline of one push (whole stream), seconds
    receive_timeout_s: float = 60.0  # the server cuts an incoming stream after this, seconds
    rpc_timeout_s: float = 5.0  # deadline of a membership call, seconds
    max_failures: int = 3  # consecutive failed calls before a peer is suspended
    hello_interval_s: float = 1.0  # mean seconds between membership rounds
    forget_after_s: float = 600.0  # drop a dead peer (not a seed) unseen for this long; also
    # how long a push whose ack was lost is asked about (ResolvePush) before it is written off
    join_timeout_s: float = 600.0  # a member (resumed) waits this long for a peer to rejoin from
    drain_timeout_s: float = 120.0  # finish(): longest wait for in-flight pushes, seconds
    linger_s: float = 5.0  # close() after finish(): longest time to keep answering, seconds
    quiet_s: float = 0.5  # ... ending early once no push or ResolvePush came for this long
    server_workers: int = 16  # gRPC server threads (concurrent incoming calls)
    tune_malloc: bool = True  # keep glibc from unmapping each received chunk (gosgd_p2p.malloc)
    chunk_bytes: int = CHUNK_BYTES  # payload bytes per streamed chunk, 4 KiB .. 4 MiB
    send_process: bool = False  # make pushes in a child process, off the training GIL (Linux)
    network_process: bool | None = None  # serve gRPC and push from a child process without
    # torch (netproc.py): only the model, the weight and the merge stay in the training process.
    # None: on where it measured better, Linux with the model on the CPU and no client= given
    token_file: str | None = None  # file holding the cluster secret; None: no token
    tls_cert: str | None = None  # this node's certificate (PEM); with tls_key, tls_ca: mTLS
    tls_key: str | None = None  # its private key (PEM)
    tls_ca: str | None = None  # the cluster CA (PEM): peers must hold a certificate it signed
    max_weight: float = 1024.0  # most weight one message may carry: >= the founders' total
    insecure: bool = False  # with no token or TLS, serve non-loopback callers too (trusted LAN)
    encoding: str = "fp32"  # wire encoding of our pushes: fp32 | bf16 | fp16 | int8 (codec.py)
    max_send_mbps: float | None = None  # mean push rate cap, Mbit/s; pushes over it are skipped

    def __post_init__(self) -> None:
        parse_address(self.listen)
        for peer in self.peers:
            parse_address(peer)
        if self.advertise is not None:
            parse_address(self.advertise)
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {self.p}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}")
        if self.push_rate is not None and not 0.0 <= self.push_rate < float("inf"):
            raise ValueError(f"push rate must be >= 0 pushes per second, got {self.push_rate}")
        if not self.node_id or len(self.node_id.encode()) > 128:
            raise ValueError("node id must be 1 to 128 bytes")
        if not self.cluster or len(self.cluster.encode()) > 128:
            raise ValueError("cluster name must be 1 to 128 bytes")
        for name in ("inbox_size", "send_buffers", "max_failures", "server_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0.0 < self.max_weight <= MAX_WEIGHT:
            raise ValueError(f"max_weight must be in (0, {MAX_WEIGHT:g}]")
        if not 4096 <= self.chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in [4096, {MAX_CHUNK_BYTES}]")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}")
        if self.max_send_mbps is not None and not self.max_send_mbps > 0:
            raise ValueError("max_send_mbps must be > 0 (None: no cap)")
        if self.discovery_wait_s < 0:
            raise ValueError("discovery_wait_s must be >= 0")
        for name in (
            "push_timeout_s",
            "receive_timeout_s",
            "rpc_timeout_s",
            "hello_interval_s",
            "drain_timeout_s",
            "join_timeout_s",
            "forget_after_s",
            "linger_s",
            "quiet_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")


#: Names of the built-in models (gosgd_p2p.models builds each) and data sets (gosgd_p2p.data
#: loads each), here so that the CLI can check its flags without importing torch.
MODELS: tuple[str, ...] = ("mlp", "cnn", "resnet18")
DATASETS: tuple[str, ...] = ("digits", "synthetic", "cifar10")


@dataclass
class TrainConfig:
    """What the built-in trainer (gosgd-node, gosgd-demo) trains, and how it reports."""

    model: str = "cnn"  # mlp | cnn | resnet18
    dataset: str = "digits"  # digits (bundled) | synthetic | cifar10 (needs data_dir)
    data_dir: str | None = None  # folder of the CIFAR-10 python pickles
    shard: str | None = None  # "i/n": this node trains on the i-th of n disjoint slices
    batch_size: int = 32  # examples per local step
    lr: float = 0.05  # SGD learning rate
    momentum: float = 0.9  # SGD momentum (stays local, as in the paper)
    weight_decay: float = 0.0  # L2 penalty
    steps: int = 600  # local optimizer steps before the node finishes
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:K
    eval_every: int = 100  # steps between evaluations on the test set; 0: only at the end
    log_json: str | None = None  # file to append one JSON line per evaluation to
    save_final: str | None = None  # file to write the final state and weight to (torch.save)
    wait_for_peers: int = 0  # founders wait until this many live peers know as many
    wait_timeout_s: float = 60.0  # ... for at most this long, seconds
    metrics_port: int = 0  # Prometheus /metrics on this port (all interfaces); 0: off
    progress: bool | None = None  # live progress line on stderr; None: when it is a terminal
    checkpoint_dir: str | None = None  # resume from / write checkpoints here; None: none
    checkpoint_every: int = 100  # steps between checkpoints (with checkpoint_dir)
    seed: int | None = None  # data-order seed; None: derived from the node id
    threads: int | None = None  # torch CPU threads; None: torch's default
    linger_s: float = 0.0  # after finishing, keep answering Status this long (or to SIGTERM)

    def __post_init__(self) -> None:
        for name in ("batch_size", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.eval_every < 0:
            raise ValueError("eval_every must be >= 0")
        if self.linger_s < 0:
            raise ValueError("linger must be >= 0")
        if self.checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        if not self.lr > 0:
            raise ValueError("lr must be > 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError("momentum must be in [0, 1)")
