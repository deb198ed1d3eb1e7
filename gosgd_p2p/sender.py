"""The sender: pushes snapshots to peers in the background and settles each push's weight.

Owns the send buffers, the PeerClient (in this process, or in a send process), the sender
threads and the in-flight ledger. The training thread hands it a snapshot and the half weight
(`send`); a sender thread delivers it and settles it as one PushOutcome: acked (the receiver
holds the weight), returned (into the node's inbox, merged like any message) or written off
(the receiver vanished, maybe holding it). A push whose ack was lost is settled by asking its
receiver (ResolvePush). It never touches the model or the node's weight.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from gosgd_p2p.algorithm import PushFate, PushOutcome
from gosgd_p2p.client import PeerClient, PushFailed
from gosgd_p2p.config import NodeConfig
from gosgd_p2p.identity import Identity
from gosgd_p2p.inbox import Inbox, Message
from gosgd_p2p.membership import Membership
from gosgd_p2p.metrics import Count, Counters, LogOnce, Partners
from gosgd_p2p.sendproc import SendProcessClient
from gosgd_p2p.state import BufferPool, byte_view
from gosgd_p2p.v1 import gossip_pb2 as pb

__all__ = ["Sender"]

log = logging.getLogger(__name__)

#: Longest pause between two ResolvePush attempts for one push, seconds.
RESOLVE_BACKOFF_MAX_S = 5.0
#: A receiver's port must refuse connections this long before a push to it is written off,
#: seconds: a node whose network process died serves again on the same port within it.
REFUSED_GRACE_S = 3.0
#: How long a push to a node that said it is closing comes straight back, seconds: long
#: enough for a push already headed there as the news came; after it, the address (maybe a
#: node restarted there) is pushed to again once membership finds it live.
CLOSED_RECEIVER_S = 30.0


def _payload(header: pb.StateHeader, buf: torch.Tensor) -> memoryview:
    """The bytes of the snapshot in the send buffer `buf` that `header` describes."""
    return byte_view(buf)[: header.payload_bytes]


class Sender:
    """Background pushes of one node, each settled exactly once (see the module docstring)."""

    def __init__(
        self,
        cfg: NodeConfig,
        identity: Identity,
        client: PeerClient,
        pool: BufferPool,
        membership: Membership,
        inbox: Inbox,
        counters: Counters,
        partners: Partners,
        log_once: LogOnce,
    ) -> None:
        self._cfg = cfg
        self._me = identity
        self.client = client
        self._pool = pool
        self._membership = membership
        self._inbox = inbox  # where returned pushes go
        self._counters = counters
        self._partners = partners
        self._log_once = log_once
        self._threads = ThreadPoolExecutor(cfg.send_buffers, thread_name_prefix="gosgd-send")
        self._inflight = 0
        #: message id -> (receiver address, weight) of every push handed over and not settled
        self._unsettled: dict[int, tuple[str, float]] = {}
        #: message id -> receiver address of every deliver() in progress (a leave's too)
        self._delivering: dict[int, str] = {}
        #: message id -> the receiver's final answer (COMMITTED or ABORTED), asked before it
        #: closed (settle_pushes_to) for a push still in progress
        self._answers: dict[int, int] = {}
        #: receiver address -> when its node said it is closing
        self._closed_receivers: dict[str, float] = {}
        self._inflight_cv = threading.Condition()
        self._stop = threading.Event()

    # --- the training thread -------------------------------------------------------------------

    def acquire(self) -> torch.Tensor | None:
        """A free send buffer for a snapshot, or None while every one is in flight."""
        return self._pool.acquire()

    def release(self, buf: torch.Tensor) -> None:
        """Give back a buffer from acquire() that will not be sent."""
        self._pool.release(buf)

    def send(
        self,
        address: str,
        weight: float,
        step: int,
        buf: torch.Tensor,
        ready: Callable[[], None],
    ) -> None:
        """Push (the snapshot in `buf`, `weight`) to `address` in the background.

        `buf` came from acquire(); `ready()` waits until the snapshot, in this node's encoding,
        is in it. From here the weight is the sender's to settle: it is acked, returned to the
        inbox, or written off.
        """
        header = self._me.header(weight, step)
        msg = Message(
            sender_id=self._me.node_id,
            message_id=header.message_id,
            weight=weight,
            payload=buf,
            sender_step=step,
            returned=True,
            release=self._pool.release,
            ready=ready,
            encoding=header.encoding,
        )
        with self._inflight_cv:
            closed = self._closed_recently(address)
            if not closed:
                self._inflight += 1
                self._unsettled[header.message_id] = (address, weight)
        if closed:  # it said it is closing after it was chosen: not pushed, the weight is ours
            self._inbox.put_returned(msg)
            self._counters.add(Count.PUSHES_RETURNED)
            return
        self._counters.add(Count.PUSHES_STARTED)
        self._threads.submit(self._push_task, address, header, msg)

    def settle_pushes_to(self, address: str) -> int:
        """The node at `address` said it is closing (its Hello; a server thread): settle every
        push to it now, by ResolvePush while it still answers; returns how many it settled.

        It has finished, so it commits nothing more: its answer for a push still in progress
        is final (ABORTED, or COMMITTED), and that push, however it ends, is settled by that
        answer (see _resolve). A push handed over from now on is not sent there.
        """
        with self._inflight_cv:
            now = time.monotonic()
            for gone in [
                a for a, t in self._closed_receivers.items() if now - t > CLOSED_RECEIVER_S
            ]:
                del self._closed_receivers[gone]
            self._closed_receivers[address] = now
            ids = {mid for mid, (a, _) in self._unsettled.items() if a == address}
            ids.update(mid for mid, a in self._delivering.items() if a == address)
        settled = 0
        for message_id in sorted(ids):
            try:
                outcome = self.client.resolve(
                    address, self._me.node_id, message_id, timeout=self._cfg.rpc_timeout_s
                )
            except grpc.RpcError:
                continue  # settled as any push whose ack was lost (_resolve)
            if outcome not in (pb.PUSH_OUTCOME_COMMITTED, pb.PUSH_OUTCOME_ABORTED):
                continue
            with self._inflight_cv:
                if message_id in self._unsettled or message_id in self._delivering:
                    self._answers[message_id] = outcome
                    settled += 1
        if ids:
            log.info(
                "%s is closing: settled %d of our %d push(es) to it", address, settled, len(ids)
            )
        return settled

    def _closed_recently(self, address: str) -> bool:
        when = self._closed_receivers.get(address)
        return when is not None and time.monotonic() - when <= CLOSED_RECEIVER_S

    def hand_over(
        self, addresses: list[str], weight: float, step: int, buf: torch.Tensor
    ) -> PushOutcome | None:
        """Leave: push the whole `weight` with the snapshot in `buf` (from acquire(), complete)
        to the first of `addresses` that takes it, waiting for each answer; releases `buf`.

        Returns the outcome that settled the weight (acked, or written off with a receiver
        that vanished), or None when none of them took it (the weight is still the caller's).
        """
        try:
            header = self._me.header(weight, step)
            for address in addresses:
                outcome = self.deliver(address, header, _payload(header, buf))
                if outcome.fate is not PushFate.RETURNED:
                    return outcome
                log.info("leave: %s did not take our state", address)
            return None
        finally:
            self._pool.release(buf)

    def drain(self, timeout_s: float) -> int:
        """Wait until every push is settled, up to `timeout_s`; returns how many are not."""
        deadline = time.monotonic() + timeout_s
        with self._inflight_cv:
            while self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._inflight_cv.wait(left)
            return self._inflight

    def unsettled(self) -> list[tuple[str, float]]:
        """(receiver address, weight) of every push not yet settled, oldest first."""
        with self._inflight_cv:
            return list(self._unsettled.values())

    def settle(self, timeout_s: float) -> None:
        """finish(): wait up to `timeout_s` for every push to be settled; then say what is
        still unsettled, and write it off."""
        if not self.drain(timeout_s):
            return
        by_peer: dict[str, float] = {}
        unsettled = self.unsettled()
        for address, weight in unsettled:
            by_peer[address] = by_peer.get(address, 0.0) + weight
        log.warning(
            "finish: %d push(es) unsettled after %g s, weight %.6g in all (%s); giving up: "
            "that weight is written off",
            len(unsettled),
            timeout_s,
            math.fsum(by_peer.values()),
            ", ".join(f"{w:.6g} with {a}" for a, w in sorted(by_peer.items())),
        )
        self.give_up()
        self.drain(self._cfg.rpc_timeout_s + 1.0)

    @property
    def in_flight(self) -> int:
        """Pushes handed to the sender and not yet settled."""
        with self._inflight_cv:
            return self._inflight

    @property
    def in_flight_weight(self) -> float:
        """The weight those pushes carry, summed (from any thread)."""
        with self._inflight_cv:
            return math.fsum(weight for _, weight in self._unsettled.values())

    @property
    def send_process_pid(self) -> int | None:
        """The pid of the child that makes the pushes (send_process) while it runs, else None."""
        if isinstance(self.client, SendProcessClient) and self.client.alive:
            return self.client.pid
        return None

    def give_up(self) -> None:
        """Stop settling: a push whose receiver has not answered ResolvePush is written off
        (at its next attempt, or at once while it waits between attempts)."""
        self._stop.set()

    def close(self) -> None:
        """Give up settling, join the sender threads, close the client."""
        self.give_up()
        self._threads.shutdown(wait=True)
        self.client.close()

    # --- sender threads ------------------------------------------------------------------------

    def _push_task(self, address: str, header: pb.StateHeader, msg: Message) -> None:
        try:
            try:
                msg.ready()  # a GPU snapshot may still be on its way into the buffer
                outcome = self.deliver(address, header, _payload(header, msg.payload))
            except Exception:  # a bug must not lose the weight either
                log.exception("push to %s failed unexpectedly", address)
                outcome = PushOutcome(PushFate.RETURNED, msg.weight)
            if outcome.fate is PushFate.RETURNED:
                self._inbox.put_returned(msg)  # nothing lost: the weight comes home
                self._counters.add(Count.PUSHES_RETURNED)
            else:
                msg.release(msg.payload)
        finally:
            with self._inflight_cv:
                self._inflight -= 1
                self._unsettled.pop(header.message_id, None)
                self._answers.pop(header.message_id, None)
                self._inflight_cv.notify_all()

    def deliver(self, address: str, header: pb.StateHeader, payload: memoryview) -> PushOutcome:
        """Push one message and settle its fate (sender threads, and a leave).

        Counts what it settles: an ack (with its bytes), or a write-off (with its weight). A
        push is only ever "maybe delivered" when its last chunk left and no ack came back (a
        cut connection, a deadline): then the receiver alone knows, and `_resolve` asks it.
        """
        with self._inflight_cv:
            self._delivering[header.message_id] = address
        try:
            try:
                ack = self.client.push(
                    address, header, payload, self._cfg.push_timeout_s, self._cfg.chunk_bytes
                )
            except PushFailed as err:
                self._push_failed(address, err)
                if not err.maybe_delivered:
                    return PushOutcome(PushFate.RETURNED, header.weight)
                outcome = self._resolve(address, header)
            else:
                self._membership.succeeded(address)
                outcome = PushOutcome(PushFate.ACKED, header.weight, ack.receiver_id)
        finally:
            with self._inflight_cv:
                self._delivering.pop(header.message_id, None)
                self._answers.pop(header.message_id, None)
        if outcome.fate is PushFate.ACKED:
            if outcome.receiver_id:
                self._partners.add(outcome.receiver_id)
            self._counters.add(Count.PUSHES_ACKED)
            self._counters.add(Count.BYTES_SENT, header.payload_bytes)
        elif outcome.fate is PushFate.WRITTEN_OFF:
            self._counters.add(Count.PUSHES_LOST_WITH_PEER)
            self._counters.add(Count.WEIGHT_WRITTEN_OFF, outcome.weight)
        return outcome

    def _resolve(self, address: str, header: pb.StateHeader) -> PushOutcome:
        """Settle a push whose ack was lost, by asking its receiver (ResolvePush).

        Why this is exact: the receiver commits a message only under its inbox lock, after
        checking that the message was not aborted, and ResolvePush answers under the same lock
        either COMMITTED (it has it: the weight is the receiver's) or ABORTED (it does not,
        and records that it never will: a late stream of the same message is refused). Either
        answer is final, so the weight is counted once.

        The question is asked again, with backoff, until the receiver answers: a receiver that
        was paused (a VM pause, a GC stall, SIGSTOP) answers when it resumes. The weight is
        written off, never taken back, only when the receiver is presumed gone with the
        message: when its port has refused connections for REFUSED_GRACE_S (the process is
        gone, and whatever it had committed is gone with its own weight), after forget_after_s
        without an answer (the time after which a node forgets a dead peer), or when the node
        gives up (close()). A receiver that finishes answers before it stops serving: its Hello
        saying it is closing makes settle_pushes_to ask, and the answer is taken here.
        Taking it back could count it twice if the receiver had committed it; the log says
        how much is written off.
        """
        cfg = self._cfg
        unanswered_since = time.monotonic()
        refused_since: float | None = None
        delay = 0.1
        while True:
            try:
                with self._inflight_cv:
                    answered = self._answers.get(header.message_id)
                outcome = answered or self.client.resolve(
                    address, header.sender_id, header.message_id, timeout=cfg.rpc_timeout_s
                )
            except grpc.RpcError as err:
                if header.message_id in self._answers:
                    continue  # it answered as it closed (settle_pushes_to)
                now = time.monotonic()
                refused = "connection refused" in (err.details() or "").lower()
                refused_since = (refused_since or now) if refused else None
                gone = refused_since is not None and now - refused_since >= REFUSED_GRACE_S
                forgotten = time.monotonic() - unanswered_since >= cfg.forget_after_s
                if gone or forgotten or self._stop.is_set():
                    why = (
                        "its port is closed"
                        if gone
                        else f"no answer for {cfg.forget_after_s:g} s"
                        if forgotten
                        else "the node gave up settling"
                    )
                    log.warning(
                        "push %d to %s: %s (%s); weight %.6g presumed lost with that peer",
                        header.message_id,
                        address,
                        why,
                        err.code().name,
                        header.weight,
                    )
                    return PushOutcome(PushFate.WRITTEN_OFF, header.weight)
                self._stop.wait(delay if refused_since is None else min(delay, 0.5))
                delay = min(delay * 2, RESOLVE_BACKOFF_MAX_S)
                continue
            if outcome == pb.PUSH_OUTCOME_COMMITTED:
                self._counters.add(Count.PUSHES_RESOLVED_COMMITTED)
                peer = self._membership.peers.get(address)
                receiver = peer.node_id if peer and peer.node_id else ""
                return PushOutcome(PushFate.ACKED, header.weight, receiver)
            if outcome == pb.PUSH_OUTCOME_ABORTED:
                self._counters.add(Count.PUSHES_RESOLVED_ABORTED)
                return PushOutcome(PushFate.RETURNED, header.weight)
            # UNKNOWN (or an answer this node does not know): the receiver cannot say it will
            # never commit it, so taking the weight back could count it twice
            self._counters.add(Count.PUSHES_RESOLVED_UNKNOWN)
            log.warning(
                "push %d to %s: its receiver cannot tell whether it took it; weight %.6g "
                "written off",
                header.message_id,
                address,
                header.weight,
            )
            return PushOutcome(PushFate.WRITTEN_OFF, header.weight)

    def _push_failed(self, address: str, err: PushFailed) -> None:
        code = err.code
        if code == grpc.StatusCode.FAILED_PRECONDITION and "not accepting" in err.details:
            self._membership.peers.mark_left(address)
            self._log_once(address, "draining", f"{address} is draining; not pushing there")
            return
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # A full inbox is back-pressure from a live peer, not a sign that it is gone.
            self._counters.add(Count.PUSHES_BUSY)
            self._log_once(address, "busy", f"{address} is busy: {err.details}")
            return
        self._membership.failed(address, code.name)
        self._log_once(address, code.name, f"push to {address} failed: {err}")
