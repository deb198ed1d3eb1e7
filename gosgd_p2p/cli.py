"""gosgd-node: the node daemon. Maps flags onto NodeConfig and TrainConfig, nothing else."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import fields
from typing import Any, NoReturn

from gosgd_p2p.config import DATASETS, MODELS, SCHEDULES, NodeConfig, TrainConfig
from gosgd_p2p.wire import ENCODINGS

__all__ = ["OneLineParser", "add_security_flags", "build_parser", "configs_from_args", "node_main"]

log = logging.getLogger("gosgd_p2p")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line naming the fix, without the usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _peer_list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def add_security_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The flags that say how to prove cluster membership (gosgd-node, gosgd-status)."""
    sec = parser.add_argument_group("security")
    sec.add_argument("--token-file", default=None, help="file with the cluster secret")
    sec.add_argument("--tls-cert", default=None, help="this node's certificate (PEM)")
    sec.add_argument("--tls-key", default=None, help="this node's private key (PEM)")
    sec.add_argument("--tls-ca", default=None, help="cluster CA (PEM); mutual TLS with the above")
    return sec


def build_parser() -> argparse.ArgumentParser:
    node, train = NodeConfig(), TrainConfig()
    p = OneLineParser(
        prog="gosgd-node",
        description="A GoSGD gossip training node: trains a model on its own data, and "
        "exchanges its state with random peers over gRPC.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    net = p.add_argument_group("network")
    net.add_argument("--listen", default=node.listen, help="HOST:PORT to serve on; port 0 = any")
    net.add_argument("--advertise", default=None, help="HOST:PORT peers should dial")
    net.add_argument("--peers", type=_peer_list, default=[], help="seed peers HOST:PORT,...")
    net.add_argument("--node-id", default=None, help="unique node id (default: host-pid-random)")
    net.add_argument("--cluster", default=node.cluster, help="cluster name; others are refused")
    net.add_argument(
        "--mdns",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="find peers by mDNS (default: on when --peers is empty)",
    )
    net.add_argument("--mdns-interface", default=None, help="interface name or IPv4 for mDNS")
    net.add_argument(
        "--discovery-wait",
        type=float,
        default=node.discovery_wait_s,
        help="seconds of mDNS listening before founding or joining",
    )
    sec = add_security_flags(p)
    sec.add_argument(
        "--insecure",
        action="store_true",
        help="with no token or TLS, answer callers off this host too (a trusted LAN only); "
        "without it such a node serves loopback callers only",
    )
    gossip = p.add_argument_group("gossip")
    gossip.add_argument(
        "--p", type=float, default=node.p,
        help="push probability per step (clock: p pushes per step of a typical node)",
    )  # fmt: skip
    gossip.add_argument(
        "--schedule", choices=SCHEDULES, default=node.schedule,
        help="when to push: clock (a Poisson clock in seconds at the cluster's pace, so a slow "
        "node does not gather weight), step (the paper's coin per step), weight (a coin "
        "made stronger above one's share)",
    )  # fmt: skip
    gossip.add_argument(
        "--push-rate", type=float, default=None,
        help="clock: pushes per second (default: p x the cluster's median step rate)",
    )  # fmt: skip
    gossip.add_argument("--inbox-size", type=int, default=node.inbox_size)
    gossip.add_argument("--send-buffers", type=int, default=node.send_buffers)
    gossip.add_argument(
        "--chunk-kib", type=int, default=node.chunk_bytes >> 10,
        help="KiB of state per streamed chunk (4 .. 4096)",
    )  # fmt: skip
    gossip.add_argument("--push-timeout", type=float, default=node.push_timeout_s, help="seconds")
    gossip.add_argument(
        "--encoding", choices=ENCODINGS, default=node.encoding,
        help="wire encoding of this node's pushes (peers decode any): fp32 exact, bf16 and fp16 "
        "half the bytes, int8 (blockwise) about a quarter",
    )  # fmt: skip
    gossip.add_argument(
        "--max-send-mbps", type=float, default=None, metavar="MBIT",
        help="cap the mean rate of this node's pushes at MBIT Mbit/s; a push over it is skipped",
    )  # fmt: skip
    gossip.add_argument(
        "--send-process",
        action="store_true",
        help="make pushes in a child process, so gRPC's Python work does not hold the GIL "
        "the training thread needs (small, fast models; Linux)",
    )
    gossip.add_argument(
        "--network-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="serve gRPC, make calls and run mDNS from a child process that imports no torch, "
        "so no network work holds the GIL the training thread needs (Linux); by default on "
        "for a model on the CPU, off on a GPU (not yet measured there); --no-network-process: "
        "all in this process",
    )
    gossip.add_argument(
        "--wait-for-peers",
        type=int,
        default=train.wait_for_peers,
        help="before training, wait for N live peers that each know N (to start together)",
    )
    gossip.add_argument("--wait-timeout", type=float, default=train.wait_timeout_s)
    gossip.add_argument(
        "--join-timeout", type=float, default=node.join_timeout_s,
        help="seconds a node resuming from a checkpoint waits for a running peer to rejoin from",
    )  # fmt: skip
    t = p.add_argument_group("training")
    t.add_argument("--model", choices=MODELS, default=train.model)
    t.add_argument("--dataset", choices=DATASETS, default=train.dataset)
    t.add_argument("--data-dir", default=None, help="folder of the CIFAR-10 python pickles")
    t.add_argument("--shard", default=None, help="i/n: train on the i-th of n disjoint slices")
    t.add_argument("--batch-size", type=int, default=train.batch_size)
    t.add_argument("--lr", type=float, default=train.lr)
    t.add_argument("--momentum", type=float, default=train.momentum)
    t.add_argument("--weight-decay", type=float, default=train.weight_decay)
    t.add_argument("--steps", type=int, default=train.steps)
    t.add_argument("--device", default=train.device, help="auto | cpu | cuda | cuda:K")
    t.add_argument("--seed", type=int, default=None, help="data-order and gossip seed")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    out = p.add_argument_group("output")
    out.add_argument("--eval-every", type=int, default=train.eval_every, help="steps; 0 = end")
    out.add_argument("--log-json", default=None, help="append one JSON line per evaluation")
    out.add_argument("--save-final", default=None, help="torch.save the final state and weight")
    out.add_argument("--checkpoint-dir", default=None, help="resume from and write checkpoints")
    out.add_argument("--checkpoint-every", type=int, default=train.checkpoint_every, help="steps")
    out.add_argument(
        "--linger", type=float, default=train.linger_s,
        help="seconds to stay up after finishing (or until SIGTERM), pushes refused, so "
        "gosgd-status can read the final weights",
    )  # fmt: skip
    out.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    out.add_argument(
        "--metrics-port", type=int, default=train.metrics_port, help="Prometheus port; 0 = off"
    )
    out.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="live status line on stderr (default: when stderr is a terminal)",
    )
    return p


def configs_from_args(args: argparse.Namespace) -> tuple[NodeConfig, TrainConfig]:
    """The configs the flags describe; raises ValueError with a one-line reason."""
    node_kw: dict[str, Any] = {
        "listen": args.listen,
        "advertise": args.advertise,
        "peers": args.peers,
        "cluster": args.cluster,
        "mdns": args.mdns,
        "mdns_interface": args.mdns_interface,
        "discovery_wait_s": args.discovery_wait,
        "p": args.p,
        "schedule": args.schedule,
        "push_rate": args.push_rate,
        "seed": args.seed,
        "inbox_size": args.inbox_size,
        "send_buffers": args.send_buffers,
        "chunk_bytes": args.chunk_kib << 10,
        "push_timeout_s": args.push_timeout,
        "encoding": args.encoding,
        "max_send_mbps": args.max_send_mbps,
        "join_timeout_s": args.join_timeout,
        "send_process": args.send_process,
        "network_process": args.network_process,
        "token_file": args.token_file,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_ca": args.tls_ca,
        "insecure": args.insecure,
    }
    if args.node_id:
        node_kw["node_id"] = args.node_id
    train_names = {f.name for f in fields(TrainConfig)}
    train_kw = {k: v for k, v in vars(args).items() if k in train_names}
    train_kw["wait_timeout_s"] = args.wait_timeout
    train_kw["linger_s"] = args.linger
    return NodeConfig(**node_kw), TrainConfig(**train_kw)


def node_main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        node_cfg, train_cfg = configs_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    logging.basicConfig(
        level=args.log_level,
        format=f"%(asctime)s {node_cfg.node_id} %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("gosgd_p2p").setLevel(args.log_level)

    # SIGTERM (and a first Ctrl-C) ask for a graceful leave: the weight is handed over
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("signal %d: leaving after this step", signum)
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C kills

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    def announce(node: Any) -> None:
        print(f"gosgd-node {node_cfg.node_id} listening on {node.address}", flush=True)

    from gosgd_p2p.trainer import train  # torch import is slow: only after flags are valid

    try:
        final = train(node_cfg, train_cfg, stop=stop, on_ready=announce)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"gosgd-node: error: {err}", file=sys.stderr)
        return 1
    print(
        f"gosgd-node {node_cfg.node_id} done: step {final['step']} "
        f"test accuracy {final['test_accuracy']:.4f} weight {final['weight']!r} "
        f"sent {final['messages_sent']} received {final['messages_received']} "
        f"returned {final['messages_returned']}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(node_main())
