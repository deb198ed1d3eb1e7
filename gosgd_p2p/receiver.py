"""The receiver: what the gRPC server hands over, turned into validated messages in the inbox.

Owns the receive buffers, the inbox (and with it the fate memory that makes redelivery
idempotent and ResolvePush decidable), the queue of joiners waiting for a donation, and the
time of the last settling call (PushState or ResolvePush) that close() lingers on. Server
threads call receive_push, donate_state, resolve_push and rejected; the training thread calls
serve_donations and fetch. It never touches the model or the node's weight: a donation's
weight is split by the training thread (the `donate` callback).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import grpc
import torch

from gosgd_p2p.client import PeerClient
from gosgd_p2p.codec import decode
from gosgd_p2p.config import NodeConfig
from gosgd_p2p.identity import Identity
from gosgd_p2p.inbox import Fate, Inbox, Message
from gosgd_p2p.intake import Intake
from gosgd_p2p.membership import Membership
from gosgd_p2p.metrics import Count, Counters, LogOnce, Partners
from gosgd_p2p.reject import Reject, Status, Why
from gosgd_p2p.security import peer_host
from gosgd_p2p.state import BufferPool, all_finite, byte_view
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import (
    PROTOCOL_VERSION,
    Chunk,
    assemble,
    check_header,
    first_header,
    payload_bytes,
    receive_numel,
    split_for_streaming,
)

__all__ = ["Donate", "Receiver"]

#: Seconds before one node id may be given a state again.
DONATION_INTERVAL_S = 10.0
#: Node ids granted a donation within DONATION_INTERVAL_S, at most.
MAX_JOINERS = 64

log = logging.getLogger(__name__)

#: The training thread's part of a donation: snapshot into the buffer and split the weight;
#: returns (weight given, wait for the snapshot), or None when there is no weight to split.
Donate = Callable[[torch.Tensor], "tuple[float, Callable[[], None]] | None"]
_Donation = tuple["Future[Message]", "torch.Tensor | None", "Callable[[torch.Tensor], None] | None"]

#: The counter bumped for each answer given to ResolvePush.
RESOLVED = {
    Fate.COMMITTED: (Count.RESOLVED_COMMITTED, pb.PUSH_OUTCOME_COMMITTED),
    Fate.ABORTED: (Count.RESOLVED_ABORTED, pb.PUSH_OUTCOME_ABORTED),
    Fate.UNKNOWN: (Count.RESOLVED_UNKNOWN, pb.PUSH_OUTCOME_UNKNOWN),
}


class Receiver:
    """Incoming pushes, donations and ResolvePush of one node (see the module docstring)."""

    def __init__(
        self,
        cfg: NodeConfig,
        identity: Identity,
        membership: Membership,
        counters: Counters,
        partners: Partners,
        log_once: LogOnce,
        *,
        numel: int,
        pin: bool,
        own_buffers: bool = True,
    ) -> None:
        self._cfg = cfg
        self._me = identity
        self._numel = numel
        self._membership = membership
        self._counters = counters
        self._partners = partners
        self._log_once = log_once
        #: Complete, validated messages (and our returned pushes) for the training thread. An
        #: abort is held twice as long as the watchdog lets a stream live; a sender that
        #: committed here is remembered twice as long as a sender keeps asking (forget_after_s).
        self.inbox = Inbox(hold_s=2 * cfg.receive_timeout_s, idle_s=2 * cfg.forget_after_s)
        #: joiners waiting: (their future, the buffer to donate in or None, its release)
        self._donations: queue.Queue[_Donation] = queue.Queue(maxsize=2)
        #: time.monotonic() of the last PushState or ResolvePush.
        self.last_settling_call = 0.0
        #: node id -> time.monotonic() of the last donation it was granted
        self._donated_to: dict[str, float] = {}
        self._donated_lock = threading.Lock()
        # one receive buffer of `numel` floats per inbox slot (page-locked for CUDA: `pin`);
        # without `own_buffers` a network process holds them until it hands them over (adopt)
        self._pool: BufferPool | None = None
        #: The front half of receiving (None while a network process receives for us).
        self.intake: Intake[torch.Tensor] | None = None
        if own_buffers:
            self.adopt(BufferPool(receive_numel(numel), cfg.inbox_size, pin=pin))

    def adopt(self, pool: BufferPool) -> None:
        """Receive into `pool` from this process from now on (the constructor, or when the
        network process is gone)."""
        self._pool = pool
        self.intake = Intake(
            self._me.expectation,
            self._cfg.inbox_size,
            pool,
            byte_view,
            self._commit_here,
            self._counters.reject,
        )

    # --- server threads ------------------------------------------------------------------------

    def receive_push(
        self,
        chunks: Iterator[Chunk],
        peer: str,
        active: Callable[[], bool] = lambda: True,
        cancel: Callable[[], object] = lambda: None,
    ) -> pb.PushAck:
        """Validate a pushed message completely, then commit it to the inbox (server thread).

        `active()` says whether the call is still alive. gRPC's Python server ends the request
        stream like a normal half-close when a receive fails (e.g. an oversized trailing
        message), and only then cancels the call; a message is committed only while the call
        is alive, and taken back out of the inbox if the call turns out to have failed. The
        receive buffers are bounded and shared fairly between callers (intake.py); `cancel`
        cuts this call when a faster message needs its buffer.
        """
        self.last_settling_call = time.monotonic()
        if self.intake is None:
            raise Reject(Status.PRECONDITION, Why.STARTING, "the network process receives")
        return self.intake.receive(chunks, peer, active, cancel, self.precheck)

    def precheck(self, header: pb.StateHeader) -> pb.PushAck | None:
        """Refuse a push before its payload is read (draining, or aborted by its sender), or
        acknowledge a redelivery of a committed one (an ack); None: go on and read it."""
        if not self.inbox.accepting:
            raise Reject(Status.PRECONDITION, Why.DRAINING, "node is not accepting pushes")
        fate = self.inbox.fate(header.sender_id, header.message_id)
        if fate is Fate.COMMITTED:  # a redelivery: acknowledge, apply once
            self._counters.add(Count.PUSHES_DUPLICATE)
            return pb.PushAck(receiver_id=self._me.node_id, duplicate=True)
        if fate is Fate.ABORTED:
            raise Reject(Status.PRECONDITION, Why.ABORTED, "the sender took this message back")
        return None

    def _commit_here(
        self, header: pb.StateHeader, buf: torch.Tensor, active: Callable[[], bool]
    ) -> tuple[pb.PushAck, bool]:
        assert self._pool is not None  # threads mode, or the network process is gone
        ack, msg = self.commit_received(header, buf, active, self._pool.release)
        return ack, msg is not None

    def commit_received(
        self,
        header: pb.StateHeader,
        buf: torch.Tensor,
        active: Callable[[], bool],
        release: Callable[[torch.Tensor], None],
        *,
        checked: bool = False,
    ) -> tuple[pb.PushAck, Message | None]:
        """The back half of a push whose payload bytes are in `buf` (any thread): decode it,
        check every value finite, commit it to the inbox, and settle it (settle_received) by
        `active()`. Returns the ack and the committed message (None for a redelivery: the
        caller keeps `buf`); `release` gives `buf` back once the message is merged. Raises
        Reject when refused (the caller keeps `buf`). `checked`: as for commit_unsettled."""
        ack, msg = self.commit_unsettled(header, buf, active, release, checked=checked)
        if msg is not None:
            self.settle_received(header, msg, active())
        return ack, msg

    def commit_unsettled(
        self,
        header: pb.StateHeader,
        buf: torch.Tensor,
        active: Callable[[], bool],
        release: Callable[[torch.Tensor], None],
        *,
        checked: bool = False,
    ) -> tuple[pb.PushAck, Message | None]:
        """commit_received without the settling: a committed message must then be settled.
        `checked`: a float32 payload was found finite already (the network process did)."""
        self.last_settling_call = time.monotonic()
        if not (checked and header.encoding == pb.ENCODING_FP32):
            finish_state(header, buf, self._numel)
        msg = Message(
            sender_id=header.sender_id,
            message_id=header.message_id,
            weight=header.weight,
            payload=buf,
            sender_step=header.sender_step,
            returned=False,
            release=release,
        )
        if not active():
            raise Reject(Status.INVALID, Why.ABORTED, "the call failed before the message ended")
        if not self.inbox.commit(msg):
            if header.sender_address:
                self._membership.sender_seen(header.sender_address, header.sender_id)
            self._counters.add(Count.PUSHES_DUPLICATE)
            return pb.PushAck(receiver_id=self._me.node_id, duplicate=True), None
        return pb.PushAck(receiver_id=self._me.node_id), msg

    def settle_received(self, header: pb.StateHeader, msg: Message, alive: bool) -> None:
        """A committed message's call is `alive` as it ends: count it received; or it failed,
        and the message is taken back out of the inbox if it still can be (then Reject: the
        caller keeps the buffer)."""
        if not alive and self.inbox.retract(msg):
            raise Reject(Status.INVALID, Why.ABORTED, "the call failed as the message ended")
        if header.sender_address:
            self._membership.sender_seen(header.sender_address, header.sender_id)
        self._partners.add(header.sender_id)
        self._counters.add(Count.PUSHES_RECEIVED)
        self._counters.add(Count.BYTES_RECEIVED, header.payload_bytes)

    def donate_state(self, request: pb.FetchRequest, peer: str) -> Iterator[bytes]:
        """Stream half our weight and our state to a joiner; it comes back if the stream fails."""
        msg = self.request_donation(request)
        done = False
        try:
            msg.ready()
            header = self.donation_header(msg)
            payload = byte_view(msg.payload)[: header.payload_bytes]
            yield from split_for_streaming(header, payload, self._cfg.chunk_bytes)
            done = True
        finally:
            self.donation_ended(msg, done)

    def request_donation(
        self,
        request: pb.FetchRequest,
        buf: torch.Tensor | None = None,
        release: Callable[[torch.Tensor], None] | None = None,
    ) -> Message:
        """Check a joiner, then wait for the training thread to snapshot our state and split
        our weight into a donation (server thread): into `buf` when given (released with
        `release`), else into a receive buffer. Raises Reject when refused."""
        if request.protocol_version != PROTOCOL_VERSION:
            raise Reject(Status.PRECONDITION, Why.PROTOCOL_VERSION, "other protocol version")
        if request.cluster != self._cfg.cluster:
            raise Reject(
                Status.PRECONDITION, Why.CLUSTER, f"cluster {request.cluster!r} is not ours"
            )
        if request.fingerprint != self._me.fingerprint:
            raise Reject(Status.PRECONDITION, Why.FINGERPRINT, "model fingerprint differs")
        if not self.inbox.accepting:
            raise Reject(Status.PRECONDITION, Why.DRAINING, "node is not accepting joiners")
        self._check_joiner(request)
        fut: Future[Message] = Future()
        try:
            self._donations.put_nowait((fut, buf, release))
        except queue.Full:
            raise Reject(Status.EXHAUSTED, Why.DONATION_BUSY, "too many joiners at once") from None
        try:
            return fut.result(timeout=self._cfg.rpc_timeout_s)
        except FutureTimeout:
            if fut.cancel():
                raise Reject(
                    Status.EXHAUSTED, Why.DONATION_TIMEOUT, "training thread busy"
                ) from None
            return fut.result()

    def donation_header(self, msg: Message) -> pb.StateHeader:
        """The header of a donation: the state as it is, in fp32 (joins are rare)."""
        return self._me.header(msg.weight, msg.sender_step, pb.ENCODING_FP32)

    def donation_ended(self, msg: Message, done: bool) -> None:
        """A donation's stream ended: every chunk handed over (`done`: the joiner has the
        weight), or not (it comes back to our inbox)."""
        if done:
            msg.release(msg.payload)
            self._counters.add(Count.DONATIONS)
            self._counters.add(Count.BYTES_SENT, payload_bytes(pb.ENCODING_FP32, self._me.numel))
        else:
            self.inbox.put_returned(msg)
            self._counters.add(Count.DONATIONS_RETURNED)

    def _check_joiner(self, request: pb.FetchRequest) -> None:
        """Give weight only to a joining node, and to each once per DONATION_INTERVAL_S."""
        now = time.monotonic()
        with self._donated_lock:
            for node_id, when in list(self._donated_to.items()):
                if now - when >= DONATION_INTERVAL_S:
                    del self._donated_to[node_id]
            if request.node_id in self._donated_to:
                raise Reject(
                    Status.EXHAUSTED, Why.DONATION_BUSY, "this node was given a state just now"
                )
            if len(self._donated_to) >= MAX_JOINERS:
                raise Reject(Status.EXHAUSTED, Why.DONATION_BUSY, "too many joiners at once")
        if not self._membership.is_joiner(request.address, request.node_id):
            raise Reject(
                Status.PRECONDITION,
                Why.NOT_A_JOINER,
                "FetchState gives weight only to a joining node that answers Hello at the "
                "address it names",
            )
        with self._donated_lock:
            if request.node_id in self._donated_to:
                raise Reject(
                    Status.EXHAUSTED, Why.DONATION_BUSY, "this node was given a state just now"
                )
            self._donated_to[request.node_id] = now

    def resolve_push(self, request: pb.ResolveRequest, peer: str) -> pb.ResolveReply:
        """The final outcome of a push whose sender lost the ack (see Sender._resolve)."""
        self.last_settling_call = time.monotonic()
        count, outcome = RESOLVED[self.inbox.resolve(request.sender_id, request.message_id)]
        self._counters.add(count)
        return pb.ResolveReply(outcome=outcome)

    def rejected(self, reject: Reject, peer: str) -> None:
        """Count a refused call, and log it once per host and reason."""
        self._counters.reject(reject.counter)
        host = peer_host(peer)  # once per host and reason, whatever port each call came from
        self._log_once(host, reject.counter.value, f"refused a call from {host}: {reject.reason}")

    def rejected_quietly(self, why: Why) -> None:
        """Count a refusal that ends no call of the caller's own (a message cut as too slow)."""
        self._counters.reject(why)

    def written_off(self, weight: float) -> None:
        """Count weight that left this node and may or may not have arrived (a donation whose
        stream died with the network process after its last chunk)."""
        self._counters.add(Count.WEIGHT_WRITTEN_OFF, weight)

    # --- the training thread -------------------------------------------------------------------

    def serve_donations(self, donate: Donate, step: int) -> None:
        """Answer the joiners waiting for a state: `donate` snapshots into a receive buffer
        and splits the weight, exactly as for a push."""
        if not self._donations.queue:
            return  # the usual step; read unlocked, so a joiner arriving now waits a step
        while True:
            try:
                fut, given_buf, release = self._donations.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue  # the joiner gave up waiting
            if given_buf is None and self._pool is not None:
                buf, release = self._pool.acquire(), self._pool.release
            else:
                buf = given_buf
            given = None if buf is None else donate(buf)
            if buf is None or given is None or release is None:
                if buf is not None and given_buf is None and release is not None:
                    release(buf)
                fut.set_exception(Reject(Status.EXHAUSTED, Why.DONATION_BUSY, "nothing to donate"))
                continue
            weight, ready = given
            fut.set_result(
                Message(
                    sender_id=self._me.node_id,
                    message_id=0,
                    weight=weight,
                    payload=buf,
                    sender_step=step,
                    returned=True,
                    release=release,
                    ready=ready,
                )
            )

    def refuse_donations(self) -> None:
        """Tell every joiner still waiting that this node is leaving."""
        while True:
            try:
                fut, *_ = self._donations.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                fut.set_exception(Reject(Status.PRECONDITION, Why.DRAINING, "node is leaving"))

    def fetch(
        self, client: PeerClient, donors: list[str], take: Callable[[torch.Tensor, float], None]
    ) -> bool:
        """Join: fetch a state from the first of `donors` that gives one, validated like a
        push, and hand it to `take(buffer, weight)`; False when none of them donated."""
        if self._pool is None:  # the network process holds the receive buffers
            return self._fetch_into(client, donors, torch.empty(self._numel), take)
        buf = self._pool.acquire()
        if buf is None:
            raise RuntimeError("a joining node has every receive buffer free")
        try:
            return self._fetch_into(client, donors, buf, take)
        finally:
            self._pool.release(buf)

    def _fetch_into(
        self,
        client: PeerClient,
        donors: list[str],
        buf: torch.Tensor,
        take: Callable[[torch.Tensor, float], None],
    ) -> bool:
        request = pb.FetchRequest(
            node_id=self._me.node_id,
            cluster=self._cfg.cluster,
            fingerprint=self._me.fingerprint,
            protocol_version=PROTOCOL_VERSION,
            address=self._me.address,
        )
        for address in donors:
            try:
                chunks = client.fetch(address, request, self._cfg.push_timeout_s)
                header = first_header(chunks)
                check_header(header, self._me.expectation)
                read_state(header, chunks, buf)
            except (grpc.RpcError, Reject) as err:
                log.warning("join: %s did not donate: %s", address, _describe(err))
                continue
            self._counters.add(Count.BYTES_RECEIVED, header.payload_bytes)
            take(buf, header.weight)
            log.info("joined from %s with weight %.6g", address, header.weight)
            return True
        return False


def read_state(header: pb.StateHeader, chunks: Iterator[Chunk], buf: torch.Tensor) -> None:
    """Receive the payload that follows `header` (checked by check_header) into the float32
    state buffer `buf`: assembled and checksummed as it travels, decoded from its encoding,
    and every element finite. Raises Reject otherwise (`buf` then holds anything)."""
    assemble(header, chunks, byte_view(buf)[: header.payload_bytes])
    finish_state(header, buf)


def finish_state(header: pb.StateHeader, buf: torch.Tensor, numel: int | None = None) -> None:
    """Turn the payload bytes at the start of `buf` (as `header` describes them) into the
    float32 state of `numel` elements (default: all of `buf`) at its start, in place, and
    check every element finite; Reject otherwise."""
    state = buf if numel is None else buf[:numel]
    if header.encoding != pb.ENCODING_FP32:  # decoded aside: the bytes and values overlap
        decoded = torch.empty_like(state)
        decode(header.encoding, buf.view(torch.uint8)[: header.payload_bytes], decoded)
        state.copy_(decoded)
    if not all_finite(state):
        raise Reject(Status.INVALID, Why.NOT_FINITE, "state has NaN or Inf values")


def _describe(err: BaseException) -> str:
    if isinstance(err, grpc.RpcError):
        return f"{err.code().name}: {err.details()}"
    return str(err)
