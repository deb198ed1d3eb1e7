"""The front half of receiving a push: header checks, a receive slot, the bytes (no torch).

A push is received in two halves. The front half (here) checks the header, takes a receive
slot, and streams the payload into the slot's bytes, checksummed; it knows nothing of the
model. The back half (`Commit`: decode, finite values, the inbox, the ack) belongs to whoever
holds the weight. In threads mode both halves run in the training process (receiver.py); in
network-process mode the front half runs in the network process (netproc.py), which imports no
torch, and the back half is one request to the training process over the control channel.

Slots are bounded (one per inbox place), so a message in progress keeps its slot only while its
bytes arrive at MIN_RECEIVE_RATE: when every slot is taken, the slowest message below that rate
is cut and the new one takes its slot, and one caller host has at most inbox_size - 1 messages
in progress at once, so another host always finds a slot it can take.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar

import grpc

from gosgd_p2p.reject import Reject, Status, Why
from gosgd_p2p.security import peer_host
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import Chunk, Expectation, assemble, check_header, first_header

__all__ = ["MIN_RECEIVE_RATE", "Commit", "Intake", "SlotPool"]

#: A message in progress keeps its receive slot only while its bytes arrive at this average
#: rate (bytes a second) or faster: a slower one is cut when a new message needs the slot.
MIN_RECEIVE_RATE = 1 << 20
#: ... once it has had this long (seconds) to show its rate.
RATE_GRACE_S = 1.0
#: How long a new message waits for the slot a cut one gives back, seconds.
PREEMPT_WAIT_S = 2.0

S = TypeVar("S")


class SlotPool(Protocol[S]):
    """Bounded receive slots: acquire() may wait up to `wait_s` for one; None when none."""

    def acquire(self, wait_s: float = 0.0) -> S | None: ...

    def release(self, slot: S) -> None: ...


#: The back half: (header, slot holding the payload bytes, the call is alive) -> (ack, True if
#: the slot now belongs to the inbox). Raises Reject to refuse; the slot is then released here.
Commit = Callable[[pb.StateHeader, S, Callable[[], bool]], "tuple[pb.PushAck, bool]"]


class Intake(Generic[S]):
    """The front half of every push one node receives (server threads; thread-safe).

    `pool` holds the slots, `view(slot)` is a writable byte view of one (at least the largest
    payload), `commit` the back half, `count_reject(why)` counts a refusal decided here
    without an exception to the caller (a message cut for being too slow).
    """

    def __init__(
        self,
        expectation: Expectation,
        inbox_size: int,
        pool: SlotPool[S],
        view: Callable[[S], memoryview],
        commit: Commit[S],
        count_reject: Callable[[Why], None],
    ) -> None:
        self._expect = expectation
        self._per_host = max(1, inbox_size - 1)
        self.pool = pool
        self._view = view
        self._commit = commit
        self._count_reject = count_reject
        self._receiving: set[_Receipt] = set()
        self._lock = threading.Lock()

    def receive(
        self,
        chunks: Iterator[Chunk],
        peer: str,
        active: Callable[[], bool],
        cancel: Callable[[], object],
        precheck: Callable[[pb.StateHeader], pb.PushAck | None] = lambda header: None,
    ) -> pb.PushAck:
        """Receive one message into a slot and hand it to the back half; its ack.

        `precheck(header)` may refuse (Reject) or answer (an ack: a redelivery) before any
        payload is read. Raises Reject when the message is refused.
        """
        header = first_header(chunks)
        check_header(header, self._expect)
        early = precheck(header)
        if early is not None:
            return early
        receipt = _Receipt(peer_host(peer), cancel)
        with self._lock:
            busy = sum(1 for r in self._receiving if r.host == receipt.host and not r.cut)
            self._receiving.add(receipt)
        if busy >= self._per_host and not self._cut_slowest(receipt.host):
            with self._lock:
                self._receiving.discard(receipt)
            raise Reject(
                Status.EXHAUSTED, Why.CALLER_BUSY, "too many messages at once from this host"
            )
        slot: S | None = None
        committed = False
        try:
            slot = self.pool.acquire()
            if slot is None and self._cut_slowest():
                slot = self.pool.acquire(PREEMPT_WAIT_S)
            if slot is None:
                raise Reject(Status.EXHAUSTED, Why.INBOX_FULL, "inbox full; try another peer")
            receipt.holding = True
            try:
                assemble(header, receipt.count(chunks), self._view(slot)[: header.payload_bytes])
            except grpc.RpcError:
                raise Reject(Status.INVALID, Why.ABORTED, "stream aborted by the sender") from None
            ack, committed = self._commit(header, slot, active)
            return ack
        finally:
            with self._lock:
                self._receiving.discard(receipt)
            if slot is not None and not committed:
                self.pool.release(slot)

    def _cut_slowest(self, host: str | None = None) -> bool:
        """Cut the slowest message in progress (from `host`, if given) below MIN_RECEIVE_RATE;
        False if none is."""
        now = time.monotonic()
        with self._lock:
            slow = [
                r
                for r in self._receiving
                if r.holding
                and not r.cut
                and (host is None or r.host == host)
                and r.rate(now) < MIN_RECEIVE_RATE
            ]
            if not slow:
                return False
            slowest = min(slow, key=lambda r: r.rate(now))
            slowest.cut = True
        slowest.cancel()
        self._count_reject(Why.TOO_SLOW)
        return True


class _Receipt:
    """The progress of one message being received (server threads)."""

    def __init__(self, host: str, cancel: Callable[[], object]) -> None:
        self.host = host  # the caller's host (peer_host)
        self.cancel = cancel
        self.started = time.monotonic()
        self.nbytes = 0
        self.holding = False  # it has a receive slot
        self.cut = False

    def count(self, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        for chunk in chunks:
            self.nbytes += len(chunk.data)
            yield chunk

    def rate(self, now: float) -> float:
        """Bytes a second so far; infinite during its first RATE_GRACE_S."""
        elapsed = now - self.started
        return math.inf if elapsed < RATE_GRACE_S else self.nbytes / elapsed
