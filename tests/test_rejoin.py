"""A node that was a member of the cluster (it resumes from a checkpoint) never founds anew:
it waits for a running peer and joins with weight 0."""

from __future__ import annotations

import logging
import socket
import threading

import pytest
import torch
from conftest import node_config, wait_until

from gosgd_p2p import GossipNode
from gosgd_p2p.node import JoinError

pytestmark = pytest.mark.nodes

CLUSTER = "rejoin"


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(120)
def test_a_member_waits_for_its_seed_and_joins_instead_of_founding(caplog) -> None:
    """Issue 18.3, in one process: the seed is down when the member starts."""
    seed = f"127.0.0.1:{free_port()}"
    made: list[GossipNode] = []
    failed: list[BaseException] = []

    def start_member() -> None:
        try:
            cfg = node_config("b", CLUSTER, peers=[seed], join_timeout_s=60.0)
            made.append(GossipNode(small_model(), cfg, member=True, founder_weight=0.7))
        except BaseException as err:
            failed.append(err)

    with caplog.at_level(logging.WARNING, logger="gosgd_p2p"):
        member = threading.Thread(target=start_member, name="start-member")
        member.start()
        wait_until(lambda: "was a member of cluster" in caplog.text, 30, "the member to wait")
        assert not made  # still waiting: it did not found
        a = GossipNode(small_model(), node_config("a", CLUSTER, listen=seed, p=0.0))
        with a:
            while member.is_alive():  # a donates on its training thread
                a.step()
                member.join(0.05)
            assert not failed, failed
            (b,) = made
            with b:
                assert b.joined and b.weight == 0.5
                assert a.finish() + b.finish() == 1.0  # one founder, nothing invented


@pytest.mark.timeout(60)
def test_a_member_with_no_running_peer_gives_up_with_a_clear_error() -> None:
    cfg = node_config("b", CLUSTER, peers=[f"127.0.0.1:{free_port()}"], join_timeout_s=1.0)
    with pytest.raises(JoinError, match="never founds anew"):
        GossipNode(small_model(), cfg, member=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_restarted_daemon_whose_seed_is_down_waits_and_rejoins(node_processes, tmp_path) -> None:
    """Issue 18.3 as an operator meets it: b resumes from its checkpoint while its only seed
    is down. It must not found (that made 5 of 4 founders); once the seed is back it joins."""
    train = ("--cluster", CLUSTER, "--model", "cnn", "--dataset", "digits", "--p", "0.1",
             "--no-mdns", "--eval-every", "0")  # fmt: skip
    seed = f"127.0.0.1:{free_port()}"
    a = node_processes("a", *train, "--steps", "100000", listen=seed)
    b_args = (*train, "--steps", "400", "--peers", seed, "--checkpoint-every", "20",
              "--checkpoint-dir", str(tmp_path / "ckpt-b"))  # fmt: skip
    b = node_processes("b", *b_args)
    # a complete checkpoint: "*" would also match the hidden temporary file of one being written
    wait_until(lambda: any((tmp_path / "ckpt-b").glob("ckpt-*.pt")), 120, "b's first checkpoint")
    b.kill()
    a.kill()
    assert b.wait(30) != 0 and a.wait(30) != 0

    b2 = node_processes("b2", *b_args, "--node-id", "b")  # the same node, seed still down
    wait_until(lambda: "was a member of cluster" in b2.stderr(), 120, "b to wait for a peer")
    assert "founding" not in b2.stderr() and b2.proc.poll() is None
    # the seed, back, founds; it trains until b2 has rejoined, then leaves (a fixed step count
    # could end before b2's next survey on a slow box, leaving b2 nobody to join)
    a2 = node_processes("a2", *train, "--steps", "100000", listen=seed)
    wait_until(lambda: "(rejoined the cluster)" in b2.stderr(), 120, "b to rejoin from a2")
    a2.terminate()
    assert a2.wait(60) == 0, a2.stderr()
    assert b2.wait(240) == 0, b2.stderr()
    # one founder since the restarts (a2, weight 1): b2 joined with weight 0 plus its share
    total = a2.final()["weight"] + b2.final()["weight"]
    assert abs(total - 1.0) < 1e-9, total
