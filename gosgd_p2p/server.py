"""The gRPC server of a node: a thin layer that turns calls into node work and errors into statuses.

Beside the Gossip service it serves grpc.health.v1 (so load balancers and Kubernetes can probe)
and server reflection (so grpcurl and friends can inspect a node).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gosgd_p2p.reject import STATUS_OF, Reject, Status, Why
from gosgd_p2p.security import Credentials, TokenInterceptor, is_loopback
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import Chunk, decode_chunk, grpc_options, split_message

__all__ = ["GossipServer", "Meeting", "Receiving", "Reporting"]

log = logging.getLogger(__name__)

SERVICE = "gosgd_p2p.v1.Gossip"

#: How a protected node (no token, no TLS, not insecure) refuses a caller off loopback.
PROTECTED_REASON = (
    "protected mode: this node has no cluster token, so it serves loopback callers only; "
    "give every node the same --token-file, or start it with --insecure on a trusted LAN"
)


class Receiving(Protocol):
    """What the server hands to the node's receiver. Methods run on gRPC server threads."""

    def receive_push(
        self,
        chunks: Iterator[Chunk],
        peer: str,
        active: Callable[[], bool],
        cancel: Callable[[], object],
    ) -> pb.PushAck:
        """Validate and commit one pushed message; raise Reject to refuse it.

        `active()` is False once the call has failed or been cancelled; `cancel()` cuts it."""
        ...

    def donate_state(self, request: pb.FetchRequest, peer: str) -> Iterator[bytes]:
        """Wire chunks of a state donated to a joiner; raise Reject to refuse."""
        ...

    def resolve_push(self, request: pb.ResolveRequest, peer: str) -> pb.ResolveReply:
        """Final outcome of a push whose sender got no ack."""
        ...

    def rejected(self, reject: Reject, peer: str) -> None:
        """Count (and log once per peer and reason) a refused call."""
        ...


class Meeting(Protocol):
    """What the server hands to the node's membership. Runs on gRPC server threads."""

    def hello(self, request: pb.HelloRequest, peer: str) -> pb.HelloReply:
        """Answer a membership exchange; raise Reject to refuse."""
        ...


class Reporting(Protocol):
    """What the server hands to the node's reporter (Status). Runs on gRPC server threads."""

    def status(self, request: pb.StatusRequest, peer: str) -> pb.StatusReply:
        """This node's counters, gauges and peers; changes nothing."""
        ...


def _decoded(raw_chunks: Iterable[bytes | memoryview]) -> Iterator[Chunk]:
    for raw in raw_chunks:
        yield decode_chunk(raw)


class Watchdog:
    """Cancels calls that outlive their deadline, so a slow or stalled peer cannot hold a
    server thread or a receive buffer. One thread serves every call of a server."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, grpc.ServicerContext]] = []
        self._active: set[int] = set()
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="gosgd-watchdog", daemon=True)
        self._thread.start()

    def watch(self, context: grpc.ServicerContext, seconds: float) -> int:
        """Cancel `context` after `seconds` unless done(ticket) is called first."""
        with self._cv:
            ticket = next(self._seq)
            heapq.heappush(self._heap, (time.monotonic() + seconds, ticket, context))
            self._active.add(ticket)
            self._cv.notify()
            return ticket

    def done(self, ticket: int) -> None:
        with self._cv:
            self._active.discard(ticket)

    def _run(self) -> None:
        with self._cv:
            while not self._stopped:
                while self._heap and self._heap[0][1] not in self._active:
                    heapq.heappop(self._heap)  # finished in time
                if not self._heap:
                    self._cv.wait()
                    continue
                deadline, ticket, context = self._heap[0]
                left = deadline - time.monotonic()
                if left > 0:
                    self._cv.wait(left)
                    continue
                heapq.heappop(self._heap)
                self._active.discard(ticket)
                context.cancel()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join()


class _Servicer:
    def __init__(
        self,
        bridge: Receiving,
        meeting: Meeting,
        reporting: Reporting | None,
        watchdog: Watchdog,
        receive_timeout_s: float,
        loopback_only: bool,
    ) -> None:
        self._bridge = bridge
        self._meeting = meeting
        self._reporting = reporting
        self._watchdog = watchdog
        self._receive_timeout_s = receive_timeout_s
        self._loopback_only = loopback_only

    def _admit(self, context: grpc.ServicerContext) -> None:
        """Raise the protected-mode refusal for a caller off loopback, when protected."""
        if self._loopback_only and not is_loopback(context.peer()):
            raise Reject(Status.DENIED, Why.PROTECTED, PROTECTED_REASON)

    def _refuse(self, reject: Reject, context: grpc.ServicerContext) -> None:
        self._bridge.rejected(reject, context.peer())
        context.abort(STATUS_OF[reject.kind], reject.reason)

    def push_state(
        self, request_iterator: Iterable[bytes], context: grpc.ServicerContext
    ) -> pb.PushAck:
        return self._push(request_iterator, context)

    def push_message(self, raw: bytes, context: grpc.ServicerContext) -> pb.PushAck:
        return self._push(split_message(raw), context)

    def _push(
        self, raw_chunks: Iterable[bytes | memoryview], context: grpc.ServicerContext
    ) -> pb.PushAck:
        """One push, streamed or in one message: the same checks, commit and ack."""
        ticket = self._watchdog.watch(context, self._receive_timeout_s)
        try:
            self._admit(context)
            return self._bridge.receive_push(
                _decoded(raw_chunks), context.peer(), context.is_active, context.cancel
            )
        except Reject as reject:
            self._refuse(reject, context)
            raise AssertionError("unreachable: abort raises") from None
        finally:
            self._watchdog.done(ticket)

    def fetch_state(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        ticket = self._watchdog.watch(context, self._receive_timeout_s)
        try:
            self._admit(context)
            request = _parse(pb.FetchRequest, raw)
            yield from self._bridge.donate_state(request, context.peer())
        except Reject as reject:
            self._refuse(reject, context)
        finally:
            self._watchdog.done(ticket)

    def hello(self, raw: bytes, context: grpc.ServicerContext) -> pb.HelloReply:
        try:
            self._admit(context)
            return self._meeting.hello(_parse(pb.HelloRequest, raw), context.peer())
        except Reject as reject:
            self._refuse(reject, context)
            raise AssertionError("unreachable: abort raises") from None

    def resolve_push(self, raw: bytes, context: grpc.ServicerContext) -> pb.ResolveReply:
        try:
            self._admit(context)
            return self._bridge.resolve_push(_parse(pb.ResolveRequest, raw), context.peer())
        except Reject as reject:
            self._refuse(reject, context)
            raise AssertionError("unreachable: abort raises") from None

    def status(self, raw: bytes, context: grpc.ServicerContext) -> pb.StatusReply:
        try:
            self._admit(context)
            assert self._reporting is not None  # registered only with a reporter
            return self._reporting.status(_parse(pb.StatusRequest, raw), context.peer())
        except Reject as reject:
            self._refuse(reject, context)
            raise AssertionError("unreachable: abort raises") from None


M = TypeVar("M", pb.FetchRequest, pb.HelloRequest, pb.ResolveRequest, pb.StatusRequest)


def _parse(kind: type[M], raw: bytes) -> M:
    """Parse a request here rather than in gRPC, so garbage gets INVALID_ARGUMENT, a counter
    and one log line instead of INTERNAL and a traceback."""
    try:
        return kind.FromString(raw)
    except Exception:  # protobuf's DecodeError and friends
        raise Reject(Status.INVALID, Why.MALFORMED_REQUEST, f"malformed {kind.__name__}") from None


class GossipServer:
    """A started gRPC server bound to `listen`; `port` is the bound port (useful with port 0).

    Pushes, donations and ResolvePush go to `bridge` (the node's receiver), Hello to `meeting`
    (its membership), Status to `reporting` (its reporter; without one, UNIMPLEMENTED); refused
    calls of any are reported to `bridge.rejected`. Without a token or TLS in `credentials`,
    Gossip calls are answered for loopback callers only, unless `insecure` (health and
    reflection stay open).
    """

    def __init__(
        self,
        bridge: Receiving,
        meeting: Meeting,
        listen: str,
        workers: int = 16,
        credentials: Credentials | None = None,
        receive_timeout_s: float = 60.0,
        insecure: bool = False,
        reporting: Reporting | None = None,
    ) -> None:
        credentials = credentials or Credentials()
        #: True when Gossip calls are answered for loopback callers only (protected mode).
        self.loopback_only = not credentials.protected and not insecure
        interceptors = []
        if credentials.token is not None:

            def unauthenticated(method: str) -> None:
                bridge.rejected(
                    Reject(Status.UNAUTHENTICATED, Why.TOKEN, f"no token for {method}"), ""
                )

            interceptors.append(TokenInterceptor(credentials.token, unauthenticated))
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gosgd-rpc"),
            options=grpc_options(),
            interceptors=interceptors,
            # beyond this, calls get RESOURCE_EXHAUSTED at once instead of queueing
            maximum_concurrent_rpcs=workers,
        )
        self._watchdog = Watchdog()
        servicer = _Servicer(
            bridge, meeting, reporting, self._watchdog, receive_timeout_s, self.loopback_only
        )
        handlers = {
            "PushState": grpc.stream_unary_rpc_method_handler(
                servicer.push_state,
                request_deserializer=None,  # raw bytes: decoded in the handler, so a malformed
                response_serializer=pb.PushAck.SerializeToString,  # chunk gets a clear status
            ),
            "PushMessage": grpc.unary_unary_rpc_method_handler(
                servicer.push_message,
                request_deserializer=None,  # split and decoded in the handler, as PushState's
                response_serializer=pb.PushAck.SerializeToString,
            ),
            "FetchState": grpc.unary_stream_rpc_method_handler(
                servicer.fetch_state,
                request_deserializer=None,  # parsed in the handler
                response_serializer=None,  # donate_state yields wire bytes already
            ),
            "Hello": grpc.unary_unary_rpc_method_handler(
                servicer.hello,
                request_deserializer=None,
                response_serializer=pb.HelloReply.SerializeToString,
            ),
            "ResolvePush": grpc.unary_unary_rpc_method_handler(
                servicer.resolve_push,
                request_deserializer=None,
                response_serializer=pb.ResolveReply.SerializeToString,
            ),
        }
        if reporting is not None:  # without one, Status answers UNIMPLEMENTED
            handlers["Status"] = grpc.unary_unary_rpc_method_handler(
                servicer.status,
                request_deserializer=None,
                response_serializer=pb.StatusReply.SerializeToString,
            )
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
            server_creds = credentials.server_credentials()
            if server_creds is None:
                self.port = self._server.add_insecure_port(listen)
            else:
                self.port = self._server.add_secure_port(listen, server_creds)
        except RuntimeError as err:
            self._watchdog.stop()
            raise OSError(f"cannot listen on {listen}: {err}") from None
        if self.port == 0:
            self._watchdog.stop()
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
        self._watchdog.stop()
