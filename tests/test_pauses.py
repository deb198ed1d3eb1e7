"""A node that is paused (SIGSTOP: a VM pause, a GC stall, a laptop lid) and then resumes
loses no weight: pushes to it stay unsettled until it can answer for them."""

from __future__ import annotations

import math
import os
import signal
import threading
import time

import pytest
import torch
from conftest import wait_until

from gosgd_p2p import GossipNode, NodeConfig, cluster_seed
from gosgd_p2p.models import build_model

pytestmark = pytest.mark.nodes

CLUSTER = "pause"
#: How long the receiver is frozen: many times the sender's push and ResolvePush deadlines
#: below, as a 100 s pause is against the defaults.
FREEZE_S = 8.0


def cnn() -> torch.nn.Module:
    torch.manual_seed(cluster_seed(CLUSTER))
    return build_model("cnn", (1, 8, 8), 10)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_frozen_receiver_settles_every_push_when_it_resumes(node_processes) -> None:
    """Issue 18.2: pushes to a SIGSTOPped daemon miss their deadline; once it resumes, each is
    settled by asking it, none is written off, and the weight is exact after it leaves."""
    r = node_processes("r", "--cluster", CLUSTER, "--no-mdns", "--p", "0",
                       "--steps", "1000000", "--eval-every", "0")  # fmt: skip
    cfg = NodeConfig(
        node_id="a", cluster=CLUSTER, mdns=False, peers=[r.address], p=1.0,
        hello_interval_s=0.2, push_timeout_s=1.0, rpc_timeout_s=0.5,
    )  # fmt: skip
    a = GossipNode(cnn(), cfg)
    with a:
        total = a.weight * 2  # a joined with half of r's weight, or founded beside r
        assert total in (1.0, 2.0)
        while a.counters.get("pushes_acked") < 3:
            a.step()
            wait_until(lambda: a.in_flight < 2, 30, "a free send buffer")
        os.kill(r.proc.pid, signal.SIGSTOP)
        try:
            paused = threading.Event()
            end = time.monotonic() + FREEZE_S
            while time.monotonic() < end:  # a trains on while r is frozen
                a.step()
                paused.wait(0.05)
        finally:
            os.kill(r.proc.pid, signal.SIGCONT)
        assert a.counters.get("pushes_started") > 3  # some pushes met the frozen receiver
        wait_until(lambda: a.in_flight == 0, 60, "every push to be settled")
        assert a.counters.get("pushes_lost_with_peer") == 0
        assert a.counters.get("weight_written_off") == 0
        r.terminate()  # r leaves: its whole weight comes to a
        assert r.wait(60) == 0, r.stderr()
        final = a.finish()
    assert math.isclose(final, total, rel_tol=0, abs_tol=1e-12), (final, total)
