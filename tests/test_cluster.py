"""Four nodes in one process over real gRPC on 127.0.0.1, through the built-in trainer."""

from __future__ import annotations

import math
import threading
from typing import Any

import pytest

from gosgd_p2p.config import NodeConfig, TrainConfig
from gosgd_p2p.node import GossipNode
from gosgd_p2p.trainer import train

#: an acceptance run (real processes or training to a target): not in the fast tier
pytestmark = pytest.mark.slow


def test_four_nodes_in_process_reach_accuracy_and_keep_total_weight(tmp_path) -> None:
    n = 4
    results: dict[str, dict[str, Any]] = {}
    errors: list[BaseException] = []
    first_address: list[str] = []
    first_ready = threading.Event()

    def run(i: int, peers: list[str]) -> None:
        def ready(node: GossipNode) -> None:
            if i == 0:
                first_address.append(node.address)
                first_ready.set()

        node_cfg = NodeConfig(
            node_id=f"n{i}", cluster="test-cluster", p=0.1, peers=peers, mdns=False
        )
        cfg = TrainConfig(
            model="cnn",
            dataset="digits",
            steps=500,
            eval_every=0,
            wait_for_peers=n - 1,
            log_json=str(tmp_path / f"n{i}.jsonl"),
        )
        try:
            results[node_cfg.node_id] = train(node_cfg, cfg, on_ready=ready)
        except BaseException as err:  # surfaced in the main thread below
            errors.append(err)
            first_ready.set()

    threads = [threading.Thread(target=run, args=(0, []), name="node-0")]
    threads[0].start()
    assert first_ready.wait(60) and first_address, errors
    for i in range(1, n):
        threads.append(threading.Thread(target=run, args=(i, first_address), name=f"node-{i}"))
        threads[-1].start()
    for t in threads:
        t.join(300)
        assert not t.is_alive(), "a node did not finish"
    assert not errors, errors

    assert len(results) == n
    for node_id, rec in results.items():
        assert rec["test_accuracy"] >= 0.95, (node_id, rec)
        assert rec["messages_sent"] > 0 and rec["messages_received"] > 0, (node_id, rec)
    # all finished: nothing in flight, so the weights sum to the founders' total
    assert math.isclose(sum(r["weight"] for r in results.values()), n, rel_tol=0, abs_tol=1e-9)
