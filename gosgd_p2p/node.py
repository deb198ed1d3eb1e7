"""GossipNode: GoSGD gossip around a user's PyTorch model (the Python API).

    node = GossipNode(model, NodeConfig(listen="0.0.0.0:7070", peers=["10.0.0.2:7070"]))
    for x, y in batches:
        loss_fn(model(x), y).backward(); optimizer.step(); optimizer.zero_grad()
        node.step()          # maybe push (x, part of a) to a random peer; merge what arrived
    node.finish()            # settle every in-flight message, then node.close()

The node is a facade over three parts, each owning its state and threads: the Sender (send
buffers, client, sender threads, in-flight pushes and their settling), the Receiver (receive
buffers, inbox, fate memory, donations; the gRPC server's threads enter there) and Membership
(peer table, Hello, mDNS, the membership thread). The caller's thread (the training thread)
alone reads and writes the model state x and the weight a: in step(), finish(), leave() and
the constructor. The parts meet it only through the inbox, the donation queue and the buffers
they hand over, so nothing merges during a local step and training never waits on the network.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import replace
from typing import Any

import torch

from gosgd_p2p import algorithm
from gosgd_p2p.algorithm import PushFate
from gosgd_p2p.budget import SendBudget
from gosgd_p2p.client import PeerClient
from gosgd_p2p.config import NodeConfig, parse_address, text_seed
from gosgd_p2p.discovery import advertise_host
from gosgd_p2p.identity import Identity
from gosgd_p2p.inbox import Inbox
from gosgd_p2p.local import LocalState
from gosgd_p2p.malloc import tune_malloc
from gosgd_p2p.membership import JoinError, Membership
from gosgd_p2p.metrics import Count, Counters, LogOnce, Partners
from gosgd_p2p.netproc import NetworkProcess, RemoteServer
from gosgd_p2p.peers import PeerTable
from gosgd_p2p.pushclient import make_client, network_process_wanted
from gosgd_p2p.receiver import Receiver
from gosgd_p2p.reporter import Reporter
from gosgd_p2p.security import Credentials, say_who_may_call
from gosgd_p2p.sender import Sender
from gosgd_p2p.server import GossipServer
from gosgd_p2p.state import StateLayout, module_state
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import ENCODINGS

__all__ = ["GossipNode", "JoinError"]

log = logging.getLogger(__name__)


class GossipNode:
    """One GoSGD node: a gRPC server, a sender, a receiver and membership around `model`.

    The constructor binds the server, contacts the seed peers (and listens for mDNS peers) and
    decides whether this node founds the cluster (weight `founder_weight`, its own initial
    state) or joins a running one (weight 0, then the state and half the weight of a random
    peer, fetched before it returns). A `member` (a node that was part of the cluster before,
    e.g. resumed from a checkpoint) never founds: it waits up to join_timeout_s for a running
    peer to join from, and raises JoinError after that. `client` replaces the PeerClient
    (fault injection). Create the model from the same seed on every founder
    (`gosgd_p2p.cluster_seed`), so founders start from the same point, as in the paper.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: NodeConfig | None = None,
        *,
        client: PeerClient | None = None,
        founder_weight: float = 1.0,
        member: bool = False,
        **overrides: Any,
    ) -> None:
        cfg = replace(config or NodeConfig(), **overrides)
        self.config = cfg
        if cfg.tune_malloc:
            tune_malloc()
        named = module_state(model)
        self.layout = StateLayout(named)
        self.counters = Counters()
        encoding = ENCODINGS[cfg.encoding]
        self.local = LocalState([t for _, t in named], self.layout, self.counters, encoding)
        self.device = self.local.device
        seed = cfg.seed if cfg.seed is not None else text_seed(f"gossip:{cfg.node_id}")
        self._rng = random.Random(seed)
        self.schedule = algorithm.PushSchedule(
            cfg.schedule, cfg.p, random.Random(seed + 2), rate=cfg.push_rate,
            reference=founder_weight,
        )  # fmt: skip
        #: Local steps taken (calls to step()).
        self.step_count = 0
        self._partners = Partners()
        self._finished = False  # finish() has begun
        self._settled = False  # finish() is done
        self._left = False  # leave() handed the weight over
        self._closed = False
        self._alone_logged = False

        pin = self.device.type == "cuda"
        credentials = Credentials.from_files(cfg.token_file, cfg.tls_cert, cfg.tls_key, cfg.tls_ca)
        by_default = cfg.network_process is None
        if by_default:
            cfg = replace(cfg, network_process=network_process_wanted(cfg, client, pin))
        client, send_pool = make_client(
            cfg, credentials, self.layout, client, pin=pin, by_default=by_default
        )
        if cfg.network_process and not isinstance(client, NetworkProcess):  # it did not start
            cfg = replace(cfg, network_process=False)
        self.config = cfg
        # No honest message carries more than the cluster's total weight (the founders', 1
        # each), however leaves and merges gather it on one node: max_weight caps a message.
        self._me = me = Identity(cfg.node_id, cfg.cluster, self.layout, cfg.max_weight, encoding)
        self._budget = SendBudget(cfg.max_send_mbps, me.nbytes)
        log_once = LogOnce(log)
        self.membership = Membership(
            cfg, me, client, self.counters, log_once,
            step=lambda: self.step_count, accepting=lambda: self.inbox.accepting, seed=seed + 1,
        )  # fmt: skip
        network = isinstance(client, NetworkProcess)  # it serves gRPC, into its receive slots
        self._network = client if isinstance(client, NetworkProcess) else None
        if self._network is not None:
            self.membership.discovery = self._network.discovery  # zeroconf runs there too
        self.receiver = Receiver(
            cfg, me, self.membership, self.counters, self._partners, log_once,
            numel=self.layout.numel, pin=pin, own_buffers=not network,
        )  # fmt: skip
        self.sender = Sender(
            cfg, me, client, send_pool, self.membership, self.inbox, self.counters,
            self._partners, log_once,
        )  # fmt: skip
        self.membership.settle_pushes_to = self.sender.settle_pushes_to
        self.reporter = Reporter(
            me, self.local, self.inbox, self.sender, self.membership.known_peers, self.counters,
            step=lambda: self.step_count, state=self._life,
        )  # fmt: skip
        listen_host, _ = parse_address(cfg.listen)

        def serve_here(listen: str) -> GossipServer:
            return GossipServer(
                self.receiver, self.membership, listen, cfg.server_workers, credentials,
                cfg.receive_timeout_s, insecure=cfg.insecure, reporting=self.reporter,
            )  # fmt: skip

        try:
            self._server: GossipServer | RemoteServer
            if isinstance(client, NetworkProcess):
                self._server = client.serve(
                    self.receiver, self.membership, self.reporter, listen_host, serve_here
                )
            else:
                self._server = serve_here(cfg.listen)
        except BaseException:
            self.membership.close()
            self.sender.close()  # a send process among others
            raise
        try:
            say_who_may_call(self._server.loopback_only, credentials, cfg.listen)
            me.address = cfg.advertise or (
                f"{advertise_host(listen_host, cfg.mdns_interface)}:{self._server.port}"
            )
            self.membership.open(listen_host)
            # founder or joiner: join when a peer is already training
            donors = self.membership.survey()
            if member and not donors:  # a founder again would add a founder's weight
                donors = self.membership.wait_for_donors(cfg.join_timeout_s)
            #: True when this node joined a running cluster, False when it founded one.
            self.joined = bool(donors)
            if donors:
                self._join(donors)
            else:
                # founders start with a = 1 (only ratios matter), or a checkpoint's weight,
                # on the weight grid so that every later sum is exact
                self.local.weight = algorithm.to_grid(
                    algorithm.check_weight(founder_weight, positive=True)
                )
                self.reporter.founded_weight = self.local.weight
            self.membership.has_state = True
            self.inbox.open()
            self._server.set_serving(True)
        except BaseException:
            self._shutdown_parts()
            raise
        self.membership.start()
        log.info(
            "node %s listening on %s (%s, %d known peers)",
            cfg.node_id, self.address, "joined" if donors else "founder", len(self.peers.all()),
        )  # fmt: skip

    # --- the training thread's API -----------------------------------------------------------

    def step(self, push_to: str | None = None) -> None:
        """Call once per local step, after optimizer.step(), from the training thread.

        When the push schedule says so (config.schedule: a coin per step, a clock in seconds),
        splits off part of the weight and hands a snapshot to a random live peer (sent in the
        background); then merges every message waiting in the inbox. Never waits on the
        network. `push_to` (an address) replaces the schedule and the draw with that one push
        of half the weight: a fixed message schedule, e.g. to replay a `gosgd-sim` run.
        """
        self._check_open()
        self.step_count += 1
        self.local.staging.poll()
        if self._network is not None:
            self._network.take_commits()  # merged below, in this step
        self.receiver.serve_donations(self.local.split_into, self.step_count)
        now = time.monotonic()
        if push_to is not None:
            self._push(push_to)
        else:
            fraction = self.schedule.fraction(self.step_count, self.weight, now)
            if fraction and not self._push_random(fraction):
                self.schedule.missed()  # the clock's ring stays owed to the next step
        messages = self.inbox.drain()
        for msg in messages:
            if not msg.returned:
                self.schedule.observe(msg.sender_id, msg.sender_step, msg.weight, now)
        self.local.merge(messages)

    def finish(self) -> float:
        """Stop gossiping and settle: returns the final weight (training thread).

        Stops accepting pushes (senders take theirs back), waits until every push of ours is
        settled (up to drain_timeout_s; then it logs what is still unsettled and writes it
        off), and merges the inbox. Once every node of a cluster has finished, their final
        weights sum exactly to what the founders started with.
        """
        self._check_open()
        if not self._finished:
            self._finished = True
            self.membership.draining = True
            self.inbox.close()
            self._server.set_serving(False)
            self.membership.stop_advertising()
            self.receiver.refuse_donations()
            self.sender.settle(self.config.drain_timeout_s)
        self.local.merge(self.inbox.drain())
        self.local.staging.flush()
        self._settled = True
        return self.weight

    def leave(self) -> float:
        """Finish, then hand the whole weight and state to a live peer (graceful leave).

        Returns the weight handed over; 0.0 if no peer took it (the weight then leaves with
        this node, and the log says so).
        """
        self.finish()
        if self.weight == 0.0:
            return 0.0
        buf = self.sender.acquire()
        if buf is None:  # impossible after finish(): every push is settled
            raise RuntimeError("no send buffer free after draining")
        self.local.snapshot(buf)()  # leaving: waiting for the copy is fine
        candidates = [p.address for p in self.peers.pushable()]
        self._rng.shuffle(candidates)
        outcome = self.sender.hand_over(candidates, self.weight, self.step_count, buf)
        if outcome is None:
            log.warning(
                "leave: no live peer took our state; weight %.6g leaves with us", self.weight
            )
            return 0.0
        self.local.weight = 0.0
        self._left = True
        if outcome.fate is PushFate.WRITTEN_OFF:
            log.warning("leave: the receiver vanished with our weight %.6g", outcome.weight)
            return 0.0
        log.info("left: handed weight %.6g to %s", outcome.weight, outcome.receiver_id or "a peer")
        return outcome.weight

    def note_loss(self, loss: float | torch.Tensor) -> None:
        """Record the training loss of a recent step, for Status (gosgd-status); cheap.

        A tensor is kept as it is and read only when someone asks, so reporting a loss every
        step costs no device sync.
        """
        self.reporter.loss = loss.detach() if isinstance(loss, torch.Tensor) else float(loss)

    def close(self, grace: float = 2.0) -> None:
        """Stop the server and every thread. Call finish() or leave() first to keep the weight.

        After finish() it first tells every known peer that it is closing (a Hello), and each
        answers once it has settled its pushes to this node by ResolvePush, which only this node
        can answer. Then the server lingers (up to linger_s) until no push or ResolvePush has
        come for quiet_s: meanwhile it refuses pushes, which tells senders it left, and answers
        any ResolvePush still coming.
        """
        if self._closed:
            return
        self._closed = True
        self.receiver.refuse_donations()
        if self._finished:
            self.membership.farewell(2 * self.config.rpc_timeout_s)
            deadline = time.monotonic() + self.config.linger_s
            while (now := time.monotonic()) < deadline:
                quiet_left = self.receiver.last_settling_call + self.config.quiet_s - now
                if quiet_left <= 0:
                    break
                time.sleep(min(quiet_left, deadline - now))
        self._shutdown_parts(grace)
        self.local.staging.flush()

    def __enter__(self) -> GossipNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- what the node shows -------------------------------------------------------------------

    @property
    def address(self) -> str:
        """Address peers use to reach this node."""
        return self._me.address

    @property
    def inbox(self) -> Inbox:
        """Messages waiting for the training thread to merge them."""
        return self.receiver.inbox

    def wait_for_peers(self, count: int, timeout_s: float) -> bool:
        """Before the first step: block until this node has met `count` live peers, each of
        which has met as many, or a peer has begun training (nodes started together then
        start training together); False after `timeout_s`."""
        return self.membership.wait_together(count, timeout_s)

    @property
    def peers(self) -> PeerTable:
        """The peer table."""
        return self.membership.peers

    @property
    def weight(self) -> float:
        """The GoSGD weight a of this node (float64; the training thread's)."""
        return self.local.weight

    @property
    def last_distance(self) -> float | None:
        """||x_s - x|| of the most recent received message, before it was merged."""
        return self.local.last_distance

    @property
    def in_flight(self) -> int:
        """Pushes handed to the sender and not yet acked, returned or written off."""
        return self.sender.in_flight

    @property
    def state(self) -> list[torch.Tensor]:
        """The gossiped tensors (aliases of the model's own), in layout order."""
        return list(self.local.tensors)

    @property
    def send_process_pid(self) -> int | None:
        """The process id of the child that makes this node's pushes (send_process), while it
        runs; None without one, or once it is gone (pushes then go from this process)."""
        return self.sender.send_process_pid

    @property
    def network_process_pid(self) -> int | None:
        """The process id of the child that serves this node's gRPC and makes its pushes
        (network_process), while it runs; None without one, or once it is gone."""
        client = self.sender.client
        return client.pid if isinstance(client, NetworkProcess) and client.alive else None

    def partners(self) -> list[str]:
        """Ids of the nodes this node has pushed to or received from (at most 1024 kept)."""
        return self._partners.sorted()

    def stats(self) -> dict[str, Any]:
        """Counters and gauges for logs: messages and bytes sent/received/returned, peers."""
        out: dict[str, Any] = dict(self.counters.snapshot())
        out.update(
            weight=self.weight,
            step=self.step_count,
            live_peers=len(self.peers.pushable()),
            inbox=len(self.inbox),
            last_distance=self.last_distance,
            partners=self.partners(),
            send_process=self.send_process_pid,
        )
        return out

    def _life(self) -> int:
        """Where the node is in its life, as Status says it (any thread)."""
        if self._left:
            return pb.NODE_STATE_LEFT
        if self._settled:
            return pb.NODE_STATE_FINISHED
        if self._finished:
            return pb.NODE_STATE_DRAINING
        return pb.NODE_STATE_TRAINING if self.membership.has_state else pb.NODE_STATE_STARTING

    # --- training thread internals -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("node is closed")

    def _push_random(self, fraction: float) -> bool:
        """Push `fraction` of the weight to a random live peer; False if no push went out."""
        if not algorithm.can_split(self.weight):
            return False
        peer = self.peers.choose(self._rng)
        if peer is None:
            if not self._alone_logged:
                log.warning("no live peer: training alone until one appears")
                self._alone_logged = True
            self.counters.add(Count.PUSHES_NO_PEER)
            return False
        self._alone_logged = False
        return self._push(peer.address, fraction)

    def _push(self, address: str, fraction: float = 0.5) -> bool:
        """Split off `fraction` of the weight and send (snapshot, that part) to `address` in
        the background; False if it could not (every send buffer busy, over the send budget,
        no weight)."""
        buf = self.sender.acquire()
        if buf is None:
            self.counters.add(Count.PUSHES_SKIPPED_BUSY)  # every snapshot buffer in flight
            return False
        if not self._budget.allows(self._me.nbytes):  # asked before the weight is split
            self.sender.release(buf)
            self.counters.add(Count.PUSHES_SKIPPED_BUDGET)
            return False
        share = self.local.split_into(buf, fraction)
        if share is None:
            self.sender.release(buf)  # no weight to share
            return False
        self._budget.spend(self._me.nbytes)
        sent, ready = share
        self.sender.send(address, sent, self.step_count, buf, ready)
        return True

    def _join(self, donors: list[str]) -> None:
        """Take the state and half the weight of one of `donors` (constructor only)."""
        self._rng.shuffle(donors)
        if not self.receiver.fetch(self.sender.client, donors, self.local.take):
            raise JoinError(
                f"could not join: none of {len(donors)} running peer(s) donated a state; "
                "check that every node runs the same model and cluster name"
            )

    def _shutdown_parts(self, grace: float = 2.0) -> None:
        self.sender.give_up()  # a push still being settled is written off, not waited for
        self.membership.close()
        self._server.stop(grace)
        self.sender.close()
