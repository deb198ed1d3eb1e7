"""`python -m bench.time_to_accuracy` end to end on a tiny budget: three systems in a private
network namespace, bytes counted on its loopback, the gossip weights exact at the end."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gosgd_p2p.data import load_dataset

#: an acceptance run (real processes or training to a target): not in the fast tier
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]  # where `python -m bench.<name>` runs
MAX_STEPS = 60


def _unshare_unavailable() -> str | None:
    """None when this process may create network namespaces, else why not (a skip reason)."""
    if os.geteuid() != 0:
        return "unshare --net needs root"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare (util-linux) or ip (iproute2) is not installed"
    probe = subprocess.run(
        ["unshare", "--net", "--mount", "true"], capture_output=True, text=True, timeout=30
    )
    if probe.returncode != 0:
        return f"unshare --net --mount is not permitted here: {probe.stderr.strip()}"
    return None


def _bench(tmp_path: Path, *flags: str) -> tuple[dict[str, Any], str]:
    out = tmp_path / "tta.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.time_to_accuracy", "--max-steps", str(MAX_STEPS),
         "--target", "0.5", "--eval-every", "10", "--timeout-s", "60", "--json", str(out), *flags],
        capture_output=True, text=True, timeout=170, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(out.read_text()), result.stdout


@pytest.mark.timeout(180)
def test_three_systems_reach_the_target_and_bytes_are_counted_on_a_private_loopback(
    tmp_path: Path,
) -> None:
    why = _unshare_unavailable()
    if why:
        pytest.skip(why)
    report, stdout = _bench(tmp_path)
    systems = {row["system"]: row for row in report["systems"]}
    assert list(systems) == ["gossip", "ddp", "sgd"]
    assert "private network namespace" in report["bytes_counted"]
    gossip, ddp, sgd = systems["gossip"], systems["ddp"], systems["sgd"]

    for row in systems.values():
        assert not row["errors"], row["errors"]
        assert row["reached"], row  # 0.5 takes an mlp about 10-20 steps on digits
        assert 0 < row["steps_to_target"] <= MAX_STEPS
        assert row["steps_done"] and all(0 < s <= MAX_STEPS for s in row["steps_done"])
        assert row["best_accuracy"] >= 0.5 and row["final_accuracy"] > 0
        assert all(pt["step"] % 10 == 0 for pt in row["curve"])  # every --eval-every steps
        counts = [pt["bytes"] for pt in row["curve"]]
        assert counts == sorted(counts)  # read from one monotonic counter
        assert row["total_rx_bytes"] == row["total_bytes"]  # loopback: every byte sent arrives
    assert len(gossip["steps_done"]) == len(ddp["steps_done"]) == 4
    assert len(sgd["steps_done"]) == 1

    # bytes: all-reduce every step and gossip both show up; one process sends nothing
    assert ddp["bytes_to_target"] > 0 and ddp["training_bytes"] > 0
    assert gossip["total_bytes"] > 0
    assert gossip["training_bytes"] >= gossip["payload_bytes_sent"]  # the wire carries the state
    assert sgd["total_bytes"] < 0.001 * ddp["total_bytes"]

    # DDP's ranks hold one model, to rounding (their all-reduced gradients may differ in the last
    # bits): the ranks' accuracies agree to one test answer at every evaluation, where
    # independent models would differ by many
    answer = 1 / len(load_dataset("digits").test_y)
    for pt in ddp["curve"]:
        assert max(pt["accuracy"]) - min(pt["accuracy"]) <= 1.5 * answer, ddp["curve"]
    # every gossip node founded, and after finish() the weights sum exactly to 4
    assert gossip["founders"] == 4
    assert len(gossip["final_weights"]) == 4
    assert math.isclose(math.fsum(gossip["final_weights"]), 4.0, abs_tol=1e-9)
    assert gossip["bytes_ratio_vs_ddp"] is not None and ddp["wall_ratio_vs_ddp"] == 1.0
    assert "rule: target reached" in stdout and "gossip p=0.1" in stdout


@pytest.mark.timeout(90)
def test_no_netns_counts_the_shared_loopback_and_repeats_reseed(tmp_path: Path) -> None:
    report, stdout = _bench(tmp_path, "--no-netns", "--systems", "sgd", "--repeats", "2")
    assert report["bytes_counted"].endswith("shared loopback, counts include other traffic")
    assert "shared loopback" in stdout
    first, second = report["systems"]
    assert [first["repeat"], second["repeat"]] == [0, 1]
    for row in (first, second):
        assert row["system"] == "sgd" and row["reached"] and row["steps_to_target"] <= MAX_STEPS
        assert row["wall_ratio_vs_ddp"] is None  # no DDP in this run to compare with
    # another repeat is another draw: a new initial model and data order
    assert [pt["accuracy"] for pt in first["curve"]] != [pt["accuracy"] for pt in second["curve"]]
    summary = report["summary"]["sgd"]
    assert report["repeats"] == 2 and summary["runs"] == 2 and summary["reached"] == 2
    steps = sorted(row["steps_to_target"] for row in (first, second))
    assert summary["steps_to_target"]["min"] == steps[0]
    assert summary["steps_to_target"]["max"] == steps[1]
    assert summary["wall_ratio_vs_ddp"] is None
    assert "over 2 repeats" in stdout


@pytest.mark.timeout(180)
def test_shaped_links_carry_every_worker_and_are_removed_afterwards(tmp_path: Path) -> None:
    """--link-mbit: gossip (two encodings) and DDP each worker on its own shaped link; bytes are
    the workers' link bytes, the weights stay exact, and no namespace or link is left."""
    why = _unshare_unavailable()
    if why:
        pytest.skip(why)
    report, stdout = _bench(
        tmp_path, "--link-mbit", "200", "--systems", "gossip,ddp", "--encoding", "fp32,int8"
    )
    assert "shaped (tbf) to 200 Mbit/s" in report["bytes_counted"]
    rows = {row["variant"]: row for row in report["systems"]}
    assert list(rows) == ["gossip", "gossip-int8", "ddp"]
    assert set(report["summary"]) == {"gossip", "gossip-int8", "ddp"}
    for row in rows.values():
        assert not row["errors"], row["errors"]
        assert row["reached"] and row["link_mbit"] == 200
        counts = [pt["bytes"] for pt in row["curve"]]
        assert counts == sorted(counts) and counts[-1] > 0  # the workers' links carried it
    for variant in ("gossip", "gossip-int8"):
        gossip = rows[variant]
        assert math.fsum(gossip["final_weights"]) == 4.0
        assert gossip["training_bytes"] >= gossip["payload_bytes_sent"] > 0
    assert rows["gossip-int8"]["encoding"] == "int8" and "gossip p=0.1 int8" in stdout
    # every namespace and link of the run is gone (they were made in its own namespace)
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "gosgd-tta" not in left


@pytest.mark.timeout(180)
def test_deferred_evaluation_trains_every_step_and_evaluates_the_kept_copies(
    tmp_path: Path,
) -> None:
    """--defer-eval: every worker trains --max-steps without evaluating (the target is reached
    long before), keeps its model at each evaluation step, and reports those copies' accuracies
    after training; the rule then reads the same curve."""
    report, stdout = _bench(
        tmp_path, "--no-netns", "--systems", "gossip,ddp", "--defer-eval", "--max-steps", "30",
        "--eval-every", "5",
    )  # fmt: skip
    assert "eval every 5 (deferred)" in stdout
    assert report["settings"]["defer_eval"] is True
    rows = {row["system"]: row for row in report["systems"]}
    for row in rows.values():
        assert not row["errors"], row["errors"]
        assert row["steps_done"] == [30] * 4  # no stop on reaching the target: all steps
        assert [pt["step"] for pt in row["curve"]] == [5, 10, 15, 20, 25, 30]
        assert row["reached"] and row["steps_to_target"] < 30
        times = [pt["wall_s"] for pt in row["curve"]]
        assert times == sorted(times) and times[0] > 0
        # the copies are different models: the curve learns, it is not one accuracy repeated
        assert row["curve"][-1]["mean_accuracy"] > row["curve"][0]["mean_accuracy"]
    assert math.fsum(rows["gossip"]["final_weights"]) == 4.0
    answer = 1 / len(load_dataset("digits").test_y)
    for pt in rows["ddp"]["curve"]:  # the ranks still hold one model
        assert max(pt["accuracy"]) - min(pt["accuracy"]) <= 1.5 * answer
