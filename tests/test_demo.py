"""gosgd-demo, the README's main job, end to end on a small budget."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest


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
