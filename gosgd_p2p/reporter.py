"""What a node tells an operator who asks (the Status RPC, read by gosgd-status).

The Reporter reads the parts' counters and gauges when asked, on a gRPC server thread, and
changes nothing. The weight a node holds is read in the order inbox, a, in flight: a merge
(inbox to a) or a push (a to the sender) during the read is then counted twice rather than
missed, so one node's figures bound its weight from above while it trains.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from gosgd_p2p.identity import Identity
from gosgd_p2p.inbox import Inbox
from gosgd_p2p.local import LocalState
from gosgd_p2p.metrics import Count, Counters
from gosgd_p2p.peers import Peer
from gosgd_p2p.sender import Sender
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import PROTOCOL_VERSION

__all__ = ["Reporter", "StepRate"]


class StepRate:
    """Steps per second over the last `window_s` seconds, from samples taken when asked.

    The first ask (or one after a long silence) gives the mean since `started`. Thread-safe.
    """

    def __init__(self, started: float, window_s: float = 30.0, min_span_s: float = 1.0) -> None:
        self._started = started
        self._window_s = window_s
        self._min_span_s = min_span_s
        self._samples: deque[tuple[float, int]] = deque(maxlen=64)
        self._lock = threading.Lock()

    def __call__(self, step: int, now: float) -> float:
        with self._lock:
            while self._samples and now - self._samples[0][0] > self._window_s:
                self._samples.popleft()
            base = next(
                (s for s in self._samples if now - s[0] >= self._min_span_s),
                (self._started, 0),
            )
            self._samples.append((now, step))
        span = now - base[0]
        return (step - base[1]) / span if span > 0 else 0.0


class Reporter:
    """Answers Status for one node from its parts; `peers()` lists its peer table, `state()`
    gives its NodeState value.

    The node sets `founded_weight` once it has founded and `loss` whenever its trainer reports
    one (a float, or a 0-d tensor read only when asked, so reporting costs no device sync).
    """

    def __init__(
        self,
        me: Identity,
        local: LocalState,
        inbox: Inbox,
        sender: Sender,
        peers: Callable[[], list[Peer]],
        counters: Counters,
        step: Callable[[], int],
        state: Callable[[], int],
    ) -> None:
        self._me = me
        self._local = local
        self._inbox = inbox
        self._sender = sender
        self._peers = peers
        self._counters = counters
        self._step = step
        self._state = state
        self._started = time.monotonic()
        self._rate = StepRate(self._started)
        #: The weight this node founded with; 0.0 for a node that joined.
        self.founded_weight = 0.0
        #: The trainer's last reported loss (float or 0-d tensor), or None.
        self.loss: Any = None

    def status(self, request: pb.StatusRequest, peer: str) -> pb.StatusReply:
        """The Status reply (gRPC server threads)."""
        now = time.monotonic()
        inbox_weight = self._inbox.weight()  # this order: see the module docstring
        weight = self._local.weight
        in_flight = self._sender.in_flight
        in_flight_weight = self._sender.in_flight_weight
        step = self._step()
        counters = self._counters.snapshot()
        reply = pb.StatusReply(
            node_id=self._me.node_id,
            address=self._me.address,
            cluster=self._me.cluster,
            protocol_version=PROTOCOL_VERSION,
            state=self._state(),  # type: ignore[arg-type]
            step=step,
            steps_per_second=self._rate(step, now),
            uptime_seconds=now - self._started,
            weight=weight,
            inbox_weight=inbox_weight,
            in_flight_weight=in_flight_weight,
            in_flight_pushes=in_flight,
            weight_written_off=counters.get(Count.WEIGHT_WRITTEN_OFF.value, 0.0),
            founded_weight=self.founded_weight,
            messages_sent=int(counters.get(Count.PUSHES_ACKED.value, 0)),
            messages_received=int(counters.get(Count.PUSHES_RECEIVED.value, 0)),
            messages_returned=int(counters.get(Count.PUSHES_RETURNED.value, 0)),
            peers=[
                pb.PeerStatus(
                    node_id=p.node_id or "",
                    address=p.address,
                    status=p.status,
                    last_seen_seconds=max(0.0, now - p.last_seen),
                )
                for p in self._peers()
            ],
        )
        loss = self.loss
        if loss is not None:
            reply.last_loss = float(loss)
        return reply
