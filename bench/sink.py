"""A benchmark sink: a GossipNode that takes every push and drops it unmerged."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from bench import workloads

READY_TIMEOUT_S = 120.0  # spawn, imports and the node's server
STOP_TIMEOUT_S = 30.0


#: Below this weight a node pushing into the sink gets its founder's weight back (refill).
REFILL_BELOW = 2.0**-16


def refill(node: Any) -> None:
    """Give a node that pushes into the sink its founder's weight (1.0) again once it is
    down to REFILL_BELOW (training thread, after node.step()).

    The sink keeps every push's weight, where peers would send weight back. Weights are whole
    numbers of 2^-32 (gosgd_p2p.wire.WEIGHT_QUANTUM), so without this a node would stop
    pushing after about 32 halvings in a row, and a benchmark would time a node that has
    nothing left to send. The benchmark's node is alone with the sink: no cluster total is
    at stake."""
    if node.local.weight < REFILL_BELOW:
        node.local.weight = 1.0


def release_unmerged(node: Any, stop: Any, every_s: float) -> threading.Thread:
    """Start a thread that gives every received message's buffer back without merging it,
    each `every_s` seconds, until `stop` (an Event) is set: the sink's CPU goes to receiving,
    not to merges, and its inbox never fills."""

    def drain() -> None:
        while not stop.is_set():
            for msg in node.inbox.drain():
                msg.release(msg.payload)
            time.sleep(every_s)

    thread = threading.Thread(target=drain, name="bench-sink", daemon=True)
    thread.start()
    return thread


def sink_node(
    model: torch.nn.Module,
    cluster: str,
    stop: Any,
    every_s: float,
    node_id: str = "sink",
    inbox_size: int = 8,
) -> Any:
    """A GossipNode at p = 0 (no mDNS) whose received messages are dropped unmerged."""
    from gosgd_p2p import GossipNode, NodeConfig

    node = GossipNode(
        model,
        NodeConfig(node_id=node_id, cluster=cluster, p=0.0, mdns=False, inbox_size=inbox_size,
                   network_process=False),  # as every figure so far was measured against
    )  # fmt: skip
    release_unmerged(node, stop, every_s)
    return node


def serve(model_name: str, ready: Any, stop: Any) -> None:
    """A sink process: a peer with the workloads' model `model_name` that acknowledges every
    push and drops it; puts its address on `ready`, serves until `stop`."""
    torch.set_num_threads(1)
    node = sink_node(workloads.model(model_name, "cpu"), workloads.CLUSTER, stop, every_s=0.001)
    ready.put(node.address)
    stop.wait()
    node.close()


@contextlib.contextmanager
def running(model_name: str) -> Iterator[tuple[str, int]]:
    """A sink process for the whole `with` block: yields its (address, pid)."""
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=serve, args=(model_name, ready, stop), name="sink")
    proc.start()
    try:
        address = ready.get(timeout=READY_TIMEOUT_S)
        assert proc.pid is not None
        yield address, proc.pid
    finally:
        stop.set()
        proc.join(STOP_TIMEOUT_S)
