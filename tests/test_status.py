"""gosgd-status and the Status RPC: every node found from one, the weight checked from outside,
credentials required like every Gossip call. Real gRPC on 127.0.0.1, port 0."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import node_config, wait_until

from gosgd_p2p import GossipNode, certs
from gosgd_p2p.client import PeerClient
from gosgd_p2p.security import Credentials
from gosgd_p2p.status import survey
from gosgd_p2p.v1 import gossip_pb2 as pb

TOKEN = "7a" * 32


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def gosgd_status(*args: str) -> subprocess.CompletedProcess[str]:
    """The console script's code, in a fresh interpreter that must not import torch."""
    code = (
        "import sys; from gosgd_p2p.status import main; rc = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'gosgd-status imported torch'; sys.exit(rc)"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
    )


def train(nodes: list[GossipNode], steps: int) -> None:
    """`steps` local steps of each node, interleaved, with a loss each reports."""
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for node in nodes:
            node.step()
            node.note_loss(torch.rand((), generator=data))


@pytest.fixture
def cluster():
    """Four founders on 127.0.0.1, wired through the first one's address only."""
    first = GossipNode(make_model(), node_config("n0", "status", p=0.3))
    nodes = [first] + [
        GossipNode(make_model(), node_config(f"n{i}", "status", p=0.3, peers=[first.address]))
        for i in range(1, 4)
    ]
    yield nodes
    for node in nodes:
        node.close()


@pytest.mark.timeout(60)
def test_one_address_finds_every_node_and_the_weight_is_exact(cluster) -> None:
    first = cluster[0]
    wait_until(lambda: len(first.peers.live()) == 3, 20, "n0 to know the 3 others")
    train(cluster, 100)
    # between steps only the network moves weight: once every push is settled it is all at
    # the nodes (a, or their inboxes), and the sum read from outside is exact
    wait_until(lambda: all(n.in_flight == 0 for n in cluster), 20, "every push settled")
    client = PeerClient()
    try:
        mid = survey(client, first.address)
        assert sorted(r.node_id for r in mid.replies.values()) == ["n0", "n1", "n2", "n3"]
        assert {r.state for r in mid.replies.values()} == {pb.NODE_STATE_TRAINING}
        assert all(r.step == 100 and r.HasField("last_loss") for r in mid.replies.values())
        sent = sum(r.messages_sent for r in mid.replies.values())
        assert sent > 0 and sent == sum(n.stats().get("pushes_acked", 0) for n in cluster)
        totals = mid.totals()
        assert totals["founders_total"] == 4.0 and totals["in_flight"] == 0.0
        assert totals["check"] == "exact", totals
        assert math.isclose(totals["held"], 4.0, abs_tol=1e-9)

        train(cluster, 50)
        for node in cluster:
            node.finish()
        end = survey(client, cluster[2].address)  # any node will do
        assert {r.state for r in end.replies.values()} == {pb.NODE_STATE_FINISHED}
        weights = {r.node_id: r.weight for r in end.replies.values()}
        assert weights == {n.config.node_id: n.weight for n in cluster}
        assert end.totals()["check"] == "exact"
        assert abs(math.fsum(weights.values()) - 4.0) <= 1e-9
    finally:
        client.close()

    # the console script: the same facts, as JSON for scripts and as a table for people
    result = gosgd_status(first.address, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [n["node_id"] for n in report["nodes"]] == ["n0", "n1", "n2", "n3"]
    assert report["check"] == "exact" and report["not_answering"] == []
    table = gosgd_status(first.address)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["node", "address", "state"]
    assert [line.split()[0] for line in lines[1:5]] == ["n0", "n1", "n2", "n3"]
    assert all(line.split()[2] == "finished" for line in lines[1:5])
    assert "founders' total 4" in lines[5] and lines[6].startswith("conservation: exact")


@pytest.mark.timeout(60)
def test_a_node_that_left_is_shown_and_its_weight_stays_counted(cluster) -> None:
    first = cluster[0]
    wait_until(lambda: len(first.peers.live()) == 3, 20, "n0 to know the 3 others")
    train(cluster, 30)
    leaving = cluster[3]
    wait_until(lambda: len(leaving.peers.pushable()) == 3, 20, "n3 to have reached the others")
    assert leaving.leave() > 0  # hands its whole weight to a peer, then stops answering
    cluster[3].close()
    for node in cluster[:3]:
        node.finish()
    client = PeerClient()
    try:
        result = survey(client, first.address)
    finally:
        client.close()
    assert sorted(r.node_id for r in result.replies.values()) == ["n0", "n1", "n2"]
    gone = result.to_json()["not_answering"]
    assert [(g["node_id"], g["address"]) for g in gone] == [("n3", cluster[3].address)]
    # the founder that left founded with 1: only the operator knows the total now
    assert result.totals()["check"] == "off"
    result.expect_total = 4.0
    assert result.totals()["check"] == "exact"


@pytest.mark.timeout(60)
def test_without_the_token_it_fails_with_one_clear_line(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    with GossipNode(make_model(), node_config("t0", "status", token_file=str(token))) as node:
        result = gosgd_status(node.address)
        assert result.returncode == 1
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"gosgd-status: {node.address}: missing or wrong cluster token")
        assert "--token-file" in lines[0] and "UNAUTHENTICATED" in lines[0]
        assert node.counters.get("rejected_token") == 1

        wrong = tmp_path / "wrong"
        wrong.write_text("0" * 64)
        assert gosgd_status(node.address, "--token-file", str(wrong)).returncode == 1

        ok = gosgd_status(node.address, "--token-file", str(token), "--json")
        assert ok.returncode == 0, ok.stderr
        assert [n["node_id"] for n in json.loads(ok.stdout)["nodes"]] == ["t0"]


@pytest.mark.timeout(60)
def test_with_mutual_tls_it_needs_a_cluster_certificate(tmp_path: Path) -> None:
    certs.write_cluster(tmp_path, ["a", "ops"])
    tls = {f"tls_{k}": str(tmp_path / f) for k, f in (("cert", "a.pem"), ("key", "a.key"),
                                                       ("ca", "ca.pem"))}  # fmt: skip
    with GossipNode(make_model(), node_config("a", "status", **tls)) as node:
        plain = gosgd_status(node.address)
        assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr
        flags = ["--tls-cert", str(tmp_path / "ops.pem"), "--tls-key", str(tmp_path / "ops.key"),
                 "--tls-ca", str(tmp_path / "ca.pem")]  # fmt: skip
        ok = gosgd_status(node.address, "--json", *flags)
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["nodes"][0]["node_id"] == "a"
        # the same, from Python
        client = PeerClient(Credentials.from_files(None, *flags[1::2]))
        try:
            assert client.status(node.address, 5).founded_weight == 1.0
        finally:
            client.close()


def test_bad_flags_are_one_line() -> None:
    result = gosgd_status("nowhere")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "is not HOST:PORT" in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gosgd_status_against_four_daemons_like_the_demo(node_processes) -> None:
    """The demo's cluster (4 gosgd-node processes, node 0 the seed of the others): during
    training every node answers; once all have finished, the total is the founders' exactly."""
    common = ["--cluster", "status-demo", "--model", "mlp", "--steps", "400", "--p", "0.1",
              "--eval-every", "0", "--wait-for-peers", "3", "--no-mdns",
              "--linger", "120"]  # fmt: skip
    first = node_processes("node-0", *common)
    others = [node_processes(f"node-{i}", *common, "--peers", first.address) for i in (1, 2, 3)]
    daemons = [first, *others]

    def report() -> dict:
        result = subprocess.run(
            [sys.executable, "-m", "gosgd_p2p.status", first.address, "--json"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    # during training: every node answers, all four founders count
    def training() -> bool:
        r = report()
        return len(r["nodes"]) == 4 and all(n["step"] > 0 for n in r["nodes"])

    wait_until(training, 120, "all 4 daemons training and answering")
    mid = report()
    assert sorted(n["node_id"] for n in mid["nodes"]) == [f"node-{i}" for i in range(4)]
    assert mid["founders_total"] == 4.0

    # the end: each has written its final record and lingers, answering Status
    wait_until(lambda: all(d.records() and d.records()[-1]["final"] for d in daemons), 240,
               "every daemon to finish")  # fmt: skip
    end = report()
    assert sorted(n["node_id"] for n in end["nodes"]) == [f"node-{i}" for i in range(4)]
    assert {n["state"] for n in end["nodes"]} == {"finished"}
    assert end["check"] == "exact" and abs(end["held"] - 4.0) <= 1e-9
    finals = {d.node_id: d.final()["weight"] for d in daemons}
    assert {n["node_id"]: n["weight"] for n in end["nodes"]} == finals
    for d in daemons:
        d.terminate()  # ends the linger
    assert [d.wait(60) for d in daemons] == [0, 0, 0, 0]


@pytest.mark.timeout(60)
def test_watch_refreshes_until_interrupted(cluster) -> None:
    first = cluster[0]
    code = "import sys; from gosgd_p2p.status import main; sys.exit(main(sys.argv[1:]))"
    watch = subprocess.Popen(
        [sys.executable, "-c", code, first.address, "--watch", "--json", "--interval", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert watch.stdout is not None
        rounds = [json.loads(watch.stdout.readline()) for _ in range(2)]  # one line a round
        train(cluster, 5)
        # a later round sees the steps taken since (it refreshes, not repeats)
        while (later := json.loads(watch.stdout.readline()))["nodes"][0]["step"] < 5:
            pass
    finally:
        watch.send_signal(signal.SIGINT)
        assert watch.wait(30) == 0, watch.stderr.read() if watch.stderr else ""
    assert all(len(r["nodes"]) == 4 for r in [*rounds, later])
    assert [n["step"] for n in later["nodes"]] == [5, 5, 5, 5]
