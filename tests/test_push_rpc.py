"""Which call a push takes: PushMessage for a payload of one chunk, PushState otherwise, and
PushState for a node older than PushMessage (it answers UNIMPLEMENTED), remembered per peer."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from gosgd_p2p.client import PeerClient, PushFailed
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import PROTOCOL_VERSION, assemble, decode_chunk, first_header, split_message

pytestmark = pytest.mark.timeout(60)


class Receiver(grpc.GenericRpcHandler):
    """A gRPC server that records the methods it is asked for and what each push carried;
    `unary=False` makes it a node older than PushMessage."""

    def __init__(self, unary: bool) -> None:
        self.unary = unary
        self.asked: list[str] = []
        self.payloads: list[bytes] = []
        self.hold: threading.Event | None = None  # set: the ack waits for it
        self._server = grpc.server(ThreadPoolExecutor(max_workers=2, thread_name_prefix="spy"))
        self._server.add_generic_rpc_handlers((self,))
        self.address = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method.rsplit("/", 1)[-1]  # type: ignore[attr-defined]
        self.asked.append(method)
        if method == "PushState":
            return grpc.stream_unary_rpc_method_handler(
                self._receive, response_serializer=pb.PushAck.SerializeToString
            )
        if method == "PushMessage" and self.unary:
            return grpc.unary_unary_rpc_method_handler(
                lambda raw, ctx: self._receive(split_message(raw), ctx),
                response_serializer=pb.PushAck.SerializeToString,
            )
        return None  # UNIMPLEMENTED, as an older node answers

    def _receive(self, raw_chunks: Iterable[bytes | memoryview], _: object) -> pb.PushAck:
        chunks: Iterator = (decode_chunk(raw) for raw in raw_chunks)
        header = first_header(chunks)
        out = bytearray(header.payload_bytes)
        assemble(header, chunks, memoryview(out))
        self.payloads.append(bytes(out))
        if self.hold is not None:
            self.hold.wait(30)
        return pb.PushAck(receiver_id="spy")

    def stop(self) -> None:
        self._server.stop(0)


def _header(message_id: int, payload: bytes) -> pb.StateHeader:
    return pb.StateHeader(
        sender_id="x", message_id=message_id, weight=0.5, encoding=pb.ENCODING_FP32,
        payload_bytes=len(payload), cluster="unit", protocol_version=PROTOCOL_VERSION,
    )  # fmt: skip


@pytest.fixture
def client() -> Iterator[PeerClient]:
    c = PeerClient()
    yield c
    c.close()


def test_a_one_chunk_payload_takes_one_pushmessage_call_and_a_larger_one_streams(
    client: PeerClient,
) -> None:
    node = Receiver(unary=True)
    try:
        small, large = bytes(range(200)), bytes(range(250)) * 4
        ack = client.push(node.address, _header(1, small), memoryview(small), 10, chunk_bytes=256)
        assert ack.receiver_id == "spy" and node.asked == ["PushMessage"]
        client.push(node.address, _header(2, large), memoryview(large), 10, chunk_bytes=256)
        assert node.asked == ["PushMessage", "PushState"]  # 1000 bytes: 4 chunks of 256
        assert node.payloads == [small, large]
    finally:
        node.stop()


def test_an_older_node_gets_the_stream_and_is_remembered_as_stream_only(
    client: PeerClient,
) -> None:
    old = Receiver(unary=False)
    try:
        payload = bytes(range(100))
        for message_id in (1, 2):
            ack = client.push(old.address, _header(message_id, payload), memoryview(payload), 10)
            assert ack.receiver_id == "spy"
        # the first push tried PushMessage, got UNIMPLEMENTED (nothing delivered) and streamed;
        # the second went straight to the stream
        assert old.asked == ["PushMessage", "PushState", "PushState"]
        assert old.payloads == [payload, payload]  # each message arrived once
        client.forget(old.address)  # a peer that left and came back may have been upgraded
        client.push(old.address, _header(3, payload), memoryview(payload), 10)
        assert old.asked[3:] == ["PushMessage", "PushState"]
    finally:
        old.stop()


def test_a_pushmessage_to_nobody_certainly_failed(client: PeerClient) -> None:
    node = Receiver(unary=True)
    address = node.address
    node.stop()
    payload = bytes(8)
    with pytest.raises(PushFailed) as err:
        client.push(address, _header(1, payload), memoryview(payload), 5)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert not err.value.maybe_delivered  # never connected: nothing can have arrived


def test_a_pushmessage_whose_ack_never_came_may_have_been_delivered(client: PeerClient) -> None:
    node = Receiver(unary=True)
    node.hold = threading.Event()
    try:
        payload = bytes(8)
        with pytest.raises(PushFailed) as err:
            client.push(node.address, _header(1, payload), memoryview(payload), 0.5)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert err.value.maybe_delivered  # the node holds it: only ResolvePush can tell
        assert node.payloads == [payload]
    finally:
        node.hold.set()
        node.stop()
