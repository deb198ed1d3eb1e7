"""What a node counts, and how it is shown: thread-safe counters, and a Prometheus endpoint.

Counters are bumped from any thread (training, sender, server); the Prometheus collector reads
them, and the node's gauges, only when scraped, so metrics cost the training loop nothing.
Names follow Prometheus conventions: a `gosgd_` prefix, base units, `_total` for counters.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gosgd_p2p.node import GossipNode

__all__ = ["Counters", "MetricsServer"]


class Counters:
    """Named monotonic counters; `add` from any thread, `snapshot` for a consistent copy.

    Durations are kept as two counters, NAME_seconds_sum and NAME_seconds_count (observe()).
    """

    def __init__(self) -> None:
        self._values: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, name: str, amount: float = 1) -> None:
        with self._lock:
            self._values[name] += amount  # type: ignore[assignment]

    def observe(self, name: str, seconds: float) -> None:
        """Record one duration of `name` (seconds)."""
        with self._lock:
            self._values[f"{name}_seconds_sum"] += seconds  # type: ignore[assignment]
            self._values[f"{name}_seconds_count"] += 1

    def get(self, name: str) -> Any:
        with self._lock:
            return self._values[name]

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._values)


#: Push outcomes reported as gosgd_pushes_total{outcome=...}.
PUSH_OUTCOMES = {
    "pushes_started": "started",
    "pushes_acked": "acked",
    "pushes_returned": "returned",
    "pushes_busy": "refused_busy",
    "pushes_lost_with_peer": "lost_with_peer",
    "pushes_resolved_committed": "resolved_committed",
    "pushes_resolved_aborted": "resolved_aborted",
    "pushes_no_peer": "skipped_no_peer",
    "pushes_skipped_busy": "skipped_buffers_busy",
}


class _Collector:
    """Turns a node's counters and gauges into metric families at scrape time."""

    def __init__(self, node: GossipNode, server: MetricsServer) -> None:
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
        yield gauge("gosgd_live_peers", "Peers a push may go to now.", len(node.peers.live()))
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
        for key, outcome in PUSH_OUTCOMES.items():
            pushes.add_metric([*me, outcome], counts.get(key, 0))
        yield pushes
        yield counter(
            "gosgd_messages_received",
            "Messages committed to the inbox.",
            counts.get("pushes_received", 0),
        )
        rejected = CounterMetricFamily(
            "gosgd_rejected", "Refused incoming calls by reason.", labels=[*labels, "reason"]
        )
        for key, value in counts.items():
            if key.startswith("rejected_"):
                rejected.add_metric([*me, key.removeprefix("rejected_")], value)
        yield rejected
        yield counter("gosgd_sent_bytes", "Payload bytes sent.", counts.get("bytes_sent", 0))
        yield counter(
            "gosgd_received_bytes", "Payload bytes received.", counts.get("bytes_received", 0)
        )
        yield counter(
            "gosgd_peers_evicted", "Peers suspended after failures.", counts.get("peers_evicted", 0)
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

    def __init__(self, node: GossipNode, port: int, host: str = "0.0.0.0") -> None:
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
