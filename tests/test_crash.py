"""kill -9 in the middle of a stream, and restarting from a checkpoint."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator

import pytest
import torch
from conftest import wait_until

from gosgd_p2p import GossipNode, NodeConfig, checkpoint, cluster_seed
from gosgd_p2p.client import PeerClient
from gosgd_p2p.models import build_model
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import CHUNK_BYTES, Chunk, split_for_streaming

pytestmark = [pytest.mark.nodes, pytest.mark.timeout(240)]

CLUSTER = "crash"
# ResNet-18 (44.7 MB of state, 43 chunks): big enough that a stream can be caught half-way
BIG = ("--model", "resnet18", "--dataset", "digits", "--cluster", CLUSTER, "--no-mdns")


def big_model() -> torch.nn.Module:
    torch.manual_seed(cluster_seed(CLUSTER))
    return build_model("resnet18", (1, 8, 8), 10)


def cfg(node_id: str, **kw) -> NodeConfig:
    return NodeConfig(node_id=node_id, cluster=CLUSTER, mdns=False, **kw)


@pytest.mark.slow
def test_kill_9_of_a_sender_mid_stream_leaves_the_receiver_untouched(node_processes) -> None:
    # the receiver's server in this process: the test holds its stream (the sender daemon
    # follows --push-mode)
    receiver = GossipNode(big_model(), cfg("r", p=0.0), network_process=False)
    mid_stream, resume = threading.Event(), threading.Event()
    real_receive = receiver.receiver.receive_push

    def held_receive(
        chunks: Iterator[Chunk], peer: str, active: Callable[[], bool], cancel: Callable[[], object]
    ) -> pb.PushAck:
        def held() -> Iterator[Chunk]:
            for i, chunk in enumerate(chunks):
                if i == 3:  # header and two data chunks in: hold the stream here
                    mid_stream.set()
                    resume.wait(60)
                yield chunk

        return real_receive(held(), peer, active, cancel)

    receiver.receiver.receive_push = held_receive  # type: ignore[method-assign]
    with receiver:
        before = [t.clone() for t in receiver.state]
        sender = node_processes("s", *BIG, "--p", "1.0", "--steps", "100000", "--eval-every", "0",
                                "--peers", receiver.address)  # fmt: skip
        assert mid_stream.wait(120), sender.stderr()
        sender.kill()
        sender.wait(30)
        resume.set()
        wait_until(
            lambda: sum(v for k, v in receiver.counters.snapshot().items() if "rejected" in k),
            30,
            "the partial message to be refused",
        )
        assert receiver.counters.get("pushes_received") == 0
        assert receiver.finish() == 1.0  # no partial weight
        assert all(torch.equal(x, y) for x, y in zip(receiver.state, before, strict=True))


class _HeldClient(PeerClient):
    """Streams a few chunks of each push, then waits for `resume` before the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.mid_stream, self.resume = threading.Event(), threading.Event()

    def push(self, address, header, payload, timeout, chunk_bytes=CHUNK_BYTES):  # noqa: ANN001, ANN201
        def held() -> Iterator[bytes]:
            for i, raw in enumerate(split_for_streaming(header, payload, chunk_bytes)):
                if i == 3:
                    self.mid_stream.set()
                    self.resume.wait(60)
                yield raw

        return self.push_chunks(address, held(), timeout)


@pytest.mark.slow
def test_kill_9_of_a_receiver_mid_stream_returns_the_weight(node_processes) -> None:
    receiver = node_processes("r", *BIG, "--p", "0", "--steps", "100000", "--eval-every", "0")
    client = _HeldClient()
    sender = GossipNode(big_model(), cfg("s", p=1.0, peers=[receiver.address]), client=client)
    with sender:
        weight = sender.weight
        assert weight > 0  # founded or joined: either way it holds some weight
        sender.step()
        assert client.mid_stream.wait(60)
        receiver.kill()
        receiver.wait(30)
        client.resume.set()
        wait_until(lambda: sender.in_flight == 0, 60, "the push to fail")
        assert sender.counters.get("pushes_returned") == 1
        assert sender.counters.get("pushes_resolved_committed") == 0
        assert sender.finish() == weight  # the half that was streaming came back, exactly


@pytest.mark.slow
def test_a_restarted_node_resumes_from_its_checkpoint_and_rejoins(node_processes, tmp_path) -> None:
    train = ("--model", "cnn", "--dataset", "digits", "--p", "0.1", "--no-mdns")
    ckpt = str(tmp_path / "ckpt-b")
    a = node_processes("a", *train, "--steps", "900", "--eval-every", "50", "--wait-for-peers", "1")
    b_args = (*train, "--steps", "600", "--eval-every", "50", "--checkpoint-dir", ckpt,
              "--checkpoint-every", "40", "--peers", a.address)  # fmt: skip
    b = node_processes("b", *b_args, "--wait-for-peers", "1")
    wait_until(lambda: a.records() and b.records(), 120, "both to start training")
    wait_until(lambda: any(r["step"] >= 150 for r in b.records()), 120, "b to train")
    b.kill()
    b.wait(30)
    saved = checkpoint.latest(ckpt)
    assert saved is not None
    step = saved[0]["step"]
    assert step >= 120 and step % 40 == 0

    b2 = node_processes("b2", *b_args, "--node-id", "b")  # the same node, restarted
    for node in (a, b2):
        assert node.wait(240) == 0, node.stderr()
    assert f"at step {step} (rejoined the cluster)" in b2.stderr(), b2.stderr()
    records = b2.records()
    assert records[0]["step"] == step  # resumed its step count
    assert records[0]["test_accuracy"] >= 0.9  # the cluster's model, not a fresh one
    assert b2.final()["step"] == 600 and b2.final()["test_accuracy"] >= 0.95
    # b's weight at the kill is gone; the restart invented none
    total = a.final()["weight"] + b2.final()["weight"]
    assert 0.0 < total < 2.0


def test_a_corrupt_checkpoint_is_reported_and_the_previous_one_used(tmp_path, caplog) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in (10, 20, 30, 40):
        checkpoint.save(
            tmp_path,
            {"step": step, "weight": 0.5, "model": model.state_dict(),
             "optimizer": opt.state_dict(), "node_id": "n"},
        )  # fmt: skip
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"ckpt-{s:010d}.pt" for s in (20, 30, 40)]  # the newest three are kept
    newest = tmp_path / "ckpt-0000000040.pt"
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated
    flipped = tmp_path / "ckpt-0000000030.pt"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit
    flipped.write_bytes(bytes(data))
    (tmp_path / ".ckpt-0000000050.pt.tmp-1").write_bytes(b"half a write")  # ignored
    state, path = checkpoint.latest(tmp_path)  # type: ignore[misc]
    assert path.name == "ckpt-0000000020.pt" and state["step"] == 20
    assert caplog.text.count("is unusable") == 2
    assert math.isclose(state["weight"], 0.5)
