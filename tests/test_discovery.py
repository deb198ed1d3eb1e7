"""Membership for real: mDNS inside private network namespaces, peer exchange from one seed,
joining a running cluster, and losing a node to kill -9."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from conftest import wait_until
from netns import needs_netns

from gosgd_p2p import GossipNode, NodeConfig

pytestmark = pytest.mark.nodes

TRAIN = ("--model", "cnn", "--dataset", "digits", "--p", "0.1")


@pytest.mark.slow
@needs_netns
def test_multi_host_lan_discovers_by_mdns_and_converges(lab, node_processes, tmp_path) -> None:
    hosts = lab.lan(3)
    token = tmp_path / "token"  # nodes on other hosts gossip with a token (or --insecure)
    token.write_text("lan-token-0123456789abcdef\n")
    nodes = [
        node_processes(
            f"h{i}",
            *TRAIN,
            "--token-file",
            str(token),
            "--steps",
            "500",
            "--eval-every",
            "0",
            "--wait-for-peers",
            "2",
            "--wait-timeout",
            "60",
            prefix=tuple(lab.exec_prefix(ns)),
            listen="0.0.0.0:7070",
        )  # fmt: skip
        for i, (ns, _) in enumerate(hosts)
    ]
    for node, (_, ip) in zip(nodes, hosts, strict=True):
        assert node.address == f"{ip}:7070"  # advertised its LAN address, not loopback
    for node in nodes:
        assert node.wait(300) == 0, node.stderr()
    for node in nodes:
        final = node.final()
        assert final["test_accuracy"] >= 0.95, final
        assert len(final["partners"]) == 2, final
    assert math.isclose(sum(n.final()["weight"] for n in nodes), 3.0, abs_tol=1e-9)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def test_one_seed_is_enough_to_reach_everyone() -> None:
    """D knows only A; peer exchange brings it B and C, and it gossips with them."""

    def cfg(name: str, peers: list[str]) -> NodeConfig:
        return NodeConfig(
            node_id=name, cluster="seed", p=0.5, peers=peers, mdns=False, hello_interval_s=0.2
        )

    a = GossipNode(_model(), cfg("A", []))
    b = GossipNode(_model(), cfg("B", [a.address]))
    c = GossipNode(_model(), cfg("C", [b.address]))
    d = GossipNode(_model(), cfg("D", [a.address]))
    nodes = [a, b, c, d]
    try:
        # pushes go only to peers a node has reached itself (not those it only heard of)
        wait_until(lambda: all(len(n.peers.pushable()) == 3 for n in nodes), 30, "full membership")
        stop = threading.Event()

        def gossip(node: GossipNode) -> None:
            while not stop.is_set() and node.step_count < 2000:
                node.step()

        threads = [threading.Thread(target=gossip, args=(n,)) for n in nodes]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: {"B", "C"} <= set(d.partners()), 60, "D to gossip with B and C")
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        total = math.fsum(n.finish() for n in nodes)
        assert math.isclose(total, 4.0, abs_tol=1e-9)
    finally:
        for n in nodes:
            n.close()


@pytest.mark.slow
def test_late_node_joins_with_the_clusters_accuracy(node_processes) -> None:
    args = (*TRAIN, "--no-mdns", "--eval-every", "10")
    a = node_processes("a", *args, "--steps", "700", "--wait-for-peers", "1")
    b = node_processes("b", *args, "--steps", "700", "--wait-for-peers", "1", "--peers", a.address)
    wait_until(lambda: any(r["step"] >= 200 for r in a.records()), 120, "a to train 200 steps")
    j = node_processes("j", *args, "--steps", "200", "--peers", a.address)
    for node in (a, b, j):
        assert node.wait(300) == 0, node.stderr()
    first = j.records()[0]
    assert first["step"] == 0 and first["weight"] > 0  # joined: it has a state and a weight
    donor = a if f"joined from {a.address}" in j.stderr() else b
    assert f"joined from {donor.address}" in j.stderr(), j.stderr()
    # the donor's accuracy around the moment of the join
    donor_acc = [r["test_accuracy"] for r in donor.records() if not r["final"]]
    assert abs(first["test_accuracy"] - max(donor_acc)) <= 0.05, (first, donor_acc)
    assert first["test_accuracy"] >= 0.9  # not a fresh model's ~0.1
    assert math.isclose(sum(n.final()["weight"] for n in (a, b, j)), 2.0, abs_tol=1e-9)


@pytest.mark.slow
def test_kill_9_loses_one_node_and_the_rest_finish(node_processes) -> None:
    args = (*TRAIN, "--no-mdns", "--eval-every", "20", "--wait-for-peers", "2")
    a = node_processes("a", *args, "--steps", "600")
    b = node_processes("b", *args, "--steps", "600", "--peers", a.address)
    c = node_processes("c", *args, "--steps", "100000", "--peers", a.address)
    wait_until(lambda: all(n.records() for n in (a, b, c)), 120, "all three to start training")
    wait_until(lambda: any(r["step"] >= 60 for r in c.records()), 120, "c to train")
    c.kill()
    c.wait(30)
    for node in (a, b):
        assert node.wait(300) == 0, node.stderr()
        final = node.final()
        assert final["test_accuracy"] >= 0.95, final
        assert "evicted peer c" in node.stderr(), node.stderr()
        assert "Traceback" not in node.stderr()
    # c's own weight left with it; whatever a and b hold is positive and below the total
    total = sum(n.final()["weight"] for n in (a, b))
    assert 0.0 < total < 3.0
