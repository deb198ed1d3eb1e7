"""bench.time_to_accuracy --straggler: the latest-accuracy rule and the slowdowns (pure)."""

from __future__ import annotations

import pytest

from bench.time_to_accuracy.straggler import slowdowns
from bench.time_to_accuracy.supervisor import latest_hit


def test_the_latest_accuracy_rule_does_not_wait_for_the_slowest_step() -> None:
    # step -> rank -> (training s, accuracy, tx bytes); rank 1 is three times slower
    evals = {
        10: {0: (1.0, 0.90, 0), 1: (3.0, 0.92, 0)},
        20: {0: (2.0, 0.99, 0), 1: (6.0, 0.97, 0)},
    }
    # at 2 s, rank 0 is at 0.99 but rank 1 has not evaluated yet; at 3 s: (0.99 + 0.92) / 2
    assert latest_hit(evals, 2, 0.95) == 3.0
    assert latest_hit(evals, 2, 0.98) == 6.0
    assert latest_hit(evals, 2, 0.995) is None


def test_slowdowns_pair_each_straggler_run_with_the_equal_run_of_its_repeat() -> None:
    rows = [
        {"system": "gossip", "variant": "gossip", "repeat": r, "straggler": slow,
         "wall_s_to_target_latest": t}
        for r, slow, t in [(0, False, 2.0), (0, True, 3.0), (1, False, 4.0), (1, True, 4.4),
                           (2, False, 1.0), (2, True, None)]
    ]  # fmt: skip
    out = slowdowns(rows)["gossip"]
    assert out["pairs"] == 2
    assert out["slowdown"]["median"] == pytest.approx(1.3)
    assert (out["slowdown"]["min"], out["slowdown"]["max"]) == (pytest.approx(1.1), 1.5)
    assert out["wall_s_to_target_latest"]["straggler"] == [3.0, 4.4, None]
