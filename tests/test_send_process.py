"""send_process: pushes made by a child process, and what happens when either process dies."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
import torch
from children import HeldReceive, gone, proc_stat, train, train_both
from conftest import node_config, wait_until

from gosgd_p2p import GossipNode, cluster_seed
from gosgd_p2p.client import PeerClient
from gosgd_p2p.models import build_model
from gosgd_p2p.sendproc import SendProcessClient

pytestmark = [pytest.mark.nodes, pytest.mark.timeout(180)]

CLUSTER = "sendproc"


def model() -> torch.nn.Module:
    torch.manual_seed(cluster_seed(CLUSTER))
    return build_model("mlp", (1, 8, 8), 10)


@pytest.mark.parametrize("encoding", ["fp32", "int8"])  # int8: the first bytes of a buffer
def test_pushes_go_through_the_child_and_keep_the_weight_exact(encoding: str) -> None:
    b = GossipNode(model(), node_config("b", CLUSTER, p=0.5))
    a = GossipNode(
        model(),
        node_config("a", CLUSTER, p=1.0, peers=[b.address], send_process=True, encoding=encoding),
    )
    with a, b:
        child = a.send_process_pid
        assert child is not None and child != os.getpid() and not gone(child)

        def traded() -> bool:
            train(a)
            train(b)
            return a.counters.get("pushes_acked") >= 20 and b.counters.get("pushes_acked") >= 5

        wait_until(traded, 60, "20 pushes from a's child and 5 from b")
        # pushes are made by the child: stopped, it holds every push of a in flight
        os.kill(child, signal.SIGSTOP)
        try:
            wait_until(lambda: (train(a), a.in_flight == 2)[1], 30, "both send buffers in flight")
            acked = a.counters.get("pushes_acked")
            for _ in range(20):
                train(a)
            # an ack the child wrote just before it stopped may still be read: at most one per
            # send buffer; a running child would have acked about 20
            assert a.counters.get("pushes_acked") <= acked + 2
        finally:
            os.kill(child, signal.SIGCONT)
        weights = [a.finish(), b.finish()]
        assert a.counters.get("pushes_acked") > acked
        assert a.counters.get("pushes_returned") == 0
        assert math.isclose(sum(weights), 2.0, rel_tol=0, abs_tol=1e-12)
        assert a.stats()["send_process"] == child
    assert gone(child)  # close() stopped it


def test_the_child_killed_during_a_push_loses_no_weight(caplog) -> None:
    # b's receiver is held in this process, and a's child is a send process, whatever
    # --push-mode says (tests/test_network_process.py kills a network process)
    b = GossipNode(model(), node_config("b", CLUSTER, p=0.0), network_process=False)
    hold = HeldReceive(b)
    a = GossipNode(
        model(),
        node_config("a", CLUSTER, p=1.0, peers=[b.address], send_process=True, send_buffers=1),
        network_process=False,
    )
    with a, b:
        child = a.send_process_pid
        assert child is not None
        received = b.counters.get
        wait_until(lambda: (train_both(a, b), received("pushes_received") >= 3)[1], 60, "3 pushes")
        hold.holding.set()  # the next push reaches b and waits there, its call open
        wait_until(lambda: (train_both(a, b), hold.held.is_set())[1], 60, "a push held at b")
        hold.holding.clear()
        os.kill(child, signal.SIGKILL)  # the call dies with the child; b has not committed it
        hold.resume.set()
        # a learns it from its blocked read, settles the push with ResolvePush (b never
        # committed it, so the weight comes home) and sends from its own threads from now on
        settled = a.counters.get
        wait_until(
            lambda: (train_both(a, b), settled("pushes_resolved_aborted") == 1)[1],
            60,
            "the held push to settle",
        )
        assert a.send_process_pid is None
        assert settled("pushes_returned") == 1 and settled("pushes_lost_with_peer") == 0
        before = received("pushes_received")
        wait_until(
            lambda: (train_both(a, b), received("pushes_received") >= before + 3)[1],
            60,
            "3 pushes sent without the child",
        )
        weights = [a.finish(), b.finish()]
        assert math.isclose(sum(weights), 2.0, rel_tol=0, abs_tol=1e-12)
    assert "send process" in caplog.text and "is gone" in caplog.text


@pytest.mark.slow
def test_the_child_exits_when_its_node_is_killed(node_processes) -> None:
    receiver = GossipNode(model(), node_config("r", CLUSTER, p=0.0))
    with receiver:
        sender = node_processes(
            "s", "--model", "mlp", "--dataset", "digits", "--cluster", CLUSTER, "--no-mdns",
            "--p", "1.0", "--steps", "1000000", "--eval-every", "0", "--send-process",
            "--peers", receiver.address,
        )  # fmt: skip
        wait_until(lambda: receiver.counters.get("pushes_received") >= 3, 120, "3 pushes")
        children = [pid for pid in _children(sender.proc.pid) if b"sendproc" in _cmdline(pid)]
        assert len(children) == 1, sender.stderr()
        sender.kill()
        sender.wait(30)
        wait_until(lambda: gone(children[0]), 30, "the send process to exit after its node")
        receiver.finish()


def test_send_process_makes_its_own_client() -> None:
    with pytest.raises(ValueError, match="do not pass client="):
        GossipNode(model(), node_config("c", CLUSTER, send_process=True), client=PeerClient())


def _children(pid: int) -> list[int]:
    entries = [e.name for e in Path("/proc").iterdir() if e.name.isdigit()]
    return [int(e) for e in entries if (stat := proc_stat(e)) is not None and int(stat[1]) == pid]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.skipif(torch.cuda.is_available(), reason="page-locking works where CUDA does")
def test_page_locking_without_cuda_only_warns(caplog) -> None:
    client = SendProcessClient(None, nbytes=4096, count=2)
    try:
        client.pin_buffers()
        assert "cannot page-lock the send buffers" in caplog.text
        assert client.alive and not gone(client.pid)
    finally:
        client.close()
    assert gone(client.pid)
