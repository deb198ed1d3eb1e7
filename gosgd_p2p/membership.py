"""Membership: the peer table, Hello (both ways), mDNS, and the survey that founds or joins.

Owns the PeerTable, the membership thread (a Hello round every ~hello_interval_s, at once when
a new peer shows up), the Hello threads, and mDNS discovery. The server's threads answer Hello
here; the sender and the receiver report what they learn of peers (success, failure, a sender's
address). It never touches the model or the weight.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait

import grpc

from gosgd_p2p.client import PeerClient
from gosgd_p2p.config import NodeConfig, parse_address
from gosgd_p2p.discovery import Discovery, DiscoveryFactory, MdnsDiscovery
from gosgd_p2p.identity import Identity
from gosgd_p2p.metrics import Count, Counters, LogOnce
from gosgd_p2p.peers import Peer, PeerTable
from gosgd_p2p.reject import Reject, Status, Why
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import PROTOCOL_VERSION

__all__ = ["JoinError", "Membership"]

log = logging.getLogger(__name__)

#: Most peers listed in one Hello (peer exchange spreads the rest over later rounds).
HELLO_PEERS = 64
#: Hello calls in flight at once in a membership round.
HELLO_PARALLEL = 8
#: Addresses heard of but never reached that one membership round calls, at most: a flood of
#: made-up addresses costs a few dials a round, not a storm.
NEW_DIALS_PER_ROUND = 8
#: Seconds between the Hello rounds of a node waiting for its peers (wait_together): about
#: how far apart the first steps of nodes started together fall.
TOGETHER_POLL_S = 0.1
#: Peers one of those rounds asks, at most: in a large cluster started at once, each waiting
#: node's rounds stay small while it learns who is ready.
TOGETHER_PER_ROUND = 16


class JoinError(RuntimeError):
    """A joining node could not obtain a state from any peer."""


class Membership:
    """Who is out there, and who is alive enough to gossip with.

    `step()` reads the training thread's step count and `accepting()` whether the node takes
    pushes, for the Hello replies. Call `open(address)` once the server is bound, `survey()`
    to find running peers, `start()` to run the membership thread, `close()` to stop it.
    """

    def __init__(
        self,
        cfg: NodeConfig,
        identity: Identity,
        client: PeerClient,
        counters: Counters,
        log_once: LogOnce,
        *,
        step: Callable[[], int],
        accepting: Callable[[], bool],
        seed: int,
    ) -> None:
        self._cfg = cfg
        self._me = identity
        self._client = client
        self._counters = counters
        self._log_once = log_once
        self._step = step
        self._accepting = accepting
        self._rng = random.Random(seed)  # this part's own: the training thread owns the node's
        #: Whether this node has a state to give (Hello's has_state); set by the node.
        self.has_state = False
        #: Whether this node is finishing (Hello's draining); set by the node.
        self.draining = False
        #: Settles our pushes to an address whose node said it is closing (Hello's closing);
        #: set by the node to its sender's. Returns how many it settled.
        self.settle_pushes_to: Callable[[str], int] = lambda address: 0
        #: Makes the mDNS discovery that open() starts; set by the node to its network
        #: process's, so that zeroconf runs there.
        self.discovery: DiscoveryFactory = MdnsDiscovery
        self._peers: PeerTable | None = None
        self._ready = threading.Event()  # Hello waits for the peer table to exist
        self._stop = threading.Event()
        self._meet = threading.Event()  # wakes the membership thread early
        self._pool = ThreadPoolExecutor(HELLO_PARALLEL, thread_name_prefix="gosgd-hello")
        self._discovery: Discovery | None = None
        self._thread: threading.Thread | None = None

    @property
    def peers(self) -> PeerTable:
        """The peer table (exists once open() has run)."""
        if self._peers is None:
            raise RuntimeError("membership is not open yet")
        return self._peers

    def known_peers(self) -> list[Peer]:
        """Every row of the peer table; none before open() (any thread)."""
        return [] if self._peers is None else self._peers.all()

    def open(self, listen_host: str) -> None:
        """Create the peer table (with the seeds) under our bound address, and start mDNS.

        With mDNS, listens for discovery_wait_s so that the survey hears who is out there.
        """
        cfg = self._cfg
        self._peers = PeerTable(cfg.node_id, self._me.address, cfg.max_failures)
        for seed_address in cfg.peers:
            self._peers.add_seed(seed_address)
        self._ready.set()
        if not cfg.mdns_enabled:
            return
        host, port = parse_address(self._me.address)
        host = socket.gethostbyname(host)
        # A server bound to one address is advertised on that interface only (a node on
        # 127.0.0.1 stays off the LAN); a wildcard one on every interface.
        wildcard = listen_host in ("", "0.0.0.0", "::")
        self._discovery = self.discovery(
            cfg.node_id,
            cfg.cluster,
            PROTOCOL_VERSION,
            (host, port),
            self._found_by_mdns,
            cfg.mdns_interface or (None if wildcard else host),
        )
        self._discovery.start()
        self._stop.wait(cfg.discovery_wait_s)

    def survey(self, attempts: int = 3) -> list[str]:
        """Addresses of the peers that are training and would donate a state (constructor).

        Retries silent peers a few times: founding by mistake, because a busy peer missed one
        Hello, would split the cluster's history.
        """
        replies: dict[str, pb.HelloReply] = {}
        pending = [p.address for p in self.peers.all()]
        for attempt in range(attempts):
            replies.update(self._hello_round(pending))
            pending = [a for a in pending if a not in replies and self.peers.get(a) is not None]
            if not pending or attempt == attempts - 1 or self._stop.wait(0.5 * (attempt + 1)):
                break
        return [a for a, r in replies.items() if r.has_state and r.step > 0 and r.accepting]

    def wait_for_donors(self, timeout_s: float) -> list[str]:
        """A member that found no running peer (constructor): survey again every
        hello_interval_s, up to `timeout_s`; the donors found. Raises JoinError at the deadline:
        a member never founds anew."""
        cfg = self._cfg
        log.warning(
            "node %s was a member of cluster %r: waiting up to %g s for a running peer to "
            "rejoin from (seeds: %s); it never founds anew",
            cfg.node_id,
            cfg.cluster,
            timeout_s,
            ", ".join(cfg.peers) or "none, mDNS only",
        )
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if self._stop.wait(min(cfg.hello_interval_s, left)):  # paces the surveys
                break
            donors = self.survey()
            if donors:
                return donors
        raise JoinError(
            f"no running peer of cluster {cfg.cluster!r} within {timeout_s:g} s; a node that "
            "was a member never founds anew: start it once a peer runs"
        )

    def wait_together(self, count: int, timeout_s: float) -> bool:
        """Block until this node has met `count` live peers and `count` of its peers, asked
        since the wait began, have met as many, or until a peer has begun training. Nodes
        started with the same count then take their first steps within about TOGETHER_POLL_S
        of each other, not a membership round apart: the first one does not train alone and
        give its weight away before the others start. False at the timeout or when the node
        closes."""
        deadline = time.monotonic() + timeout_s
        need = min(count, HELLO_PEERS)  # a Hello lists at most HELLO_PEERS peers
        ready: set[str] = set()  # node ids of peers that listed `need` peers of their own
        picker = random.Random()  # not the membership thread's generator: this is another thread
        while True:
            live = self.peers.live()
            # the unmet ones too: calling them is what confirms them, without waiting for the
            # membership thread's next round
            pending = [p.address for p in live if p.node_id not in ready]
            asked = picker.sample(pending, min(TOGETHER_PER_ROUND, len(pending)))
            replies = self._hello_round(asked)
            if any(r.step > 0 for r in replies.values()):
                return True  # the cluster has started: each poll more puts this node behind
            ready |= {r.self.node_id for r in replies.values() if len(r.peers) >= need}
            ready &= {p.node_id for p in self.peers.live() if p.node_id}  # the ones that left
            if len(self.peers.pushable()) >= count and len(ready) >= count:
                return True
            left = deadline - time.monotonic()
            if left <= 0 or self._stop.wait(min(TOGETHER_POLL_S, left)):
                return False

    def start(self) -> None:
        """Start the membership thread."""
        self._thread = threading.Thread(target=self._loop, name="gosgd-membership", daemon=True)
        self._thread.start()

    def stop_advertising(self) -> None:
        """mDNS goodbye: peers stop finding a node that drains."""
        if self._discovery is not None:
            self._discovery.close()

    def farewell(self, timeout_s: float) -> int:
        """Before this finished node stops serving: a Hello saying it is closing to every peer
        in the table, in parallel, waiting up to `timeout_s` for the answers. A peer answers
        once it has settled its pushes to us by ResolvePush (which we still answer), so none
        of them is left unsettleable. Returns how many peers answered."""
        request = pb.HelloRequest(
            self=self._me.peer_info(),
            cluster=self._cfg.cluster,
            protocol_version=PROTOCOL_VERSION,
            draining=True,
            closing=True,
        )
        calls = [
            self._pool.submit(self._client.hello, peer.address, request, timeout_s)
            for peer in self.known_peers()
        ]
        done, _ = wait(calls, timeout_s + 1.0)
        return sum(1 for call in done if call.exception() is None)

    def close(self) -> None:
        """Stop the membership thread, the Hello threads and mDNS (idempotent)."""
        self._stop.set()
        self._meet.set()
        self.stop_advertising()
        if self._thread is not None:
            self._thread.join()
        self._pool.shutdown(wait=True)

    # --- what the sender and the receiver report (their threads) -------------------------------

    def succeeded(self, address: str) -> None:
        """A call to `address` went through."""
        self.peers.record_success(address)

    def failed(self, address: str, reason: str) -> None:
        """A call to `address` failed; suspend it after max_failures in a row."""
        if not self.peers.record_failure(address):
            return
        peer = self.peers.get(address)
        who = f"{peer.node_id} at {address}" if peer and peer.node_id else address
        self._counters.add(Count.PEERS_EVICTED)
        log.warning(
            "evicted peer %s after %d failed calls (%s); it returns if seen again",
            who,
            self._cfg.max_failures,
            reason,
        )

    def sender_seen(self, address: str, node_id: str) -> None:
        """A pushed message named its sender's address: add it if unknown. Never revives a
        sender that said it is draining (a finishing node's last pushes arrive after that)."""
        try:
            parse_address(address)
        except ValueError:
            return
        self.peers.observe(address, node_id, seen=False)

    # --- server threads ------------------------------------------------------------------------

    def hello(self, request: pb.HelloRequest, peer: str) -> pb.HelloReply:
        """Membership: learn the caller and the peers it knows; tell it ours."""
        if not self._ready.wait(self._cfg.rpc_timeout_s):
            raise Reject(Status.PRECONDITION, Why.STARTING, "node is starting")
        if request.cluster == self._cfg.cluster and request.protocol_version == PROTOCOL_VERSION:
            self._learn(request.self, request.peers, draining=request.draining)
            if not request.draining:
                self._meet_soon(request.self.address)
            if request.closing and request.self.address:
                # answered only once settled: the caller stops serving after our answer
                self.settle_pushes_to(request.self.address)
        return pb.HelloReply(
            self=self._me.peer_info(),
            cluster=self._cfg.cluster,
            protocol_version=PROTOCOL_VERSION,
            peers=self._peer_infos(),
            step=self._step(),
            has_state=self.has_state,
            accepting=self._accepting(),
        )

    # --- membership and Hello threads ----------------------------------------------------------

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

    def _learn(self, who: pb.PeerInfo, peers: Iterable[pb.PeerInfo], *, draining: bool) -> None:
        """A caller's Hello: the caller, seen just now, and the peers it lists."""
        try:
            parse_address(who.address)
        except ValueError:
            return
        self.peers.observe(who.address, who.node_id or None, draining=draining)
        self._hearsay(peers)

    def _hearsay(self, peers: Iterable[pb.PeerInfo]) -> None:
        """Peers another node lists: added when unknown, never revived by this alone."""
        for info in peers:
            try:
                parse_address(info.address)
            except ValueError:
                continue
            self.peers.observe(info.address, info.node_id or None, seen=False)

    def _hello_round(self, addresses: list[str]) -> dict[str, pb.HelloReply]:
        """Hello each address (in parallel); returns the replies of those in our cluster."""
        futures = {a: self._pool.submit(self.hello_peer, a) for a in addresses}
        replies: dict[str, pb.HelloReply] = {}
        for address, fut in futures.items():
            reply = fut.result()
            if reply is not None:
                replies[address] = reply
        return replies

    def is_joiner(self, address: str, node_id: str) -> bool:
        """Whether `address` answers Hello as `node_id`, a node of our cluster still joining
        (no state yet): what a donor asks of a FetchState caller (server threads)."""
        try:
            parse_address(address)
        except ValueError:
            return False
        if not node_id or node_id == self._cfg.node_id or address == self._me.address:
            return False
        request = pb.HelloRequest(
            self=self._me.peer_info(),
            cluster=self._cfg.cluster,
            protocol_version=PROTOCOL_VERSION,
            draining=self.draining,
        )
        try:
            reply = self._client.hello(address, request, self._cfg.rpc_timeout_s)
        except grpc.RpcError:
            return False
        return (
            reply.self.node_id == node_id
            and reply.cluster == self._cfg.cluster
            and reply.protocol_version == PROTOCOL_VERSION
            and not reply.has_state
        )

    def hello_peer(self, address: str) -> pb.HelloReply | None:
        """Call Hello on `address` and learn from the reply; None if it failed or is foreign."""
        request = pb.HelloRequest(
            self=self._me.peer_info(),
            cluster=self._cfg.cluster,
            protocol_version=PROTOCOL_VERSION,
            peers=self._peer_infos(),
            draining=self.draining,
        )
        try:
            reply = self._client.hello(address, request, self._cfg.rpc_timeout_s)
        except grpc.RpcError as err:
            if not self.peers.expire(address):  # heard of, never reached: forgotten at once
                self.failed(address, err.code().name)
            return None
        if reply.cluster != self._cfg.cluster or reply.protocol_version != PROTOCOL_VERSION:
            self._log_once(address, "foreign", f"{address} is in cluster {reply.cluster!r}")
            self.peers.remove(address)
            return None
        if reply.self.node_id == self._cfg.node_id:
            self.peers.remove(address)  # ourselves under another address
            return None
        # One row per node, under the address it advertises: a seed dialled by host name and
        # the same node found by mDNS or peer exchange must not count as two peers.
        canonical = address
        advertised = reply.self.address
        if advertised and advertised != address and advertised != self._me.address:
            try:
                parse_address(advertised)
            except ValueError:
                pass
            else:
                canonical = advertised
                self.peers.remove(address)
        draining = not reply.accepting
        # confirmed only where we called: an advertised address is confirmed by our next call
        # there, so a reply cannot move a node id to an address that never answered as it
        self.peers.observe(
            canonical,
            reply.self.node_id or None,
            confirmed=canonical == address,
            draining=draining,
        )
        self._hearsay(reply.peers)
        return reply

    def _loop(self) -> None:
        cfg = self._cfg
        interval = cfg.hello_interval_s
        while True:
            # a round every ~interval, or at once when a new peer shows up (_meet_soon)
            self._meet.wait(interval * self._rng.uniform(0.5, 1.5))
            self._meet.clear()
            if self._stop.is_set():
                return
            known = self.peers.all()
            # Everyone heard of but never called, plus a few at random to refresh liveness.
            fresh = [p.address for p in known if not p.confirmed]
            fresh = self._rng.sample(fresh, min(NEW_DIALS_PER_ROUND, len(fresh)))
            others = [p.address for p in known if p.confirmed]
            picks = fresh + self._rng.sample(others, min(2, len(others)))
            if picks:
                self._hello_round(picks)
            for address in self.peers.prune(cfg.forget_after_s):
                self._client.forget(address)
                log.info("forgot peer %s: not seen for %.0f s", address, cfg.forget_after_s)
            # live peers heard of but not met yet are worth a quick second round
            unmet = any(not p.confirmed and p.status == "live" for p in self.peers.all())
            interval = min(0.2, cfg.hello_interval_s) if unmet else cfg.hello_interval_s
