"""GossipNode: GoSGD gossip around a user's PyTorch model (the Python API).

    node = GossipNode(model, NodeConfig(listen="0.0.0.0:7070", peers=["10.0.0.2:7070"]))
    for x, y in batches:
        loss_fn(model(x), y).backward(); optimizer.step(); optimizer.zero_grad()
        node.step()          # maybe push (x, a/2) to a random peer; merge what arrived
    node.finish()            # settle every in-flight message, then node.close()

Threads. The caller's thread (the training thread) alone reads and writes the model state x
and the weight a: in step(), finish(), leave() and the constructor. gRPC server threads
validate incoming messages into the inbox and queue donation requests; sender threads stream
snapshots; a membership thread exchanges peer lists. They meet only through the inbox, queues
and futures, so nothing merges during a local step and training never waits on the network.
With send_process, a child process makes the sender threads' gRPC calls (gosgd_p2p.sendproc).
"""

from __future__ import annotations

import itertools
import logging
import queue
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from typing import Any

import grpc
import torch

from gosgd_p2p import algorithm
from gosgd_p2p.client import PeerClient, PushFailed
from gosgd_p2p.config import NodeConfig, parse_address, text_seed
from gosgd_p2p.discovery import MdnsDiscovery, advertise_host
from gosgd_p2p.inbox import Inbox, Message
from gosgd_p2p.malloc import tune_malloc
from gosgd_p2p.metrics import Counters
from gosgd_p2p.peers import PeerTable
from gosgd_p2p.security import Credentials
from gosgd_p2p.sendproc import SendProcessClient
from gosgd_p2p.server import GossipServer
from gosgd_p2p.staging import Staging
from gosgd_p2p.state import BufferPool, StateLayout, all_finite, module_state
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import (
    PROTOCOL_VERSION,
    Chunk,
    Expectation,
    Reject,
    assemble,
    check_header,
    first_header,
    split_for_streaming,
)

__all__ = ["GossipNode", "JoinError"]

log = logging.getLogger(__name__)

#: Most peers listed in one Hello (peer exchange spreads the rest over later rounds).
HELLO_PEERS = 64
#: Hello calls in flight at once in a membership round.
HELLO_PARALLEL = 8
#: Distinct (peer, reason) pairs remembered for log-once; beyond this, rejections are counted only.
LOG_ONCE_LIMIT = 1024


class Lost:
    """Outcome of a push whose receiver vanished, possibly holding it: written off."""


LOST = Lost()


class JoinError(RuntimeError):
    """A joining node could not obtain a state from any peer."""


def _byte_view(buf: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (no copy)."""
    array: Any = buf.numpy()
    return memoryview(array).cast("B")


class GossipNode:
    """One GoSGD node: a gRPC server, a sender, an inbox and a peer table around `model`.

    The constructor binds the server, contacts the seed peers (and listens for mDNS peers) and
    decides whether this node founds the cluster (weight `founder_weight`, its own initial
    state) or joins a running one (weight 0, then the state and half the weight of a random
    peer, fetched before it returns). `client` replaces the PeerClient (fault injection). Create the
    model from the same seed on every founder (`gosgd_p2p.cluster_seed`), so founders start
    from the same point, as in the paper.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: NodeConfig | None = None,
        *,
        client: PeerClient | None = None,
        founder_weight: float = 1.0,
        **overrides: Any,
    ) -> None:
        cfg = replace(config or NodeConfig(), **overrides)
        self.config = cfg
        if cfg.tune_malloc:
            tune_malloc()
        named = module_state(model)
        self.layout = StateLayout(named)
        self._tensors = [t for _, t in named]
        self.device = self._tensors[0].device
        if any(t.device != self.device for t in self._tensors):
            raise ValueError("all of the model's float tensors must be on one device")
        seed = cfg.seed if cfg.seed is not None else text_seed(f"gossip:{cfg.node_id}")
        self._rng = random.Random(seed)
        #: GoSGD weight a of this node (training thread only).
        self.weight = 0.0
        #: Local steps taken (calls to step()).
        self.step_count = 0
        self.counters = Counters()
        self._last_distance: torch.Tensor | None = None  # see last_distance
        self._has_state = False
        self._finished = False
        self._closed = False

        pin = self.device.type == "cuda"
        credentials = Credentials.from_files(cfg.token_file, cfg.tls_cert, cfg.tls_key, cfg.tls_ca)
        if cfg.send_process:
            if client is not None:
                raise ValueError("send_process makes its own client: do not pass client=")
            # the send buffers are shared with the child process that makes the pushes
            client = SendProcessClient(
                credentials, self.layout.nbytes, cfg.send_buffers, tune_malloc=cfg.tune_malloc
            )
            if pin:
                client.pin_buffers()
            self._send_pool = BufferPool(
                self.layout.numel, cfg.send_buffers, buffers=client.buffers
            )
        else:
            self._send_pool = BufferPool(self.layout.numel, cfg.send_buffers, pin=pin)
        self._recv_pool = BufferPool(self.layout.numel, cfg.inbox_size, pin=pin)
        self._staging = Staging(self.layout, self._tensors)
        self.inbox = Inbox()
        self._expect = Expectation(cfg.cluster, self.layout.fingerprint, self.layout.nbytes)
        self._donations: queue.Queue[Future[Message]] = queue.Queue(maxsize=2)
        # Ids start at a random point: a node restarted under the same id must not reuse
        # the ids of its previous life, which receivers remember as already applied.
        self._message_ids = itertools.count(secrets.randbits(62) + 1)
        self._inflight = 0
        self._inflight_cv = threading.Condition()
        self._logged: set[tuple[str, str]] = set()
        self._partners: set[str] = set()  # node ids we exchanged a message with
        self._last_settling_call = 0.0  # monotonic time of the last PushState or ResolvePush
        self._partners_lock = threading.Lock()
        self._alone_logged = False

        # `client` lets tests and benchmarks inject faults (gosgd_p2p.faults)
        self._client = client or PeerClient(credentials)
        self._sender = ThreadPoolExecutor(cfg.send_buffers, thread_name_prefix="gosgd-send")
        #: Hello calls of a membership round run here in parallel (the survey, then membership).
        self._hello_pool = ThreadPoolExecutor(HELLO_PARALLEL, thread_name_prefix="gosgd-hello")
        self._stop = threading.Event()
        self._meet = threading.Event()  # wakes the membership thread early
        self._rng_membership = random.Random(seed + 1)  # the training thread owns self._rng
        self._peers_ready = threading.Event()  # Hello waits for the peer table to exist
        try:
            self._server = GossipServer(
                self, cfg.listen, cfg.server_workers, credentials, cfg.receive_timeout_s
            )
        except BaseException:
            self._client.close()  # a send process among others
            raise
        self._discovery: MdnsDiscovery | None = None
        try:
            listen_host, _ = parse_address(cfg.listen)
            #: Address peers use to reach this node.
            self.address = cfg.advertise or (
                f"{advertise_host(listen_host, cfg.mdns_interface)}:{self._server.port}"
            )
            self.peers = PeerTable(cfg.node_id, self.address, cfg.max_failures)
            for seed_address in cfg.peers:
                self.peers.add_seed(seed_address)
            self._peers_ready.set()

            # discovery: seeds now; with mDNS, a short window to hear who is out there
            if cfg.mdns_enabled:
                host, port = parse_address(self.address)
                host = socket.gethostbyname(host)
                # A server bound to one address is advertised on that interface only (a node
                # on 127.0.0.1 stays off the LAN); a wildcard one on every interface.
                wildcard = listen_host in ("", "0.0.0.0", "::")
                self._discovery = MdnsDiscovery(
                    cfg.node_id,
                    cfg.cluster,
                    PROTOCOL_VERSION,
                    (host, port),
                    on_found=self._found_by_mdns,
                    interface=cfg.mdns_interface or (None if wildcard else host),
                )
                self._discovery.start()
                self._stop.wait(cfg.discovery_wait_s)

            # founder or joiner: join when a peer is already training
            replies = self._survey([p.address for p in self.peers.all()])
            donors = [a for a, r in replies.items() if r.has_state and r.step > 0 and r.accepting]
            #: True when this node joined a running cluster, False when it founded one.
            self.joined = bool(donors)
            if donors:
                self._join(donors)
            else:
                # founders start with a = 1 (only ratios matter), or a checkpoint's weight
                self.weight = algorithm.check_weight(founder_weight, positive=True)
            self._has_state = True
            self.inbox.open()
            self._server.set_serving(True)
        except BaseException:
            self._shutdown_threads()
            raise
        self._membership = threading.Thread(
            target=self._membership_loop, name="gosgd-membership", daemon=True
        )
        self._membership.start()
        log.info(
            "node %s listening on %s (%s, %d known peers)",
            cfg.node_id,
            self.address,
            "joined" if donors else "founder",
            len(self.peers.all()),
        )

    # --- the training thread's API -----------------------------------------------------------

    def step(self, push_to: str | None = None) -> None:
        """Call once per local step, after optimizer.step(), from the training thread.

        With probability p, halves the weight and hands a snapshot to a random live peer (sent
        in the background); then merges every message waiting in the inbox. Never waits on the
        network. `push_to` (an address) replaces the coin and the draw with that one push: a
        fixed message schedule, e.g. to replay a `gosgd-sim` run on a real cluster.
        """
        self._check_open()
        self.step_count += 1
        self._staging.poll()
        self._serve_donations()
        if push_to is not None:
            self._push(push_to)
        elif self.config.p > 0.0 and self._rng.random() < self.config.p:
            self._push_random()
        self._merge_inbox()

    def finish(self) -> float:
        """Stop gossiping and settle: returns the final weight (training thread).

        Stops accepting pushes (senders take theirs back), waits until every push of ours is
        acked or returned (up to drain_timeout_s), and merges the inbox. Once every node of a
        cluster has finished, their final weights sum exactly to what the founders started with.
        """
        self._check_open()
        if not self._finished:
            self._finished = True
            self.inbox.close()
            self._server.set_serving(False)
            if self._discovery is not None:
                self._discovery.close()  # mDNS goodbye: peers stop finding a node that drains
            self._refuse_donations()
            deadline = time.monotonic() + self.config.drain_timeout_s
            with self._inflight_cv:
                while self._inflight:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        log.warning("%d push(es) still in flight after draining", self._inflight)
                        break
                    self._inflight_cv.wait(left)
        self._merge_inbox()
        self._staging.flush()
        return self.weight

    def leave(self) -> float:
        """Finish, then hand the whole weight and state to a live peer (graceful leave).

        Returns the weight handed over; 0.0 if no peer took it (the weight then leaves with
        this node, and the log says so).
        """
        self.finish()
        if self.weight == 0.0:
            return 0.0
        buf = self._send_pool.acquire()
        if buf is None:  # impossible after finish(): every push is settled
            raise RuntimeError("no send buffer free after draining")
        try:
            self._snapshot(buf)()  # leaving: waiting for the copy is fine
            header = self._header(self.weight)
            candidates = self.peers.live()
            self._rng.shuffle(candidates)
            for peer in candidates:
                outcome = self._deliver(peer.address, header, _byte_view(buf))
                if outcome is None:
                    log.info("leave: %s did not take our state", peer.address)
                    continue
                if isinstance(outcome, Lost):
                    self.weight = 0.0
                    log.warning("leave: %s vanished with our weight", peer.address)
                    return 0.0
                handed, self.weight = self.weight, 0.0
                self.counters.add("pushes_acked")
                self.counters.add("bytes_sent", self.layout.nbytes)
                log.info("left: handed weight %.6g to %s", handed, peer.address)
                return handed
        finally:
            self._send_pool.release(buf)
        log.warning("leave: no live peer took our state; weight %.6g leaves with us", self.weight)
        return 0.0

    def close(self, grace: float = 2.0) -> None:
        """Stop the server and every thread. Call finish() or leave() first to keep the weight.

        After finish() the server lingers (up to linger_s) until no push or ResolvePush has
        come for quiet_s: meanwhile it refuses pushes, which tells senders it left, and it
        answers the ResolvePush of any sender whose ack was lost, which only it can answer.
        """
        if self._closed:
            return
        self._closed = True
        self._refuse_donations()
        if self._finished:
            deadline = time.monotonic() + self.config.linger_s
            while (now := time.monotonic()) < deadline:
                quiet_left = self._last_settling_call + self.config.quiet_s - now
                if quiet_left <= 0 or self._stop.wait(min(quiet_left, deadline - now)):
                    break
        self._shutdown_threads(grace)
        self._staging.flush()

    def __enter__(self) -> GossipNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def last_distance(self) -> float | None:
        """||x_s - x|| of the most recent received message, before it was merged."""
        distance = self._last_distance
        return None if distance is None else float(distance)

    @property
    def in_flight(self) -> int:
        """Pushes handed to the sender and not yet acked or returned."""
        with self._inflight_cv:
            return self._inflight

    @property
    def state(self) -> list[torch.Tensor]:
        """The gossiped tensors (aliases of the model's own), in layout order."""
        return list(self._tensors)

    def stats(self) -> dict[str, Any]:
        """Counters and gauges for logs: messages and bytes sent/received/returned, peers."""
        out: dict[str, Any] = dict(self.counters.snapshot())
        out.update(
            weight=self.weight,
            step=self.step_count,
            live_peers=len(self.peers.live()),
            inbox=len(self.inbox),
            last_distance=self.last_distance,
            partners=self.partners(),
            send_process=self.send_process_pid,
        )
        return out

    @property
    def send_process_pid(self) -> int | None:
        """The process id of the child that makes this node's pushes (send_process), while it
        runs; None without one, or once it is gone (pushes then go from this process)."""
        client = self._client
        if isinstance(client, SendProcessClient) and client.alive:
            return client.pid
        return None

    def partners(self) -> list[str]:
        """Ids of the nodes this node has pushed to or received from (at most 1024 kept)."""
        with self._partners_lock:
            return sorted(self._partners)

    def _add_partner(self, node_id: str) -> None:
        with self._partners_lock:
            if len(self._partners) < 1024:
                self._partners.add(node_id)

    # --- training thread internals -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("node is closed")

    def _header(self, weight: float) -> pb.StateHeader:
        return pb.StateHeader(
            sender_id=self.config.node_id,
            message_id=next(self._message_ids),
            weight=weight,
            fingerprint=self.layout.fingerprint,
            encoding=pb.ENCODING_FP32,
            payload_bytes=self.layout.nbytes,
            sender_step=self.step_count,
            cluster=self.config.cluster,
            protocol_version=PROTOCOL_VERSION,
            sender_address=self.address,
        )

    def _snapshot(self, buf: torch.Tensor) -> Callable[[], None]:
        """Start copying x into the host buffer `buf`; returns the wait for that copy.

        On the CPU the copy is done on return; on CUDA it runs on a side stream (the training
        thread's time here, the "snapshot" timer, is only the enqueueing).
        """
        started = time.perf_counter()
        wait = self._staging.snapshot(buf)
        self.counters.observe("snapshot", time.perf_counter() - started)
        return wait

    def _push_random(self) -> None:
        if self.weight / 2.0 <= 0.0:
            return  # no weight (or a subnormal that halves to zero) to share
        peer = self.peers.choose(self._rng)
        if peer is None:
            if not self._alone_logged:
                log.warning("no live peer: training alone until one appears")
                self._alone_logged = True
            self.counters.add("pushes_no_peer")
            return
        self._alone_logged = False
        self._push(peer.address)

    def _push(self, address: str) -> None:
        """Halve the weight and send (snapshot, half) to `address` in the background."""
        if self.weight / 2.0 <= 0.0:
            return
        buf = self._send_pool.acquire()
        if buf is None:
            self.counters.add("pushes_skipped_busy")  # every snapshot buffer still in flight
            return
        ready = self._snapshot(buf)
        self.weight, sent = algorithm.halve(self.weight)
        header = self._header(sent)
        msg = Message(
            sender_id=self.config.node_id,
            message_id=header.message_id,
            weight=sent,
            payload=buf,
            sender_step=self.step_count,
            returned=True,
            release=self._send_pool.release,
            ready=ready,
        )
        with self._inflight_cv:
            self._inflight += 1
        self.counters.add("pushes_started")
        self._sender.submit(self._push_task, address, header, msg)

    def _merge_inbox(self) -> None:
        messages = self.inbox.drain()
        if not messages:
            return
        started = time.perf_counter()
        self._merge(messages)
        self.counters.observe("merge", time.perf_counter() - started)

    def _merge(self, messages: list[Message]) -> None:
        for msg in messages:
            msg.ready()  # returned snapshots were awaited by their sender; this makes it local
            incoming = self.layout.views(self._staging.load(msg.payload))
            if msg.returned:
                self.counters.add("merged_returned")
            else:
                diffs = torch._foreach_sub(incoming, self._tensors)
                # kept as a tensor: a float() here would wait for the GPU at every merge
                self._last_distance = torch.linalg.vector_norm(
                    torch.stack(torch._foreach_norm(diffs))
                )
                self.counters.add("merged_received")
            self.weight = algorithm.merge_(self._tensors, self.weight, incoming, msg.weight)
            self._staging.release_after(msg.release, msg.payload)

    def _serve_donations(self) -> None:
        """Answer joiners' FetchState requests: snapshot and half our weight, as for a push."""
        while True:
            try:
                fut = self._donations.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue  # the joiner gave up waiting
            buf = self._recv_pool.acquire() if self.weight > 0.0 else None
            if buf is None:
                fut.set_exception(Reject("exhausted", "donation_busy", "no buffer to donate"))
                continue
            ready = self._snapshot(buf)
            self.weight, sent = algorithm.halve(self.weight)
            fut.set_result(
                Message(
                    sender_id=self.config.node_id,
                    message_id=0,
                    weight=sent,
                    payload=buf,
                    sender_step=self.step_count,
                    returned=True,
                    release=self._recv_pool.release,
                    ready=ready,
                )
            )

    def _refuse_donations(self) -> None:
        while True:
            try:
                fut = self._donations.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                fut.set_exception(Reject("precondition", "draining", "node is leaving"))

    def _evict(self, address: str, reason: str) -> None:
        """Count and log a peer suspended after max_failures failed calls in a row."""
        peer = self.peers.get(address)
        who = f"{peer.node_id} at {address}" if peer and peer.node_id else address
        self.counters.add("peers_evicted")
        log.warning(
            "evicted peer %s after %d failed calls (%s); it returns if seen again",
            who,
            self.config.max_failures,
            reason,
        )

    def _join(self, donors: list[str]) -> None:
        """Take the state and half the weight of one of `donors` (constructor only)."""
        request = pb.FetchRequest(
            node_id=self.config.node_id,
            cluster=self.config.cluster,
            fingerprint=self.layout.fingerprint,
            protocol_version=PROTOCOL_VERSION,
        )
        self._rng.shuffle(donors)
        buf = self._recv_pool.acquire()
        assert buf is not None, "a new node has every buffer free"
        try:
            for address in donors:
                try:
                    chunks = self._client.fetch(address, request, self.config.push_timeout_s)
                    header = first_header(chunks)
                    check_header(header, self._expect)
                    assemble(header, chunks, _byte_view(buf))
                    if not all_finite(buf):
                        raise Reject("invalid", "not_finite", "state has NaN or Inf")
                except (grpc.RpcError, Reject) as err:
                    log.warning("join: %s did not donate: %s", address, _describe(err))
                    continue
                self.weight = algorithm.merge_(
                    self._tensors, 0.0, self.layout.views(buf.to(self.device)), header.weight
                )
                self.counters.add("bytes_received", self.layout.nbytes)
                log.info("joined from %s with weight %.6g", address, self.weight)
                return
        finally:
            self._recv_pool.release(buf)
        raise JoinError(
            f"could not join: none of {len(donors)} running peer(s) donated a state; "
            "check that every node runs the same model and cluster name"
        )

    # --- sender threads ------------------------------------------------------------------------

    def _push_task(self, address: str, header: pb.StateHeader, msg: Message) -> None:
        try:
            try:
                msg.ready()  # a GPU snapshot may still be on its way into the buffer
                ack = self._deliver(address, header, _byte_view(msg.payload))
            except Exception:  # a bug must not lose the weight either
                log.exception("push to %s failed unexpectedly", address)
                ack = None
            if ack is None:
                self.inbox.put_returned(msg)  # nothing lost: the weight comes home
                self.counters.add("pushes_returned")
            elif isinstance(ack, Lost):
                msg.release(msg.payload)  # written off with the peer that vanished
            else:
                self._add_partner(ack.receiver_id)
                self.counters.add("pushes_acked")
                self.counters.add("bytes_sent", self.layout.nbytes)
                msg.release(msg.payload)
        finally:
            with self._inflight_cv:
                self._inflight -= 1
                self._inflight_cv.notify_all()

    def _deliver(
        self, address: str, header: pb.StateHeader, payload: memoryview
    ) -> pb.PushAck | None | Lost:
        """Push one message and settle its fate (sender threads and leave()).

        Returns the ack when the receiver holds the message, None when it certainly does not
        (the caller then takes the weight back), LOST when the receiver vanished with it. A
        push is only ever "maybe delivered" when its last chunk left and no ack came back (a
        cut connection, a deadline): then the receiver alone knows, and `_resolve` asks it.
        """
        try:
            ack = self._client.push(
                address, header, payload, self.config.push_timeout_s, self.config.chunk_bytes
            )
        except PushFailed as err:
            self._push_failed(address, err)
            if not err.maybe_delivered:
                return None
            return self._resolve(address, header)
        self.peers.record_success(address)
        return ack

    def _resolve(self, address: str, header: pb.StateHeader) -> pb.PushAck | None | Lost:
        """Settle a push whose ack was lost, by asking its receiver (ResolvePush).

        Why this is exact: the receiver commits a message only under its inbox lock, after
        checking that the message was not aborted, and ResolvePush answers under the same lock
        either COMMITTED (it has it: the weight is the receiver's) or ABORTED (it does not,
        and records that it never will: a late stream of the same message is refused). Either
        answer is final, so the weight is counted once.

        A receiver that cannot answer is presumed to have crashed with the message: at once
        when its port refuses connections (the process is gone; whatever it had committed is
        gone with its own weight), otherwise after resolve_timeout_s. Then the weight is
        written off (LOST), never taken back: taking it back would count it twice if the
        receiver had committed it. The cost, if the receiver was alive but unreachable for
        that long and had not committed it, is that weight; the log says how much.
        """
        deadline = time.monotonic() + self.config.resolve_timeout_s
        delay = 0.1
        while True:
            left = deadline - time.monotonic()
            try:
                outcome = self._client.resolve(
                    address,
                    header.sender_id,
                    header.message_id,
                    timeout=max(0.1, min(self.config.rpc_timeout_s, left)),
                )
            except grpc.RpcError as err:
                gone = "connection refused" in (err.details() or "").lower()
                left = deadline - time.monotonic()
                if gone or left <= 0 or self._stop.is_set():
                    self.counters.add("pushes_lost_with_peer")
                    log.warning(
                        "push %d to %s: no answer (%s); weight %.6g presumed lost with that peer",
                        header.message_id,
                        address,
                        "its port is closed" if gone else err.code().name,
                        header.weight,
                    )
                    return LOST
                self._stop.wait(min(delay, left))
                delay = min(delay * 2, 2.0)
                continue
            if outcome == pb.PUSH_OUTCOME_COMMITTED:
                self.counters.add("pushes_resolved_committed")
                peer = self.peers.get(address)
                return pb.PushAck(receiver_id=(peer.node_id if peer and peer.node_id else ""))
            self.counters.add("pushes_resolved_aborted")
            return None

    def _push_failed(self, address: str, err: PushFailed) -> None:
        code = err.code
        if code == grpc.StatusCode.FAILED_PRECONDITION and "not accepting" in err.details:
            self.peers.mark_left(address)
            self._log_once(address, "draining", f"{address} is draining; not pushing there")
            return
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # A full inbox is back-pressure from a live peer, not a sign that it is gone.
            self.counters.add("pushes_busy")
            self._log_once(address, "busy", f"{address} is busy: {err.details}")
            return
        if self.peers.record_failure(address):
            self._evict(address, code.name)
        self._log_once(address, code.name, f"push to {address} failed: {err}")

    # --- server threads (NodeBridge) -----------------------------------------------------------

    def receive_push(
        self, chunks: Iterator[Chunk], peer: str, active: Callable[[], bool] = lambda: True
    ) -> pb.PushAck:
        """Validate a pushed message completely, then commit it to the inbox (server thread).

        `active()` says whether the call is still alive. gRPC's Python server ends the request
        stream like a normal half-close when a receive fails (e.g. an oversized trailing
        message), and only then cancels the call; a message is committed only while the call
        is alive, and taken back out of the inbox if the call turns out to have failed.
        """
        self._last_settling_call = time.monotonic()
        header = first_header(chunks)
        check_header(header, self._expect)
        if not self.inbox.accepting:
            raise Reject("precondition", "draining", "node is not accepting pushes")
        fate = self.inbox.fate(header.sender_id, header.message_id)
        if fate == "committed":  # a redelivery: acknowledge, apply once
            self.counters.add("pushes_duplicate")
            return pb.PushAck(receiver_id=self.config.node_id, duplicate=True)
        if fate == "aborted":
            raise Reject("precondition", "aborted", "the sender took this message back")
        buf = self._recv_pool.acquire()
        if buf is None:
            raise Reject("exhausted", "inbox_full", "inbox full; try another peer")
        committed = False
        try:
            try:
                assemble(header, chunks, _byte_view(buf))
            except grpc.RpcError:
                raise Reject("invalid", "aborted", "stream aborted by the sender") from None
            if not all_finite(buf):
                raise Reject("invalid", "not_finite", "state has NaN or Inf values")
            msg = Message(
                sender_id=header.sender_id,
                message_id=header.message_id,
                weight=header.weight,
                payload=buf,
                sender_step=header.sender_step,
                returned=False,
                release=self._recv_pool.release,
            )
            if not active():
                raise Reject("invalid", "aborted", "the call failed before the message ended")
            committed = self.inbox.commit(msg)
            if committed and not active() and self.inbox.retract(msg):
                committed = False
                raise Reject("invalid", "aborted", "the call failed as the message ended")
        finally:
            if not committed:
                self._recv_pool.release(buf)
        if header.sender_address:
            try:
                parse_address(header.sender_address)
                # adds a sender we did not know; never revives one that said it is draining
                # (a finishing node's last pushes arrive after it said so)
                self.peers.observe(header.sender_address, header.sender_id, seen=False)
            except ValueError:
                pass
        if not committed:
            self.counters.add("pushes_duplicate")
            return pb.PushAck(receiver_id=self.config.node_id, duplicate=True)
        self._add_partner(header.sender_id)
        self.counters.add("pushes_received")
        self.counters.add("bytes_received", self.layout.nbytes)
        return pb.PushAck(receiver_id=self.config.node_id)

    def donate_state(self, request: pb.FetchRequest, peer: str) -> Iterator[bytes]:
        """Stream half our weight and our state to a joiner; it comes back if the stream fails."""
        if request.protocol_version != PROTOCOL_VERSION:
            raise Reject("precondition", "protocol_version", "other protocol version")
        if request.cluster != self.config.cluster:
            raise Reject("precondition", "cluster", f"cluster {request.cluster!r} is not ours")
        if request.fingerprint != self.layout.fingerprint:
            raise Reject("precondition", "fingerprint", "model fingerprint differs")
        if not self.inbox.accepting:
            raise Reject("precondition", "draining", "node is not accepting joiners")
        fut: Future[Message] = Future()
        try:
            self._donations.put_nowait(fut)
        except queue.Full:
            raise Reject("exhausted", "donation_busy", "too many joiners at once") from None
        try:
            msg = fut.result(timeout=self.config.rpc_timeout_s)
        except FutureTimeout:
            if fut.cancel():
                raise Reject("exhausted", "donation_timeout", "training thread busy") from None
            msg = fut.result()
        done = False
        try:
            msg.ready()
            header = self._header(msg.weight)
            payload = _byte_view(msg.payload)
            yield from split_for_streaming(header, payload, self.config.chunk_bytes)
            done = True
        finally:
            if done:
                msg.release(msg.payload)
                self.counters.add("donations")
                self.counters.add("bytes_sent", self.layout.nbytes)
            else:
                self.inbox.put_returned(msg)
                self.counters.add("donations_returned")

    def hello(self, request: pb.HelloRequest, peer: str) -> pb.HelloReply:
        """Membership: learn the caller and the peers it knows; tell it ours."""
        if not self._peers_ready.wait(self.config.rpc_timeout_s):
            raise Reject("precondition", "starting", "node is starting")
        if request.cluster == self.config.cluster and request.protocol_version == PROTOCOL_VERSION:
            self._learn(request.self, request.peers, draining=request.draining)
            if not request.draining:
                self._meet_soon(request.self.address)
        return pb.HelloReply(
            self=pb.PeerInfo(node_id=self.config.node_id, address=self.address),
            cluster=self.config.cluster,
            protocol_version=PROTOCOL_VERSION,
            peers=self._peer_infos(),
            step=self.step_count,
            has_state=self._has_state,
            accepting=self.inbox.accepting,
        )

    def resolve_push(self, request: pb.ResolveRequest, peer: str) -> pb.ResolveReply:
        """The final outcome of a push whose sender lost the ack (see _resolve)."""
        self._last_settling_call = time.monotonic()
        fate = self.inbox.resolve(request.sender_id, request.message_id)
        self.counters.add(f"resolved_{fate}")
        if fate == "committed":
            return pb.ResolveReply(outcome=pb.PUSH_OUTCOME_COMMITTED)
        return pb.ResolveReply(outcome=pb.PUSH_OUTCOME_ABORTED)

    def rejected(self, reject: Reject, peer: str) -> None:
        self.counters.add(f"rejected_{reject.counter}")
        host = _peer_host(peer)  # once per host and reason, whatever port each call came from
        self._log_once(host, reject.counter, f"refused a call from {host}: {reject.reason}")

    # --- membership thread ---------------------------------------------------------------------

    def _found_by_mdns(self, address: str, node_id: str) -> None:
        """mDNS saw a node of our cluster (zeroconf's thread)."""
        self._log_once(node_id, "mdns", f"mDNS: found {node_id} at {address}")
        self.peers.observe(address, node_id)
        self._meet_soon(address)

    def _meet_soon(self, address: str) -> None:
        """Wake the membership thread if `address` has never answered a call of ours."""
        peer = self.peers.get(address)
        if peer is not None and not peer.confirmed:
            self._meet.set()

    def _peer_infos(self) -> list[pb.PeerInfo]:
        """The live peers we have talked to ourselves, under the addresses they advertise: a
        seed not yet met may be an alias (a host name) of one of them, and hearsay of it would
        add a second row for that node in every table it reaches."""
        met = [p for p in self.peers.live() if p.confirmed][:HELLO_PEERS]
        return [pb.PeerInfo(node_id=p.node_id or "", address=p.address) for p in met]

    def _learn(self, who: pb.PeerInfo, peers: Any, *, draining: bool = False) -> None:
        """A caller's Hello: the caller, seen just now, and the peers it lists."""
        try:
            parse_address(who.address)
        except ValueError:
            return
        self.peers.observe(who.address, who.node_id or None, draining=draining)
        self._hearsay(peers)

    def _hearsay(self, peers: Any) -> None:
        """Peers another node lists: added when unknown, never revived by this alone."""
        for info in peers:
            try:
                parse_address(info.address)
            except ValueError:
                continue
            self.peers.observe(info.address, info.node_id or None, seen=False)

    def _hello_round(self, addresses: list[str]) -> dict[str, pb.HelloReply]:
        """Hello each address (in parallel); returns the replies of those in our cluster."""
        replies: dict[str, pb.HelloReply] = {}
        if not addresses:
            return replies
        futures = {a: self._hello_pool.submit(self._hello_one, a) for a in addresses}
        for address, fut in futures.items():
            reply = fut.result()
            if reply is not None:
                replies[address] = reply
        return replies

    def _survey(self, addresses: list[str], attempts: int = 3) -> dict[str, pb.HelloReply]:
        """Hello every address, retrying silent ones a few times: founding by mistake, because
        a busy peer missed one Hello, would split the cluster's history (constructor only)."""
        replies: dict[str, pb.HelloReply] = {}
        pending = list(addresses)
        for attempt in range(attempts):
            replies.update(self._hello_round(pending))
            pending = [a for a in pending if a not in replies and self.peers.get(a) is not None]
            if not pending or attempt == attempts - 1 or self._stop.wait(0.5 * (attempt + 1)):
                break
        return replies

    def _hello_one(self, address: str) -> pb.HelloReply | None:
        request = pb.HelloRequest(
            self=pb.PeerInfo(node_id=self.config.node_id, address=self.address),
            cluster=self.config.cluster,
            protocol_version=PROTOCOL_VERSION,
            peers=self._peer_infos(),
            draining=self._finished,
        )
        try:
            reply = self._client.hello(address, request, self.config.rpc_timeout_s)
        except grpc.RpcError as err:
            if self.peers.record_failure(address):
                self._evict(address, err.code().name)
            return None
        if reply.cluster != self.config.cluster or reply.protocol_version != PROTOCOL_VERSION:
            self._log_once(address, "foreign", f"{address} is in cluster {reply.cluster!r}")
            self.peers.remove(address)
            return None
        if reply.self.node_id == self.config.node_id:
            self.peers.remove(address)  # ourselves under another address
            return None
        # One row per node, under the address it advertises: a seed dialled by host name and
        # the same node found by mDNS or peer exchange must not count as two peers.
        canonical = address
        advertised = reply.self.address
        if advertised and advertised != address and advertised != self.address:
            try:
                parse_address(advertised)
            except ValueError:
                pass
            else:
                canonical = advertised
                self.peers.remove(address)
        draining = not reply.accepting
        self.peers.observe(canonical, reply.self.node_id or None, confirmed=True, draining=draining)
        self._hearsay(reply.peers)
        return reply

    def _membership_loop(self) -> None:
        interval = self.config.hello_interval_s
        while True:
            # a round every ~interval, or at once when a new peer shows up (_meet_soon)
            self._meet.wait(interval * self._rng_membership.uniform(0.5, 1.5))
            self._meet.clear()
            if self._stop.is_set():
                return
            known = self.peers.all()
            # Everyone heard of but never called, plus a few at random to refresh liveness.
            fresh = [p.address for p in known if not p.confirmed]
            others = [p.address for p in known if p.confirmed]
            picks = fresh + self._rng_membership.sample(others, min(2, len(others)))
            if picks:
                self._hello_round(picks)
            for address in self.peers.prune(self.config.forget_after_s):
                self._client.forget(address)
                log.info("forgot peer %s: not seen for %.0f s", address, self.config.forget_after_s)
            # live peers heard of but not met yet are worth a quick second round
            unmet = any(not p.confirmed and p.status == "live" for p in self.peers.all())
            interval = (
                min(0.2, self.config.hello_interval_s) if unmet else self.config.hello_interval_s
            )

    # --- shared helpers ------------------------------------------------------------------------

    def _log_once(self, peer: str, reason: str, message: str) -> None:
        key = (peer, reason)
        if key in self._logged or len(self._logged) >= LOG_ONCE_LIMIT:
            log.debug(message)
            return
        self._logged.add(key)
        log.info(message)

    def _shutdown_threads(self, grace: float = 2.0) -> None:
        self._stop.set()
        self._meet.set()
        if self._discovery is not None:
            self._discovery.close()
        membership = getattr(self, "_membership", None)
        if membership is not None:
            membership.join()
        self._hello_pool.shutdown(wait=True)
        self._server.stop(grace)
        self._sender.shutdown(wait=True)
        self._client.close()


def _peer_host(peer: str) -> str:
    """ "ipv4:10.0.0.2:51234" -> "10.0.0.2"; "ipv6:[::1]:5" -> "::1"; other forms unchanged."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6") or not rest:
        return peer or "unknown peer"
    host = rest.rpartition(":")[0] or rest
    return host.strip("[]")


def _describe(err: BaseException) -> str:
    if isinstance(err, grpc.RpcError):
        return f"{err.code().name}: {err.details()}"
    return str(err)
