"""GossipNode through its Python API, with real gRPC servers on 127.0.0.1 port 0."""

from __future__ import annotations

import math
import socket
import threading

import grpc
import pytest
import torch
from children import HeldReceive
from conftest import node_config, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gosgd_p2p import GossipNode, NodeConfig, cluster_seed, consensus
from gosgd_p2p.client import PeerClient
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import (
    PROTOCOL_VERSION,
    Chunk,
    encode_chunk,
    join_message,
    split_for_streaming,
)

pytestmark = [pytest.mark.nodes, pytest.mark.timeout(120)]


def make_model(width: int = 16, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, width), torch.nn.BatchNorm1d(width), torch.nn.Linear(width, 2)
    )


def cfg(node_id: str, **kw) -> NodeConfig:
    return node_config(node_id, kw.pop("cluster", "unit"), **kw)


def local_steps(model: torch.nn.Module, node: GossipNode, steps: int, seed: int) -> None:
    """A user's own training loop with the one gossip line in it."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=gen)
        y = (x[:, 0] + x[:, 1] > 0).long()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        node.step()


def snapshot(node: GossipNode) -> list[torch.Tensor]:
    return [t.clone() for t in node.state]


def push_header(node: GossipNode, message_id: int = 1) -> pb.StateHeader:
    """The header of a push of weight 0.5 from a sender "x" that `node` will accept."""
    return pb.StateHeader(
        sender_id="x", message_id=message_id, weight=0.5, fingerprint=node.layout.fingerprint,
        encoding=pb.ENCODING_FP32, payload_bytes=node.layout.nbytes, cluster="unit",
        protocol_version=PROTOCOL_VERSION,
    )  # fmt: skip


def dead_address() -> str:
    """A loopback address nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_two_nodes_in_a_user_loop_gossip_and_conserve_weight() -> None:
    ma, mb = make_model(), make_model()
    a = GossipNode(ma, cfg("a", p=0.5))
    b = GossipNode(mb, cfg("b", p=0.5, peers=[a.address]))
    with a, b:
        wait_until(lambda: a.peers.live() and b.peers.live(), 10, "peers to meet")
        ta = threading.Thread(target=local_steps, args=(ma, a, 200, 1))
        ta.start()
        local_steps(mb, b, 200, 2)
        ta.join()
        b.finish()  # settles b's pushes; a still merges what b sent it
        a.finish()
        assert a.counters.get("merged_received") > 0 and b.counters.get("merged_received") > 0
        assert math.isclose(a.weight + b.weight, 2.0, rel_tol=0, abs_tol=1e-12)
        assert a.last_distance is not None and math.isfinite(a.last_distance)
        avg = consensus([a.state, b.state], [a.weight, b.weight])
        assert all(torch.isfinite(t).all() for t in avg)


def test_push_to_a_dead_peer_comes_back_and_the_peer_is_suspended() -> None:
    model = make_model()
    dead = dead_address()
    node = GossipNode(model, cfg("a", p=1.0, peers=[dead], push_timeout_s=5.0))
    with node:
        assert node.peers.live() == []  # its Hellos at start-up already failed
        node.peers.observe(dead, None, confirmed=True)  # as if it had answered, then died
        before = snapshot(node)
        for _ in range(12):
            node.step()  # no local update: returned messages must leave x where it was
            wait_until(lambda: node.in_flight == 0, 30, "the push to settle")
        wait_until(lambda: not node.peers.live(), 30, "the dead peer to be suspended")
        assert node.finish() == 1.0  # every half came home: exactly the founder's weight
        stats = node.stats()
        assert stats["pushes_returned"] == stats["pushes_started"] == 3  # then suspended
        assert stats["pushes_no_peer"] >= 1  # once suspended, nobody to push to
        for x, x0 in zip(node.state, before, strict=True):
            torch.testing.assert_close(x, x0)


def test_a_different_model_is_refused_and_touches_nothing() -> None:
    a = GossipNode(make_model(16), cfg("a", p=0.0))
    b = GossipNode(make_model(24), cfg("b", p=1.0, peers=[a.address]))
    with a, b:
        before = snapshot(a)
        for _ in range(5):
            b.step()
        assert b.finish() == 1.0
        assert a.finish() == 1.0
        assert a.counters.get("rejected_fingerprint") >= 1
        assert a.counters.get("pushes_received") == 0
        for x, x0 in zip(a.state, before, strict=True):
            assert torch.equal(x, x0)


def test_full_inbox_refuses_and_the_sender_takes_its_message_back() -> None:
    a = GossipNode(make_model(), cfg("a", p=0.0, inbox_size=1))
    b = GossipNode(make_model(), cfg("b", p=1.0, peers=[a.address], send_buffers=1))
    with a, b:
        # a never steps, so its single inbox slot stays taken after the first push
        for _ in range(6):
            b.step()
            wait_until(lambda: b.in_flight == 0, 30, "b's push to settle")
        assert a.counters.get("pushes_received") == 1
        assert a.counters.get("rejected_inbox_full") >= 1
        b.finish()
        a.finish()
        assert math.isclose(a.weight + b.weight, 2.0, rel_tol=0, abs_tol=1e-12)


def test_a_finished_node_refuses_pushes_and_is_marked_left() -> None:
    a = GossipNode(make_model(), cfg("a", p=0.0))
    b = GossipNode(make_model(), cfg("b", p=1.0, peers=[a.address]))
    with a, b:
        a.finish()
        b.step()
        wait_until(lambda: b.peers.get(a.address).status == "left", 30, "a to be marked left")
        assert b.finish() == 1.0
        assert a.counters.get("rejected_draining") >= 1


def test_a_finished_node_stays_left_while_it_lingers() -> None:
    """Its own Hellos and its last pushes must not make peers choose it again: a push that met
    its server shutting down would be unresolvable, and written off (found by deploy/smoke.sh:
    4 founders ended with 3.596416)."""
    a = GossipNode(make_model(), cfg("a", p=0.0))
    b = GossipNode(make_model(), cfg("b", p=0.0, peers=[a.address]))
    with a, b:
        wait_until(lambda: a.peers.live() and b.peers.live(), 10, "peers to meet")
        b.step(push_to=a.address)  # in flight as b finishes
        b.finish()
        a.membership.hello_peer(b.address)  # a's membership round: b is not accepting
        assert a.peers.get(b.address).status == "left"
        b.membership.hello_peer(a.address)  # b's membership round while it lingers
        a.step()  # merges b's last push, whose header names b's address
        assert a.stats()["merged_received"] == 1
        assert a.peers.get(b.address).status == "left" and a.peers.live() == []
        assert math.isclose(a.finish() + b.weight, 2.0, rel_tol=0, abs_tol=1e-12)


def test_a_push_held_at_a_receiver_as_it_closes_comes_back_whole() -> None:
    """A push still inside the receiver's server as it closes: its call is cut when the server
    stops, after its last byte left, so the sender cannot tell whether it arrived, and the
    receiver is gone before the sender can ask (CI lost 1.6 of 4 founders' weight this way).
    The receiver's closing Hello makes the sender ask while it still answers: ABORTED, so
    the weight comes back and the total is exact."""
    a = GossipNode(make_model(), cfg("a", p=0.0), network_process=False)  # held in-process
    b = GossipNode(make_model(), cfg("b", p=0.0, peers=[a.address]))
    hold = HeldReceive(a)
    with b:
        try:
            wait_until(lambda: a.peers.live() and b.peers.live(), 10, "peers to meet")
            hold.holding.set()
            b.step(push_to=a.address)  # half of b's weight, held inside a's server
            assert hold.held.wait(10), "the push never reached a's receiver"
            a.finish()
            hold.resume.set()  # the held call ends only when a's server stops
        finally:
            a.close()
        assert b.finish() == 1.0  # its push came back whole
        assert b.counters.get("pushes_returned") == 1
        assert b.counters.get("weight_written_off") == 0.0
    assert a.weight + b.weight == 2.0


def test_a_push_to_a_node_that_said_it_is_closing_stays_home() -> None:
    """Chosen just before its closing Hello came: the push is not sent, its weight comes back
    at once (the closing node would no longer answer for it)."""
    a = GossipNode(make_model(), cfg("a", p=0.0))
    b = GossipNode(make_model(), cfg("b", p=0.0, peers=[a.address]))
    with a, b:
        wait_until(lambda: b.peers.live(), 10, "b to meet a")
        assert b.sender.settle_pushes_to(a.address) == 0  # as a's closing Hello does
        b.step(push_to=a.address)  # split, handed back, merged back in the same step
        assert b.counters.get("pushes_started") == 0
        assert b.counters.get("pushes_returned") == 1
        assert b.counters.get("merged_returned") == 1
        assert b.in_flight == 0 and b.weight == 1.0 and a.weight == 1.0


def test_duplicate_delivery_is_applied_once() -> None:
    a = GossipNode(make_model(), cfg("a", p=0.0))
    client = PeerClient()
    with a:
        header = push_header(a, message_id=7)
        payload = memoryview(torch.zeros(a.layout.numel).numpy()).cast("B")
        first = client.push(a.address, header, payload, timeout=10)
        second = client.push(a.address, header, payload, timeout=10)
        assert not first.duplicate and second.duplicate
        assert a.finish() == 1.5  # merged once, not twice
        client.close()


def test_malformed_and_truncated_streams_get_invalid_argument() -> None:
    a = GossipNode(make_model(), cfg("a", p=0.0))
    channel = grpc.insecure_channel(a.address)
    push = channel.stream_unary("/gosgd_p2p.v1.Gossip/PushState", request_serializer=None)
    header = push_header(a)
    with a:
        before = snapshot(a)
        cases = {
            "garbage": [b"\xff\xff\xff\xff"],
            "truncated": [encode_chunk(Chunk(header=header)), encode_chunk(Chunk(data=b"\0" * 8))],
            "no header": [encode_chunk(Chunk(data=b"\0" * 8))],
        }
        for name, chunks in cases.items():
            with pytest.raises(grpc.RpcError) as info:
                push(iter(chunks), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert a.finish() == 1.0
        assert a.counters.get("pushes_received") == 0
        for x, x0 in zip(a.state, before, strict=True):
            assert torch.equal(x, x0)
    channel.close()


def test_malformed_and_truncated_push_messages_get_invalid_argument() -> None:
    a = GossipNode(make_model(), cfg("a", p=0.0))
    channel = grpc.insecure_channel(a.address)
    push = channel.unary_unary("/gosgd_p2p.v1.Gossip/PushMessage", request_serializer=None)
    header = push_header(a)
    payload = memoryview(torch.zeros(a.layout.numel).numpy()).cast("B")
    whole = list(split_for_streaming(header, payload))
    with a:
        before = snapshot(a)
        cases = {
            "garbage": b"\x0a\xff\xff\xff\xff",  # a chunk longer than the message
            "garbage chunk": join_message([b"\xff\xff\xff\xff"]),
            "truncated": join_message(whole[:1] + [encode_chunk(Chunk(data=b"\0" * 8))]),
            "no header": join_message(whole[1:]),
            "empty": b"",
        }
        for name, message in cases.items():
            with pytest.raises(grpc.RpcError) as info:
                push(message, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert a.counters.get("pushes_received") == 0
        ack = pb.PushAck.FromString(push(join_message(whole), timeout=10))  # the same, whole
        assert ack.receiver_id == "a" and not ack.duplicate
        assert a.finish() == 1.5
        for x, x0 in zip(a.state, before, strict=True):
            assert torch.allclose(x, x0 * 2 / 3, rtol=1e-6, atol=0)  # (1.0 x + 0.5 * 0) / 1.5
    channel.close()


def test_a_late_node_joins_with_its_donors_state_and_half_its_weight() -> None:
    ma = make_model()
    a = GossipNode(ma, cfg("a", p=0.0))
    stop = threading.Event()

    def keep_training() -> None:
        while not stop.is_set():
            local_steps(ma, a, 1, 3)

    trainer = threading.Thread(target=keep_training)
    trainer.start()
    try:
        wait_until(lambda: a.step_count > 5, 30, "a to train")
        j = GossipNode(make_model(seed=99), cfg("j", p=0.0, peers=[a.address]))
    finally:
        stop.set()
        trainer.join()
    with a, j:
        assert j.weight > 0.0 and j.counters.get("bytes_received") == a.layout.nbytes
        assert a.counters.get("donations") == 1
        assert math.isclose(a.finish() + j.finish(), 1.0, rel_tol=0, abs_tol=1e-12)
        assert a.weight == j.weight == 0.5  # the donor halved, the joiner took that half


def test_founders_waiting_for_peers_start_only_once_every_one_has_met_as_many() -> None:
    # b and c know only a: they meet each other through the wait itself, since the membership
    # rounds (30 s) are too slow to. A wait that returned as soon as a had met b and c (the
    # peer table's wait_live) would leave b and c with one peer each: the first node would
    # train alone and give its weight away before the others start.
    slow = {"hello_interval_s": 30.0, "p": 0.0}
    a = GossipNode(make_model(), cfg("a", **slow))
    b = GossipNode(make_model(), cfg("b", peers=[a.address], **slow))
    c = GossipNode(make_model(), cfg("c", peers=[a.address], **slow))
    nodes = (a, b, c)
    seen: dict[str, tuple[bool, list[int]]] = {}

    def wait(node: GossipNode) -> None:
        ready = node.wait_for_peers(2, timeout_s=20)
        # what every node had met at the moment this one would have started training
        seen[node.config.node_id] = (ready, [len(n.peers.pushable()) for n in nodes])

    with a, b, c:
        threads = [threading.Thread(target=wait, args=(n,)) for n in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert seen == {name: (True, [2, 2, 2]) for name in "abc"}, seen
        assert all(n.weight == 1.0 and not n.joined for n in nodes)  # all three founded


def test_a_node_waiting_for_peers_goes_once_a_peer_has_begun_training() -> None:
    # two founders; a no longer waits and trains. The other two b waits for will never come,
    # and waiting for them would only put b further behind a.
    ma = make_model()
    a = GossipNode(ma, cfg("a", p=0.0))
    b = GossipNode(make_model(), cfg("b", p=0.0, peers=[a.address]))
    with a, b:
        local_steps(ma, a, 3, 1)
        assert b.wait_for_peers(3, timeout_s=20) is True
        assert len(b.peers.pushable()) == 1


def test_health_is_serving_while_training_and_not_after_finish() -> None:
    a = GossipNode(make_model(), cfg("a", p=0.0))
    channel = grpc.insecure_channel(a.address)
    stub = health_pb2_grpc.HealthStub(channel)
    with a:
        request = health_pb2.HealthCheckRequest(service="")
        assert stub.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        a.finish()
        status = stub.Check(request, timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    channel.close()


def test_cluster_seed_gives_founders_the_same_start() -> None:
    def build(cluster: str) -> list[torch.Tensor]:
        torch.manual_seed(cluster_seed(cluster))
        return [p.detach() for p in torch.nn.Linear(8, 8).parameters()]

    same = zip(build("run-1"), build("run-1"), strict=True)
    assert all(torch.equal(x, y) for x, y in same)
    assert not torch.equal(build("run-1")[0], build("run-2")[0])


def test_a_node_restarted_under_the_same_id_is_not_taken_for_a_duplicate() -> None:
    """Message ids must not repeat across restarts: receivers remember applied ids."""
    a = GossipNode(make_model(), cfg("a", p=0.0, inbox_size=16))
    with a:
        for life in range(2):
            b = GossipNode(make_model(), cfg("b", p=1.0, peers=[a.address]))
            with b:
                for _ in range(3):
                    b.step()
                    wait_until(lambda b=b: b.in_flight == 0, 30, "b's push to settle")
                assert b.finish() == 0.5**3
            assert a.counters.get("pushes_received") == 3 * (life + 1)
        assert a.counters.get("pushes_duplicate") == 0
        assert a.finish() == 1.0 + 2 * (1.0 - 0.5**3)


def test_senders_choose_their_chunk_size_and_receivers_take_any() -> None:
    """4 KiB chunks one way, 4 MiB (one chunk for this model) the other: both merge exactly."""
    ma, mb = make_model(width=600, seed=1), make_model(width=600, seed=2)
    a = GossipNode(ma, cfg("a", p=0.0, chunk_bytes=4096))
    b = GossipNode(mb, cfg("b", p=0.0, chunk_bytes=4 << 20, peers=[a.address]))
    with a, b:
        assert a.layout.nbytes > 4 * 4096  # several chunks from a, one from b
        wait_until(lambda: a.peers.live() and b.peers.live(), 10, "peers to meet")
        xa, xb = snapshot(a), snapshot(b)
        a.step(push_to=b.address)
        b.step(push_to=a.address)
        wait_until(lambda: a.in_flight == b.in_flight == 0, 30, "pushes to settle")
        a.step()
        b.step()
        assert a.stats()["merged_received"] == b.stats()["merged_received"] == 1
        assert math.isclose(a.finish() + b.finish(), 2.0, rel_tol=0, abs_tol=1e-12)
        for got, x0, xs in zip(a.state, xa, xb, strict=True):  # a: (xa/2 + xb/2) / 1
            torch.testing.assert_close(got, (x0 + xs) / 2)
    with pytest.raises(ValueError, match="chunk_bytes"):
        cfg("c", chunk_bytes=8 << 20)
