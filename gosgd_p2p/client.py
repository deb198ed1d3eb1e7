"""Calls to other nodes: one gRPC channel per peer address, every call with a deadline.

Thread-safe: the sender threads and the membership thread share one PeerClient.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc

from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import Chunk, decode_chunk, grpc_options, split_for_streaming

__all__ = ["PeerClient"]

SERVICE = "gosgd_p2p.v1.Gossip"


class PeerClient:
    """Channels to peers, opened on first use and closed by forget() or close()."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _channel(self, address: str) -> grpc.Channel:
        with self._lock:
            if self._closed:
                raise RuntimeError("client is closed")
            channel = self._channels.get(address)
            if channel is None:
                channel = grpc.insecure_channel(address, options=grpc_options())
                self._channels[address] = channel
            return channel

    def push(
        self, address: str, header: pb.StateHeader, payload: memoryview, timeout: float
    ) -> pb.PushAck:
        """Stream one message to `address`; returns its ack, raises grpc.RpcError on failure.

        `payload` must stay unchanged until this returns.
        """
        call = self._channel(address).stream_unary(
            f"/{SERVICE}/PushState",
            request_serializer=None,  # split_for_streaming yields wire bytes already
            response_deserializer=pb.PushAck.FromString,
        )
        ack: pb.PushAck = call(split_for_streaming(header, payload), timeout=timeout)
        return ack

    def hello(self, address: str, request: pb.HelloRequest, timeout: float) -> pb.HelloReply:
        """Exchange membership with `address`; raises grpc.RpcError on failure."""
        call = self._channel(address).unary_unary(
            f"/{SERVICE}/Hello",
            request_serializer=pb.HelloRequest.SerializeToString,
            response_deserializer=pb.HelloReply.FromString,
        )
        reply: pb.HelloReply = call(request, timeout=timeout)
        return reply

    def fetch(self, address: str, request: pb.FetchRequest, timeout: float) -> Iterator[Chunk]:
        """Ask `address` for its state; yields decoded chunks, raises grpc.RpcError on failure."""
        call = self._channel(address).unary_stream(
            f"/{SERVICE}/FetchState",
            request_serializer=pb.FetchRequest.SerializeToString,
            response_deserializer=None,  # decoded here, so a bad chunk is ours to report
        )
        for raw in call(request, timeout=timeout):
            yield decode_chunk(raw)

    def forget(self, address: str) -> None:
        """Close the channel to `address` (a peer that left)."""
        with self._lock:
            channel = self._channels.pop(address, None)
        if channel is not None:
            channel.close()

    def close(self) -> None:
        """Close every channel; later calls raise RuntimeError."""
        with self._lock:
            channels = list(self._channels.values())
            self._channels.clear()
            self._closed = True
        for channel in channels:
            channel.close()
