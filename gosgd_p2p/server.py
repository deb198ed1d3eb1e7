"""The gRPC server of a node: a thin layer that turns calls into node work and errors into statuses.

Beside the Gossip service it serves grpc.health.v1 (so load balancers and Kubernetes can probe)
and server reflection (so grpcurl and friends can inspect a node).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import Chunk, Reject, decode_chunk, grpc_options

__all__ = ["GossipServer", "NodeBridge", "STATUS_OF"]

log = logging.getLogger(__name__)

SERVICE = "gosgd_p2p.v1.Gossip"

#: gRPC status for each Reject kind.
STATUS_OF = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
}


class NodeBridge(Protocol):
    """What the server needs from a node. Methods run on gRPC server threads."""

    def receive_push(self, chunks: Iterator[Chunk], peer: str) -> pb.PushAck:
        """Validate and commit one pushed message; raise Reject to refuse it."""
        ...

    def donate_state(self, request: pb.FetchRequest, peer: str) -> Iterator[bytes]:
        """Wire chunks of a state donated to a joiner; raise Reject to refuse."""
        ...

    def hello(self, request: pb.HelloRequest, peer: str) -> pb.HelloReply:
        """Answer a membership exchange."""
        ...

    def rejected(self, reject: Reject, peer: str) -> None:
        """Count (and log once per peer and reason) a refused call."""
        ...


def _decoded(raw_chunks: Iterable[bytes]) -> Iterator[Chunk]:
    for raw in raw_chunks:
        yield decode_chunk(raw)


class _Servicer:
    def __init__(self, bridge: NodeBridge) -> None:
        self._bridge = bridge

    def _refuse(self, reject: Reject, context: grpc.ServicerContext) -> None:
        self._bridge.rejected(reject, context.peer())
        context.abort(STATUS_OF[reject.kind], reject.reason)

    def push_state(
        self, request_iterator: Iterable[bytes], context: grpc.ServicerContext
    ) -> pb.PushAck:
        try:
            return self._bridge.receive_push(_decoded(request_iterator), context.peer())
        except Reject as reject:
            self._refuse(reject, context)
            raise AssertionError("unreachable: abort raises") from None

    def fetch_state(
        self, request: pb.FetchRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        try:
            yield from self._bridge.donate_state(request, context.peer())
        except Reject as reject:
            self._refuse(reject, context)

    def hello(self, request: pb.HelloRequest, context: grpc.ServicerContext) -> pb.HelloReply:
        return self._bridge.hello(request, context.peer())


class GossipServer:
    """A started gRPC server bound to `listen`; `port` is the bound port (useful with port 0)."""

    def __init__(self, bridge: NodeBridge, listen: str, workers: int = 16) -> None:
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gosgd-rpc"),
            options=grpc_options(),
        )
        servicer = _Servicer(bridge)
        handlers = {
            "PushState": grpc.stream_unary_rpc_method_handler(
                servicer.push_state,
                request_deserializer=None,  # raw bytes: decoded in the handler, so a malformed
                response_serializer=pb.PushAck.SerializeToString,  # chunk gets a clear status
            ),
            "FetchState": grpc.unary_stream_rpc_method_handler(
                servicer.fetch_state,
                request_deserializer=pb.FetchRequest.FromString,
                response_serializer=None,  # donate_state yields wire bytes already
            ),
            "Hello": grpc.unary_unary_rpc_method_handler(
                servicer.hello,
                request_deserializer=pb.HelloRequest.FromString,
                response_serializer=pb.HelloReply.SerializeToString,
            ),
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self.set_serving(False)
        try:
            self.port = self._server.add_insecure_port(listen)
        except RuntimeError as err:
            raise OSError(f"cannot listen on {listen}: {err}") from None
        if self.port == 0:
            raise OSError(f"cannot listen on {listen}: address in use or not available")
        self._server.start()

    def set_serving(self, serving: bool) -> None:
        """Health status of the node and of the Gossip service: SERVING or NOT_SERVING."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self.health.set("", status)
        self.health.set(SERVICE, status)

    def stop(self, grace: float = 5.0) -> None:
        """Refuse new calls, let running ones finish for up to `grace` seconds, then stop."""
        self.health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
