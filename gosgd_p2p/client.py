"""Calls to other nodes: one gRPC channel per peer address, every call with a deadline.

Thread-safe: the sender threads and the membership thread share one PeerClient.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import TypeVar

import grpc

from gosgd_p2p.security import Credentials
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import (
    CHUNK_BYTES,
    Chunk,
    decode_chunk,
    grpc_options,
    join_message,
    split_for_streaming,
)

__all__ = ["PeerClient", "PushFailed"]

SERVICE = "gosgd_p2p.v1.Gossip"
T = TypeVar("T")

#: Statuses our server gives only before committing a message: the push certainly failed.
NOT_DELIVERED = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


class PushFailed(Exception):
    """A push without an ack.

    `maybe_delivered` is True when the receiver may have committed it: every chunk, the last
    included, was handed to gRPC, a connection was made, and the status does not say the
    receiver refused it (a deadline or a cut connection after the last chunk). Otherwise the
    push certainly failed.
    """

    def __init__(self, code: grpc.StatusCode, details: str, maybe_delivered: bool) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.maybe_delivered = maybe_delivered


def _failed(err: grpc.RpcError, all_sent: bool) -> PushFailed:
    """The PushFailed for a push call that ended with `err`; `all_sent`: its last chunk was
    handed to gRPC. It may have been delivered only then, once connected, and when the status
    is not one our server gives before committing."""
    code = err.code()
    # A connection that was never made delivered nothing, however many chunks gRPC had already
    # taken into its buffers (a small message is taken whole at once).
    never_connected = "failed to connect" in (err.details() or "").lower()
    maybe = all_sent and code not in NOT_DELIVERED and not never_connected
    return PushFailed(code, err.details() or "", maybe)


class _Unimplemented(Exception):
    """The peer has no PushMessage (a node older than it)."""


class _Tracked(Iterable[T]):
    """Yields the items of `items` and records when the last one has been taken."""

    def __init__(self, items: Iterator[T]) -> None:
        self._items = items
        self.last_taken = False

    def __iter__(self) -> Iterator[T]:
        sentinel = object()
        current = next(self._items, sentinel)
        while current is not sentinel:
            following = next(self._items, sentinel)
            if following is sentinel:
                self.last_taken = True
            yield current  # type: ignore[misc]
            current = following


class PeerClient:
    """Channels to peers, opened on first use; at most `max_channels` stay open (the least
    recently used is closed first), so peers that come and go cannot pile up sockets."""

    def __init__(self, credentials: Credentials | None = None, max_channels: int = 256) -> None:
        self._credentials = credentials or Credentials()
        self._metadata = self._credentials.call_metadata()
        self._max_channels = max_channels
        self._channels: OrderedDict[str, grpc.Channel] = OrderedDict()
        self._stream_only: set[str] = set()  # peers without PushMessage (older nodes)
        self._lock = threading.Lock()
        self._closed = False

    def _channel(self, address: str) -> grpc.Channel:
        with self._lock:
            if self._closed:
                raise RuntimeError("client is closed")
            channel = self._channels.get(address)
            if channel is not None:
                self._channels.move_to_end(address)
                return channel
            channel = self._credentials.open_channel(address, grpc_options())
            self._channels[address] = channel
            if len(self._channels) > self._max_channels:
                gone, oldest = self._channels.popitem(last=False)
                self._stream_only.discard(gone)
                oldest.close()  # calls still running on it fail, and are handled as failures
            return channel

    def push(
        self,
        address: str,
        header: pb.StateHeader,
        payload: memoryview,
        timeout: float,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> pb.PushAck:
        """Send one message to `address` and return its ack; raise PushFailed otherwise.

        A payload of one chunk goes as one PushMessage call, which costs the sender (and the
        GIL it shares with the training thread) a fraction of a stream; a larger one, or one to
        a peer that does not know PushMessage, is streamed with PushState. `payload` must stay
        unchanged until this returns.
        """
        if header.payload_bytes <= chunk_bytes:
            with self._lock:
                unary = address not in self._stream_only
            if unary:
                try:
                    return self._push_message(address, header, payload, timeout, chunk_bytes)
                except _Unimplemented:  # an older node: certainly not delivered, so stream it
                    with self._lock:
                        self._stream_only.add(address)
        chunks = split_for_streaming(header, payload, chunk_bytes)
        return self.push_chunks(address, chunks, timeout)

    def _push_message(
        self,
        address: str,
        header: pb.StateHeader,
        payload: memoryview,
        timeout: float,
        chunk_bytes: int,
    ) -> pb.PushAck:
        request = join_message(split_for_streaming(header, payload, chunk_bytes))
        call = self._channel(address).unary_unary(
            f"/{SERVICE}/PushMessage",
            request_serializer=None,  # a serialized StateMessage already
            response_deserializer=pb.PushAck.FromString,
        )
        try:
            ack: pb.PushAck = call(request, timeout=timeout, metadata=self._metadata)
            return ack
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise _Unimplemented from None
            # the whole message is handed to gRPC at once: once connected, it may have arrived
            raise _failed(err, all_sent=True) from None

    def push_chunks(self, address: str, chunks: Iterator[bytes], timeout: float) -> pb.PushAck:
        """Stream already-encoded chunks as one PushState call; raise PushFailed on failure."""
        tracked = _Tracked(chunks)
        try:
            return self.stream_raw(address, iter(tracked), timeout)
        except grpc.RpcError as err:
            raise _failed(err, all_sent=tracked.last_taken) from None

    def stream_raw(self, address: str, chunks: Iterator[bytes], timeout: float) -> pb.PushAck:
        """One PushState call with these wire chunks; raises grpc.RpcError (fault injection)."""
        call = self._channel(address).stream_unary(
            f"/{SERVICE}/PushState",
            request_serializer=None,  # the chunks are wire bytes already
            response_deserializer=pb.PushAck.FromString,
        )
        ack: pb.PushAck = call(chunks, timeout=timeout, metadata=self._metadata)
        return ack

    def unary(self, address: str, method: str, request: bytes, timeout: float) -> bytes:
        """Call the unary Gossip `method` (Hello, ResolvePush, Status) of `address` with a
        serialized request; the serialized reply. Raises grpc.RpcError on failure."""
        call = self._channel(address).unary_unary(
            f"/{SERVICE}/{method}", request_serializer=None, response_deserializer=None
        )
        reply: bytes = call(request, timeout=timeout, metadata=self._metadata)
        return reply

    def resolve(self, address: str, sender_id: str, message_id: int, timeout: float) -> int:
        """Ask `address` for the final outcome of a push (a PushOutcome value)."""
        request = pb.ResolveRequest(sender_id=sender_id, message_id=message_id)
        raw = self.unary(address, "ResolvePush", request.SerializeToString(), timeout)
        return pb.ResolveReply.FromString(raw).outcome

    def hello(self, address: str, request: pb.HelloRequest, timeout: float) -> pb.HelloReply:
        """Exchange membership with `address`; raises grpc.RpcError on failure."""
        raw = self.unary(address, "Hello", request.SerializeToString(), timeout)
        return pb.HelloReply.FromString(raw)

    def status(self, address: str, timeout: float) -> pb.StatusReply:
        """Ask `address` how it is doing (read-only); raises grpc.RpcError on failure."""
        raw = self.unary(address, "Status", pb.StatusRequest().SerializeToString(), timeout)
        return pb.StatusReply.FromString(raw)

    def fetch(self, address: str, request: pb.FetchRequest, timeout: float) -> Iterator[Chunk]:
        """Ask `address` for its state; yields decoded chunks, raises grpc.RpcError on failure."""
        call = self._channel(address).unary_stream(
            f"/{SERVICE}/FetchState",
            request_serializer=pb.FetchRequest.SerializeToString,
            response_deserializer=None,  # decoded here, so a bad chunk is ours to report
        )
        for raw in call(request, timeout=timeout, metadata=self._metadata):
            yield decode_chunk(raw)

    def forget(self, address: str) -> None:
        """Close the channel to `address` (a peer that left)."""
        with self._lock:
            channel = self._channels.pop(address, None)
            self._stream_only.discard(address)
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
