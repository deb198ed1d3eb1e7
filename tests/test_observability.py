"""Metrics, health and plots, read by the real clients people use."""

from __future__ import annotations

import math
import subprocess
import sys
import urllib.request

import pytest
import torch
from conftest import wait_until
from prometheus_client.parser import text_string_to_metric_families

from gosgd_p2p import GossipNode, NodeConfig
from gosgd_p2p.metrics import MetricsServer
from gosgd_p2p.plotting import main as plot_main

pytestmark = pytest.mark.nodes


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "node_id"))
            out[(sample.name, labels)] = sample.value
    return out


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def cfg(node_id: str, **kw) -> NodeConfig:
    return NodeConfig(node_id=node_id, cluster="obs", mdns=False, hello_interval_s=0.2, **kw)


def test_metrics_follow_the_node_as_it_trains() -> None:
    # the per-step coin at p = 1: a push at every step, whatever the steps' timing
    a = GossipNode(model(), cfg("a", p=1.0, schedule="step"))
    b = GossipNode(model(), cfg("b", p=1.0, schedule="step", peers=[a.address]))
    metrics = MetricsServer(a, 0, "127.0.0.1")
    try:
        # pushes go only to peers a node has reached itself: wait until each has reached the other
        wait_until(lambda: a.peers.pushable() and b.peers.pushable(), 10, "peers")
        before = scrape(metrics.port)
        assert before[("gosgd_steps_total", ())] == 0
        assert before[("gosgd_weight", ())] == 1.0
        for _ in range(10):
            a.step()
            b.step()
            wait_until(lambda: a.in_flight == 0 and b.in_flight == 0, 30, "pushes")
        metrics.loss, metrics.accuracy = 0.25, 0.97
        after = scrape(metrics.port)
        assert after[("gosgd_steps_total", ())] == 10
        assert after[("gosgd_pushes_total", (("outcome", "acked"),))] >= 9
        assert after[("gosgd_messages_received_total", ())] >= 9
        assert after[("gosgd_sent_bytes_total", ())] > 0
        assert after[("gosgd_received_bytes_total", ())] > 0
        assert after[("gosgd_live_peers", ())] == 1
        assert after[("gosgd_merge_seconds_count", ())] >= 9
        assert after[("gosgd_snapshot_seconds_count", ())] == 10
        assert after[("gosgd_snapshot_seconds_sum", ())] > 0
        assert math.isfinite(after[("gosgd_merge_distance", ())])
        assert after[("gosgd_train_loss", ())] == 0.25
        assert after[("gosgd_test_accuracy", ())] == 0.97
        assert after[("gosgd_weight", ())] == a.weight != 1.0
    finally:
        metrics.close()
        a.close()
        b.close()


def test_rejections_are_counted_by_reason() -> None:
    a = GossipNode(model(), cfg("a", p=0.0))
    intruder = GossipNode(
        torch.nn.Linear(8, 3), cfg("x", p=1.0, peers=[a.address], max_failures=100)
    )
    metrics = MetricsServer(a, 0, "127.0.0.1")
    try:
        for _ in range(3):
            intruder.step()
            wait_until(lambda: intruder.in_flight == 0, 30, "the push to bounce")
        after = scrape(metrics.port)
        assert after[("gosgd_rejected_total", (("reason", "fingerprint"),))] == 3
    finally:
        metrics.close()
        a.close()
        intruder.close()


def test_gosgd_health_reports_serving_then_not_serving() -> None:
    a = GossipNode(model(), cfg("a", p=0.0))
    with a:
        run = [sys.executable, "-m", "gosgd_p2p.health", "--address", a.address]
        serving = subprocess.run(run, capture_output=True, text=True, timeout=60)
        assert serving.returncode == 0 and "SERVING" in serving.stdout
        a.finish()
        draining = subprocess.run(run, capture_output=True, text=True, timeout=60)
        assert draining.returncode == 1 and "NOT_SERVING" in draining.stdout


def test_gosgd_plot_draws_every_log(tmp_path) -> None:
    logs = []
    for node in ("n0", "n1"):
        path = tmp_path / f"{node}.jsonl"
        lines = [
            f'{{"node_id": "{node}", "time": {t}, "loss": {1 / (t + 1)}, '
            f'"test_accuracy": {0.5 + t / 20}, "weight": 1.0}}'
            for t in range(10)
        ]
        path.write_text("\n".join(lines) + "\n{not json")  # a line being written
        logs.append(str(path))
    out = tmp_path / "plot.png"
    assert plot_main([*logs, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    assert plot_main([str(tmp_path / "missing.jsonl")]) == 2


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_daemon_serves_metrics_and_a_progress_line(tmp_path, node_processes) -> None:
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = node_processes(
        "m", "--no-mdns", "--model", "mlp", "--steps", "400", "--eval-every", "100",
        "--metrics-port", str(port), "--progress",
    )  # fmt: skip
    wait_until(lambda: any(r["step"] >= 100 for r in node.records()), 60, "training")
    first = scrape(port)[("gosgd_steps_total", ())]
    wait_until(lambda: scrape(port)[("gosgd_steps_total", ())] > first, 60, "more steps")
    assert scrape(port)[("gosgd_test_accuracy", ())] > 0
    assert node.wait(60) == 0
    assert "\x1b[2Km  step " in node.stderr()  # the live status line
