"""Protected by default: with no token or TLS a node answers Gossip calls from loopback
callers only; a stranger off the host gets PERMISSION_DENIED and moves no weight."""

from __future__ import annotations

import socket
import threading
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
import torch
from conftest import node_config, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gosgd_p2p import GossipNode
from gosgd_p2p.client import PeerClient, PushFailed
from gosgd_p2p.discovery import advertise_host
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import PROTOCOL_VERSION, Chunk, encode_chunk

pytestmark = pytest.mark.nodes

SERVICE = "/gosgd_p2p.v1.Gossip/"
LAN_HOST = advertise_host("0.0.0.0", None)
needs_lan = pytest.mark.skipif(
    LAN_HOST.startswith("127."), reason="this host has no non-loopback IPv4 address"
)


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def stranger_calls(address: str) -> dict[str, grpc.StatusCode]:
    """Every Gossip call a stranger could try, and the status each got."""
    codes: dict[str, grpc.StatusCode] = {}
    with grpc.insecure_channel(address) as channel:

        def unary(method: str, request: bytes) -> None:
            try:
                channel.unary_unary(SERVICE + method)(request, timeout=10)
                codes[method] = grpc.StatusCode.OK
            except grpc.RpcError as err:
                codes[method] = err.code()

        hello = pb.HelloRequest(
            self=pb.PeerInfo(node_id="n2", address="10.9.9.9:1"),
            cluster="protected",
            protocol_version=PROTOCOL_VERSION,
        )
        unary("Hello", hello.SerializeToString())
        resolve = pb.ResolveRequest(sender_id="x", message_id=1)
        unary("ResolvePush", resolve.SerializeToString())
        header = pb.StateHeader(sender_id="x", message_id=1, weight=1e6)
        push = pb.StateMessage(chunks=[pb.StateChunk(header=header)])
        unary("PushMessage", push.SerializeToString())
        fetch = pb.FetchRequest(node_id="x", cluster="protected", protocol_version=1)
        try:
            list(
                channel.unary_stream(SERVICE + "FetchState")(fetch.SerializeToString(), timeout=10)
            )
            codes["FetchState"] = grpc.StatusCode.OK
        except grpc.RpcError as err:
            codes["FetchState"] = err.code()
        probe = health_pb2_grpc.HealthStub(channel)
        reply = probe.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        codes["health"] = (
            grpc.StatusCode.OK
            if reply.status == health_pb2.HealthCheckResponse.SERVING
            else grpc.StatusCode.UNAVAILABLE
        )
    return codes


@needs_lan
@pytest.mark.timeout(60)
def test_a_node_without_a_token_refuses_strangers_off_the_host(caplog) -> None:
    """Issue 18.4: on 0.0.0.0 with no token, a caller from the LAN may only probe health."""
    with caplog.at_level("WARNING", logger="gosgd_p2p"):
        node = GossipNode(small_model(), node_config("a", "protected", listen="0.0.0.0:0"))
    with node:
        assert "protected mode" in caplog.text and "--token-file" in caplog.text
        port = node.address.rpartition(":")[2]
        codes = stranger_calls(f"{LAN_HOST}:{port}")
        denied = grpc.StatusCode.PERMISSION_DENIED
        assert codes == {
            "Hello": denied,
            "ResolvePush": denied,
            "PushMessage": denied,
            "FetchState": denied,
            "health": grpc.StatusCode.OK,
        }, codes
        assert node.counters.get("rejected_protected") == 4
        assert node.peers.all() == []  # the spoofed Hello taught it nothing
        assert node.finish() == 1.0


@needs_lan
@pytest.mark.timeout(60)
def test_insecure_opens_the_node_and_says_so(caplog) -> None:
    with caplog.at_level("WARNING", logger="gosgd_p2p"):
        cfg = node_config("a", "protected", listen="0.0.0.0:0", insecure=True)
        node = GossipNode(small_model(), cfg)
    with node:
        assert "insecure: no cluster token or TLS" in caplog.text
        port = node.address.rpartition(":")[2]
        codes = stranger_calls(f"{LAN_HOST}:{port}")
        assert codes["Hello"] == grpc.StatusCode.OK
        assert node.counters.get("rejected_protected") == 0


@pytest.mark.timeout(60)
def test_loopback_callers_may_gossip_with_a_protected_node() -> None:
    node = GossipNode(small_model(), node_config("a", "protected"))
    with node:
        codes = stranger_calls(node.address)
        assert codes["Hello"] == grpc.StatusCode.OK
        assert codes["ResolvePush"] == grpc.StatusCode.OK
        assert node.counters.get("rejected_protected") == 0


@pytest.mark.timeout(120)
def test_fetchstate_from_callers_that_are_not_joining_nodes_gives_nothing() -> None:
    """Issue 18.4: 30 FetchState calls from a non-node (no address, a closed port, the address
    of a node that already has a state, or the donor itself) take no weight."""
    a = GossipNode(small_model(), node_config("a", "protected", p=0.0))
    b = GossipNode(small_model(), node_config("b", "protected", p=0.0, peers=[a.address]))
    stop = threading.Event()

    def train() -> None:  # a donates on its training thread, as a real donor does
        while not stop.is_set():
            a.step()
            stop.wait(0.01)

    trainer = threading.Thread(target=train, name="train-a")
    trainer.start()
    codes = []
    try:
        with grpc.insecure_channel(a.address) as channel:
            fetch_state = channel.unary_stream(SERVICE + "FetchState")
            for i in range(30):
                address = ["", f"127.0.0.1:{free_port()}", b.address, a.address][i % 4]
                request = pb.FetchRequest(
                    node_id=["thief", "b", "a"][i % 3] + str(i // 4),
                    cluster="protected",
                    fingerprint=a.layout.fingerprint,
                    protocol_version=PROTOCOL_VERSION,
                    address=address,
                )
                try:
                    list(fetch_state(request.SerializeToString(), timeout=10))
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as err:
                    codes.append(err.code())
    finally:
        stop.set()
        trainer.join(30)
    with a, b:
        assert codes == [grpc.StatusCode.FAILED_PRECONDITION] * 30, codes
        assert a.counters.get("rejected_not_a_joiner") == 30
        assert a.counters.get("donations") == 0
        total = a.finish() + b.finish()
        assert total == 2.0 and a.weight == 1.0, (a.weight, b.weight)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(120)
def test_a_spoofed_hello_cannot_move_a_node_to_another_address() -> None:
    """Issue 18.4: "I am b, at ADDR" from a caller moves no push away from b."""
    b = GossipNode(small_model(), node_config("b", "protected", p=0.0))
    a = GossipNode(small_model(), node_config("a", "protected", p=1.0, peers=[b.address]))
    with a, b:
        wait_until(
            lambda: [p.address for p in a.peers.pushable()] == [b.address], 30, "a to meet b"
        )
        fake = f"127.0.0.1:{free_port()}"
        hello = pb.HelloRequest(
            self=pb.PeerInfo(node_id="b", address=fake),
            cluster="protected",
            protocol_version=PROTOCOL_VERSION,
            peers=[pb.PeerInfo(node_id="b", address=fake)],
        )
        with grpc.insecure_channel(a.address) as channel:
            for _ in range(20):
                channel.unary_unary(SERVICE + "Hello")(hello.SerializeToString(), timeout=10)
        for _ in range(20):
            a.step()
            wait_until(lambda: a.in_flight == 0, 30, "the push to settle")
            b.step()  # merges what came, so b's inbox never fills
        assert a.peers.get(b.address) is not None and a.peers.get(b.address).node_id == "b"
        assert a.counters.get("pushes_acked") == b.counters.get("pushes_received") > 0
        assert a.counters.get("pushes_returned") == 0  # none went to the made-up address
        wait_until(lambda: a.peers.get(fake) is None, 30, "the made-up address to expire")
        assert a.finish() + b.finish() == 2.0


@pytest.mark.timeout(60)
def test_a_message_heavier_than_max_weight_is_refused_and_counted() -> None:
    """Issue 18.4: a token holder's push of weight 1e6 (the old maximum) is refused."""
    a = GossipNode(small_model(), node_config("a", "protected", p=0.0))  # max_weight 1024
    with a:
        header = a._me.header(1e6, 1)
        header.sender_id = "heavy"
        payload = memoryview(bytearray(a.layout.nbytes))
        client = PeerClient()
        try:
            with pytest.raises(PushFailed) as info:
                client.push(a.address, header, payload, timeout=10)
        finally:
            client.close()
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "<= 1024" in info.value.details
        assert a.counters.get("rejected_weight") == 1
        assert a.finish() == 1.0


class _Trickle:
    """A caller that opens a PushState stream with a valid header and then sends 4 bytes of
    payload every `every_s` seconds (a slowloris), until closed."""

    def __init__(self, address: str, header: pb.StateHeader, every_s: float) -> None:
        self._stop = threading.Event()
        self.sent = 0  # payload chunks sent so far
        self._channel = grpc.insecure_channel(address)
        call = self._channel.stream_unary(SERVICE + "PushState")
        self.future = call.future(self._chunks(header, every_s), timeout=60)

    def _chunks(self, header: pb.StateHeader, every_s: float) -> Iterator[bytes]:
        yield encode_chunk(Chunk(header=header))
        offset = 0
        while not self._stop.wait(every_s):  # the attacker's pace, not a synchronisation
            yield encode_chunk(Chunk(offset=offset, data=b"\0\0\0\0"))
            offset += 4
            self.sent += 1

    def close(self) -> None:
        self._stop.set()
        self.future.cancel()
        self._channel.close()


@pytest.mark.timeout(120)
def test_trickling_streams_cannot_hold_the_inbox() -> None:
    """Issue 18.5: 4 streams that send a valid header and then 4 bytes every 0.5 s held all
    4 receive buffers. Now one host holds at most 3, and honest pushes still get in (each
    cuts the slowest trickle)."""
    # b's receive buffers are read in this process (threads mode, whatever --push-mode says)
    b = GossipNode(
        small_model(),
        node_config("b", "protected", p=0.0, inbox_size=4),
        network_process=False,
    )
    a = GossipNode(small_model(), node_config("a", "protected", p=1.0, peers=[b.address]))
    trickles: list[_Trickle] = []
    with a, b:
        wait_until(lambda: a.peers.pushable() != [], 30, "a to meet b")
        for i in range(4):
            header = a._me.header(0.5, 1)
            header.sender_id = f"slowloris-{i}"
            trickles.append(_Trickle(b.address, header, every_s=0.5))
        try:
            # one host holds at most inbox_size - 1 buffers: the 4th trickle is refused
            wait_until(
                lambda: b.receiver._pool.in_use == 3 and any(t.future.done() for t in trickles),
                30,
                "3 trickles to hold b's buffers and the 4th to be refused",
            )
            (refused,) = [t for t in trickles if t.future.done()]
            assert refused.future.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert b.counters.get("rejected_caller_busy") == 1
            trickles.remove(refused)
            refused.close()
            # each has trickled for longer than the grace a new stream gets to show its rate
            wait_until(lambda: all(t.sent >= 4 for t in trickles), 30, "the trickles to trickle")
            for _ in range(8):
                a.step()
                wait_until(lambda: a.in_flight == 0, 30, "the push to settle")
                b.step()  # merges what came
            assert b.counters.get("pushes_received") == a.counters.get("pushes_acked") == 8, (
                a.stats(),
                b.stats(),
            )
            assert b.counters.get("rejected_too_slow") >= 1  # a trickle gave its buffer up
        finally:
            for trickle in trickles:
                trickle.close()
        assert a.finish() + b.finish() == 2.0


class _CountingClient(PeerClient):
    """Counts Hello calls by address."""

    def __init__(self) -> None:
        super().__init__()
        self.hellos: Counter[str] = Counter()

    def hello(self, address, request, timeout):  # noqa: ANN001, ANN201
        self.hellos[address] += 1
        return super().hello(address, request, timeout)


@pytest.mark.timeout(120)
def test_a_hello_flood_of_made_up_addresses_is_dialed_once_and_forgotten() -> None:
    """Issue 18.5: Hellos listing hundreds of closed addresses made a node dial them for
    minutes; now each is dialed at most once (a few a round) and forgotten at its failure."""
    client = _CountingClient()
    a = GossipNode(small_model(), node_config("a", "protected", p=0.0), client=client)
    made_up = [f"127.0.0.{2 + i // 100}:{free_port()}" for i in range(200)]
    with a, grpc.insecure_channel(a.address) as channel:
        hello = channel.unary_unary(SERVICE + "Hello")
        for start in range(0, len(made_up), 50):
            request = pb.HelloRequest(
                self=pb.PeerInfo(node_id=f"ghost-{start}", address=made_up[start]),
                cluster="protected",
                protocol_version=PROTOCOL_VERSION,
                peers=[pb.PeerInfo(node_id=f"ghost-{i}", address=made_up[i])
                       for i in range(start, start + 50)],
            )  # fmt: skip
            hello(request.SerializeToString(), timeout=10)
        wait_until(lambda: a.peers.all() == [], 60, "the made-up addresses to be forgotten")
        assert max(client.hellos[address] for address in made_up) == 1, client.hellos
