"""What a node counts, and how it is shown: counters, partners, log-once, a Prometheus endpoint.

Counters are bumped from any thread (training, sender, server); the Prometheus collector reads
them, and the node's gauges, only when scraped, so metrics cost the training loop nothing.
Names follow Prometheus conventions: a `gosgd_` prefix, base units, `_total` for counters.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator, Sized
from enum import Enum
from typing import Any, Protocol

from gosgd_p2p.config import NodeConfig
from gosgd_p2p.peers import Peer
from gosgd_p2p.reject import Why

__all__ = ["Count", "Counters", "LogOnce", "MetricsServer", "NodeView", "Partners"]


class Count(str, Enum):
    """The names of a node's counters (keys of `stats()`)."""

    PUSHES_STARTED = "pushes_started"  # weight halved and handed to the sender
    PUSHES_ACKED = "pushes_acked"
    PUSHES_RETURNED = "pushes_returned"  # certainly not delivered: merged back
    PUSHES_LOST_WITH_PEER = "pushes_lost_with_peer"  # written off with a vanished receiver
    WEIGHT_WRITTEN_OFF = "weight_written_off"  # the weight those pushes carried, summed
    PUSHES_RESOLVED_COMMITTED = "pushes_resolved_committed"  # a lost ack, settled: it arrived
    PUSHES_RESOLVED_ABORTED = "pushes_resolved_aborted"  # a lost ack, settled: it did not
    PUSHES_RESOLVED_UNKNOWN = "pushes_resolved_unknown"  # ... the receiver could not tell
    PUSHES_BUSY = "pushes_busy"  # the receiver's inbox was full
    PUSHES_NO_PEER = "pushes_no_peer"  # the coin said push, but no peer was live
    PUSHES_SKIPPED_BUSY = "pushes_skipped_busy"  # every send buffer was still in flight
    PUSHES_SKIPPED_BUDGET = "pushes_skipped_budget"  # over max_send_mbps: skipped, not halved
    PUSHES_RECEIVED = "pushes_received"  # committed to our inbox
    PUSHES_DUPLICATE = "pushes_duplicate"  # a redelivery, acked and applied once
    RESOLVED_COMMITTED = "resolved_committed"  # a sender's ResolvePush, answered COMMITTED
    RESOLVED_ABORTED = "resolved_aborted"  # ... answered ABORTED
    RESOLVED_UNKNOWN = "resolved_unknown"  # ... answered UNKNOWN (the sender writes it off)
    MERGED_RECEIVED = "merged_received"
    MERGED_RETURNED = "merged_returned"
    DONATIONS = "donations"  # states given to joiners
    DONATIONS_RETURNED = "donations_returned"  # donations whose stream failed: merged back
    BYTES_SENT = "bytes_sent"  # payload bytes of acked pushes and donations
    BYTES_RECEIVED = "bytes_received"  # payload bytes of committed pushes and of the join
    PEERS_EVICTED = "peers_evicted"
    SNAPSHOT = "snapshot"  # a duration: snapshot_seconds_sum and _count
    MERGE = "merge"  # a duration: merge_seconds_sum and _count


class Counters:
    """Named monotonic counters; `add` from any thread, `snapshot` for a consistent copy.

    Durations are kept as two counters, NAME_seconds_sum and NAME_seconds_count (observe()).
    Refused calls are counted as rejected_REASON (reject()).
    """

    def __init__(self) -> None:
        self._values: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, name: Count, amount: float = 1) -> None:
        self._bump(name.value, amount)

    def reject(self, why: Why) -> None:
        """Count one refused call."""
        self._bump(f"rejected_{why.value}", 1)

    def observe(self, name: Count, seconds: float) -> None:
        """Record one duration of `name` (seconds)."""
        with self._lock:
            self._values[f"{name.value}_seconds_sum"] += seconds  # type: ignore[assignment]
            self._values[f"{name.value}_seconds_count"] += 1

    def _bump(self, key: str, amount: float) -> None:
        with self._lock:
            self._values[key] += amount  # type: ignore[assignment]

    def get(self, name: str) -> Any:
        with self._lock:
            return self._values[name]

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._values)


class LogOnce:
    """Logs a message to `logger` at INFO once per (peer, reason), then at DEBUG; thread-safe and
    bounded, so a misbehaving peer cannot fill the log or the memory."""

    def __init__(self, logger: logging.Logger, limit: int = 1024) -> None:
        self._log = logger
        self._seen: set[tuple[str, str]] = set()
        self._limit = limit
        self._lock = threading.Lock()

    def __call__(self, peer: str, reason: str, message: str) -> None:
        key = (peer, reason)
        with self._lock:
            first = key not in self._seen and len(self._seen) < self._limit
            if first:
                self._seen.add(key)
        self._log.log(logging.INFO if first else logging.DEBUG, message)


class Partners:
    """Ids of the nodes this node has pushed to or received from (at most `limit` kept)."""

    def __init__(self, limit: int = 1024) -> None:
        self._ids: set[str] = set()
        self._limit = limit
        self._lock = threading.Lock()

    def add(self, node_id: str) -> None:
        with self._lock:
            if len(self._ids) < self._limit:
                self._ids.add(node_id)

    def sorted(self) -> list[str]:
        with self._lock:
            return sorted(self._ids)


class _PeerView(Protocol):
    def pushable(self) -> list[Peer]: ...


class NodeView(Protocol):
    """What the Prometheus collector reads from a node (a GossipNode), only when scraped."""

    @property
    def config(self) -> NodeConfig: ...
    @property
    def counters(self) -> Counters: ...
    @property
    def step_count(self) -> int: ...
    @property
    def weight(self) -> float: ...
    @property
    def peers(self) -> _PeerView: ...
    @property
    def inbox(self) -> Sized: ...
    @property
    def last_distance(self) -> float | None: ...


#: Push outcomes reported as gosgd_pushes_total{outcome=...}.
PUSH_OUTCOMES = {
    Count.PUSHES_STARTED: "started",
    Count.PUSHES_ACKED: "acked",
    Count.PUSHES_RETURNED: "returned",
    Count.PUSHES_BUSY: "refused_busy",
    Count.PUSHES_LOST_WITH_PEER: "lost_with_peer",
    Count.PUSHES_RESOLVED_COMMITTED: "resolved_committed",
    Count.PUSHES_RESOLVED_ABORTED: "resolved_aborted",
    Count.PUSHES_RESOLVED_UNKNOWN: "resolved_unknown",
    Count.PUSHES_NO_PEER: "skipped_no_peer",
    Count.PUSHES_SKIPPED_BUSY: "skipped_buffers_busy",
    Count.PUSHES_SKIPPED_BUDGET: "skipped_budget",
}


class _Collector:
    """Turns a node's counters and gauges into metric families at scrape time."""

    def __init__(self, node: NodeView, server: MetricsServer) -> None:
        self._node = node
        self._server = server

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            SummaryMetricFamily,
        )

        node, counts = self._node, self._node.counters.snapshot()
        labels = ["node_id"]
        me = [node.config.node_id]

        def counter(name: str, doc: str, value: float) -> Any:
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric(me, value)
            return family

        def gauge(name: str, doc: str, value: float | None) -> Any:
            family = GaugeMetricFamily(name, doc, labels=labels)
            if value is not None:
                family.add_metric(me, value)
            return family

        yield counter("gosgd_steps", "Local optimizer steps taken.", node.step_count)
        yield gauge("gosgd_weight", "GoSGD weight a of this node.", node.weight)
        yield gauge("gosgd_live_peers", "Peers a push may go to now.", len(node.peers.pushable()))
        yield gauge("gosgd_inbox_messages", "Messages waiting to be merged.", len(node.inbox))
        yield gauge(
            "gosgd_merge_distance",
            "||x_s - x|| of the most recent merged message.",
            node.last_distance,
        )
        yield gauge(
            "gosgd_train_loss", "Mean training loss since the last report.", self._server.loss
        )
        yield gauge(
            "gosgd_test_accuracy", "Test accuracy at the last evaluation.", self._server.accuracy
        )
        pushes = CounterMetricFamily(
            "gosgd_pushes", "Pushes of this node by outcome.", labels=[*labels, "outcome"]
        )
        for count, outcome in PUSH_OUTCOMES.items():
            pushes.add_metric([*me, outcome], counts.get(count.value, 0))
        yield pushes
        yield counter(
            "gosgd_messages_received",
            "Messages committed to the inbox.",
            counts.get(Count.PUSHES_RECEIVED.value, 0),
        )
        rejected = CounterMetricFamily(
            "gosgd_rejected", "Refused incoming calls by reason.", labels=[*labels, "reason"]
        )
        for key, value in counts.items():
            if key.startswith("rejected_"):
                rejected.add_metric([*me, key.removeprefix("rejected_")], value)
        yield rejected
        yield counter(
            "gosgd_sent_bytes", "Payload bytes sent.", counts.get(Count.BYTES_SENT.value, 0)
        )
        yield counter(
            "gosgd_received_bytes",
            "Payload bytes received.",
            counts.get(Count.BYTES_RECEIVED.value, 0),
        )
        yield counter(
            "gosgd_weight_written_off",
            "Weight of pushes written off with a receiver that vanished.",
            counts.get(Count.WEIGHT_WRITTEN_OFF.value, 0.0),
        )
        yield counter(
            "gosgd_peers_evicted",
            "Peers suspended after failures.",
            counts.get(Count.PEERS_EVICTED.value, 0),
        )
        for name, doc in (
            ("merge", "Time the training thread spent merging messages."),
            ("snapshot", "Time the training thread spent snapshotting its state."),
        ):
            summary = SummaryMetricFamily(f"gosgd_{name}_seconds", doc, labels=labels)
            summary.add_metric(
                me,
                count_value=counts.get(f"{name}_seconds_count", 0),
                sum_value=counts.get(f"{name}_seconds_sum", 0.0),
            )
            yield summary


class MetricsServer:
    """Serves http://host:port/metrics for one node (port 0: any free port, see `.port`)."""

    def __init__(self, node: NodeView, port: int, host: str = "0.0.0.0") -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        #: Latest training loss and test accuracy, set by the trainer (None until known).
        self.loss: float | None = None
        self.accuracy: float | None = None
        registry = CollectorRegistry()
        registry.register(_Collector(node, self))  # type: ignore[arg-type]
        self._http, self._thread = start_http_server(port, host, registry=registry)
        self.port: int = self._http.server_port

    def close(self) -> None:
        """Stop serving."""
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(5)
