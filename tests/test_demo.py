"""gosgd-demo, the README's main job, end to end on a small budget."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

#: an acceptance run (real processes or training to a target): not in the fast tier
pytestmark = pytest.mark.slow


@pytest.mark.timeout(240)
def test_the_demo_runs_a_cluster_and_reports(tmp_path) -> None:
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "gosgd_p2p.demo", "--nodes", "3", "--steps", "300",
         "--model", "mlp", "--out", str(out)],
        capture_output=True, text=True, timeout=230,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["nodes"]) == 3
    assert all(n["test_accuracy"] >= 0.9 for n in summary["nodes"]), summary
    assert summary["consensus_accuracy"] >= 0.9
    assert math.isclose(summary["total_weight"], 3.0, abs_tol=1e-9)
    assert summary["messages"] > 0
    assert "consensus model" in result.stdout and "total weight" in result.stdout
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    # gosgd-status's survey, made by the demo while the finished nodes linger: every node
    # answered, and the total checked from outside is the founders' exactly
    status = json.loads((out / "status.json").read_text())
    assert sorted(n["node_id"] for n in status["nodes"]) == ["node-0", "node-1", "node-2"]
    assert {n["state"] for n in status["nodes"]} == {"finished"}
    assert status["check"] == "exact" and abs(status["held"] - 3.0) <= 1e-9
    assert "conservation: exact" in result.stdout
