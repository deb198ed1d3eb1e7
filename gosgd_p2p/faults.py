"""Fault injection for pushes: a PeerClient that drops, delays, cuts or loses the ack of a
seeded random share of its pushes. For tests, benchmarks and soak runs, never for training.

    node = GossipNode(model, cfg, client=FaultyClient(FaultPlan(drop=0.05, cut=0.05)))

Every fault goes through the real code paths: a dropped push never leaves; a cut push streams
part of its chunks over gRPC and then aborts the call (the receiver sees a partial message);
a lost ack delivers the whole message and then reports a failure, so the sender must settle
the unknown outcome with ResolvePush.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

import grpc

from gosgd_p2p.client import PeerClient, PushFailed
from gosgd_p2p.security import Credentials
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import CHUNK_BYTES, split_for_streaming

__all__ = ["FaultPlan", "FaultyClient"]


@dataclass(frozen=True)
class FaultPlan:
    """Probabilities (each push draws one outcome) and the delay of a delayed push."""

    drop: float = 0.0  # fails before a byte is sent (UNAVAILABLE)
    delay: float = 0.0  # held for delay_s, then sent normally
    cut: float = 0.0  # the stream is aborted after some of its chunks
    lost_ack: float = 0.0  # delivered, then reported as failed after the last chunk
    delay_s: float = 0.05  # seconds a delayed push waits
    seed: int = 0  # seed of the fault draws

    def __post_init__(self) -> None:
        total = self.drop + self.delay + self.cut + self.lost_ack
        if min(self.drop, self.delay, self.cut, self.lost_ack) < 0 or total > 1:
            raise ValueError("fault probabilities must be >= 0 and sum to at most 1")


class FaultyClient(PeerClient):
    """A PeerClient whose pushes fail as `plan` says. `injected` counts faults by kind."""

    def __init__(self, plan: FaultPlan, credentials: Credentials | None = None) -> None:
        super().__init__(credentials)
        self.plan = plan
        self.injected: Counter[str] = Counter()
        self._rng = random.Random(plan.seed)
        self._lock = threading.Lock()

    def _draw(self) -> tuple[str, float]:
        with self._lock:
            r = self._rng.random()
            u = self._rng.random()
        p = self.plan
        for kind, share in (
            ("drop", p.drop),
            ("delay", p.delay),
            ("cut", p.cut),
            ("lost_ack", p.lost_ack),
        ):
            if r < share:
                with self._lock:
                    self.injected[kind] += 1
                return kind, u
            r -= share
        return "none", u

    def push(
        self,
        address: str,
        header: pb.StateHeader,
        payload: memoryview,
        timeout: float,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> pb.PushAck:
        kind, u = self._draw()
        if kind == "drop":
            raise PushFailed(grpc.StatusCode.UNAVAILABLE, "injected: dropped", False)
        if kind == "delay":
            time.sleep(self.plan.delay_s)  # a slow link, on a sender thread
        if kind == "cut":
            chunks = list(split_for_streaming(header, payload, chunk_bytes))
            keep = 1 + int(u * (len(chunks) - 1))  # the header and maybe some data, never all
            self._cut(address, chunks[:keep], timeout)
        ack = super().push(address, header, payload, timeout, chunk_bytes)
        if kind == "lost_ack":
            with self._lock:
                self.injected["ack_lost_after_delivery"] += 1
            raise PushFailed(grpc.StatusCode.UNAVAILABLE, "injected: ack lost", True)
        return ack

    def _cut(self, address: str, chunks: list[bytes], timeout: float) -> NoReturn:
        """Send `chunks`, then cancel the call as a broken connection would."""
        sent, stop = threading.Event(), threading.Event()

        def stream() -> Iterator[bytes]:
            yield from chunks
            sent.set()
            stop.wait(timeout)  # hold the stream open until it is cancelled

        call = self._channel(address).stream_unary(
            "/gosgd_p2p.v1.Gossip/PushState",
            request_serializer=None,
            response_deserializer=pb.PushAck.FromString,
        )
        future = call.future(stream(), timeout=timeout, metadata=self._metadata)
        try:
            sent.wait(timeout)
            future.cancel()
        finally:
            stop.set()
        raise PushFailed(grpc.StatusCode.CANCELLED, "injected: stream cut", False)
