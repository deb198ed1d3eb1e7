"""Real gosgd-node processes on loopback, wired by --peers."""

from __future__ import annotations

import math

import pytest
from conftest import wait_until

#: an acceptance run (real processes or training to a target): not in the fast tier
pytestmark = [pytest.mark.nodes, pytest.mark.slow]

# --no-mdns: these nodes use seed lists; mDNS runs only inside namespaces (test_discovery.py)
COMMON = ("--model", "cnn", "--dataset", "digits", "--p", "0.1", "--eval-every", "100", "--no-mdns")


def test_three_daemons_train_exchange_and_conserve_weight(node_processes) -> None:
    """The issue's acceptance run: digits, cnn, p=0.1, 600 steps, three daemons."""
    args = (*COMMON, "--steps", "600", "--wait-for-peers", "2")
    a = node_processes("a", *args)
    b = node_processes("b", *args, "--peers", a.address, "--send-process")  # pushes from a child
    c = node_processes("c", *args, "--peers", a.address)
    for node in (a, b, c):
        assert node.wait(240) == 0, node.stderr()
    finals = [n.final() for n in (a, b, c)]
    for node, rec in zip((a, b, c), finals, strict=True):
        assert rec["step"] == 600
        assert rec["test_accuracy"] >= 0.95, (node.node_id, rec)
        assert rec["messages_sent"] > 0 and rec["messages_received"] > 0, rec
        assert any("done: step 600" in line for line in node.stdout)
    # every node finished, so no weight is in flight: the founders' total is back, exactly
    assert math.isclose(sum(r["weight"] for r in finals), 3.0, rel_tol=0, abs_tol=1e-9)
    # peer exchange: b and c were seeded with a only, yet they exchanged with each other
    assert "c" in finals[1]["partners"] and "b" in finals[2]["partners"]


def test_sigterm_hands_the_whole_weight_to_a_peer(node_processes) -> None:
    """A node stopped by SIGTERM leaves nothing behind: the survivors end with the total."""
    args = (*COMMON, "--wait-for-peers", "2", "--eval-every", "20")
    a = node_processes("a", *args, "--steps", "500")
    b = node_processes("b", *args, "--steps", "500", "--peers", a.address)
    # c's pushes, and its leave, go through its send process
    c = node_processes("c", *args, "--steps", "100000", "--peers", a.address, "--send-process")
    wait_until(lambda: all(n.records() for n in (a, b, c)), 120, "all three to start training")
    wait_until(lambda: any(r["step"] >= 60 for r in c.records()), 120, "c to train 60 steps")
    c.terminate()
    assert c.wait(60) == 0, c.stderr()
    for node in (a, b):
        assert node.wait(240) == 0, node.stderr()
    leaver = c.final()
    assert leaver["weight"] == 0.0 and leaver["step"] < 100000
    assert "handed weight" in c.stderr()
    total = sum(n.final()["weight"] for n in (a, b))
    assert math.isclose(total, 3.0, rel_tol=0, abs_tol=1e-9)
