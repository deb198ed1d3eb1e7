"""Helpers for the tests of a node's child processes (send process, network process)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from conftest import wait_until

from gosgd_p2p import GossipNode
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import Chunk


def train(node: GossipNode) -> None:
    """One local step that moves x, so every push carries a different state."""
    with torch.no_grad():
        for t in node.state:
            t.add_(0.01)
    node.step()


def train_both(a: GossipNode, b: GossipNode) -> None:
    train(a)
    train(b)  # merges what b received: a full inbox would refuse a's pushes


def proc_stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts: it runs no more code)."""
    stat = proc_stat(pid)
    return stat is None or stat[0] == "Z"


class HeldReceive:
    """Holds a push at `node`'s receiver (its server in this process): once `holding` is set,
    the next push to arrive waits there with its call open (`held` is set) until `resume`,
    then goes on only after gRPC has ended the call.

    So a sender's child process killed while `held` is set dies with the call open, and the
    receiver certainly refuses the message (were it quicker, it would commit it, and
    ResolvePush would say so: exact as well, but another path)."""

    def __init__(self, node: GossipNode) -> None:
        self.holding = threading.Event()
        self.held = threading.Event()
        self.resume = threading.Event()
        real_receive = node.receiver.receive_push

        def held_receive(
            chunks: Iterator[Chunk],
            peer: str,
            active: Callable[[], bool],
            cancel: Callable[[], object],
        ) -> pb.PushAck:
            if self.holding.is_set():
                self.held.set()
                self.resume.wait(60)
                wait_until(lambda: not active(), 30, "the receiver to see the call end")
            return real_receive(chunks, peer, active, cancel)

        node.receiver.receive_push = held_receive  # type: ignore[method-assign]
