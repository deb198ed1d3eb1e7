"""Push schedules (gosgd_p2p.algorithm.PushSchedule) and splits of any fraction (split)."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch
from conftest import node_config, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from gosgd_p2p import GossipNode
from gosgd_p2p.algorithm import (
    MAX_FRACTION,
    MAX_RINGS,
    PushSchedule,
    StepRates,
    can_split,
    halve,
    merge_,
    split,
)

# every positive double a node may hold, subnormals included
any_weight = st.floats(min_value=5e-324, max_value=1e300, allow_nan=False, allow_infinity=False)
fractions = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, exclude_max=True)


@settings(max_examples=500, deadline=None)
@given(a=any_weight, fraction=fractions)
def test_a_split_of_any_fraction_is_exact(a: float, fraction: float) -> None:
    if not can_split(a):
        return  # nothing to split: the node does not push (checked by the next test)
    kept, sent = split(a, fraction)
    assert kept > 0.0 and sent > 0.0
    # exact in the reals, not only after rounding: the weight sent is what was subtracted
    assert Fraction(kept) + Fraction(sent) == Fraction(a)
    assert a - sent == kept and kept + sent == a


def test_a_split_of_half_is_the_halving_and_fractions_outside_are_refused() -> None:
    assert not can_split(5e-324)
    for a in (1.0, 3.0, 2**-30, 0.7):
        assert split(a, 0.5) == halve(a)
    # the fraction comes out as asked, up to the rounding of the larger part
    kept, sent = split(1.0, 0.875)
    assert (kept, sent) == (0.125, 0.875)
    for bad in (0.0, 1.0, -0.5, float("nan")):
        with pytest.raises(ValueError):
            split(1.0, bad)


def test_random_splits_and_merges_keep_the_total_exact() -> None:
    """Eight nodes push arbitrary fractions to each other; at the end, with nothing in flight,
    the weights sum to the founders' 8 exactly: every weight is on the grid, so no merge rounds."""
    rng = random.Random(7)
    weights = [1.0] * 8
    x = [[torch.zeros(3)] for _ in weights]
    for _ in range(5000):
        i, j = rng.sample(range(8), 2)
        if not can_split(weights[i]):
            continue
        weights[i], sent = split(weights[i], rng.uniform(0.01, 0.99))
        weights[j] = merge_(x[j], weights[j], x[i], sent)
    assert sum(weights) == 8.0


@pytest.mark.parametrize("step_s", [0.01, 0.05, 0.15])
def test_the_poisson_clock_rings_at_its_rate_whatever_the_step_time(step_s: float) -> None:
    """A fixed rate of 5 pushes per (virtual) second over 2000 s: 10000 pushes of half the
    weight up to Poisson noise, for a node that steps 100, 20 or 6.7 times a second (the
    slowest one often owes a ring to its next step)."""
    rate, seconds = 5.0, 2000.0
    schedule = PushSchedule("clock", 0.1, random.Random(1), rate=rate)
    draws = [schedule.fraction(k, 1.0, k * step_s) for k in range(1, int(seconds / step_s) + 1)]
    assert set(draws) == {0.0, 0.5}
    expected = rate * seconds
    pushes = sum(f > 0 for f in draws)
    assert abs(pushes - expected) < 5 * math.sqrt(expected)  # 5 sigma of a Poisson count


def test_a_clock_faster_than_the_steps_pushes_every_step_and_drops_the_excess() -> None:
    schedule = PushSchedule("clock", 0.1, random.Random(8), rate=100.0)
    draws = [schedule.fraction(k, 1.0, k * 1.0) for k in range(1, 101)]
    # the clock starts at the first step; then 100 rings a step, at most MAX_RINGS owed
    assert draws == [0.0] + [0.5] * 99
    schedule.fixed_rate = 1e-12  # the clock all but stops: only the owed rings are pushed
    after = [schedule.fraction(k, 1.0, k * 1.0) for k in range(101, 121)]
    # the owed rings, and the one already drawn at the old rate; nothing more
    assert after == [0.5] * MAX_RINGS + [0.0] * (20 - MAX_RINGS)


def test_a_push_that_did_not_go_out_stays_owed_on_the_clock() -> None:
    clock = PushSchedule("clock", 0.1, random.Random(9), rate=1.0)
    assert clock.fraction(1, 1.0, 0.0) == 0.0  # the clock starts
    first = next(k for k in range(1, 10**6) if clock.fraction(k, 1.0, k * 0.01))
    clock.missed()  # e.g. every send buffer was busy
    assert clock.fraction(first + 1, 1.0, (first + 1) * 0.01) == 0.5  # the next step pushes
    coin = PushSchedule("step", 0.0, random.Random(9))
    coin.missed()
    assert coin.fraction(1, 1.0, 0.0) == 0.0


def test_the_clock_follows_the_clusters_median_step_rate() -> None:
    """Without a fixed rate, the clock rings p times per step of a typical node: a node at a
    third of the speed pushes as often in seconds as its three faster peers."""
    slow = PushSchedule("clock", 0.1, random.Random(2))
    assert slow.rate() is None  # nothing known yet: the per-step coin until then
    step_s = 0.03  # this node: 33 steps/s; its peers: 100 steps/s
    for k in range(1, 2001):
        now = k * step_s
        if k % 10 == 0:
            for peer in ("a", "b", "c"):
                slow.observe(peer, round(now * 100), 0.5, now)
        slow.fraction(k, 1.0, now)
    assert slow.rates.own_rate == pytest.approx(1 / step_s, rel=1e-6)
    assert slow.rate() == pytest.approx(0.1 * 100, rel=0.02)
    # a minority of slow peers does not move the median
    rates = StepRates()
    for k in range(0, 41, 8):
        rates.own(k, k / 100)
    for peer, speed in (("a", 100), ("b", 100), ("slow", 10)):
        for k in range(3):
            rates.peer(peer, k * speed, float(k))
    assert rates.cluster() == pytest.approx(100.0)


def test_the_weight_rule_sends_more_above_the_reference() -> None:
    rng = random.Random(3)
    schedule = PushSchedule("weight", 0.1, rng, reference=1.0)
    heavy = [schedule.fraction(k, 4.0, float(k)) for k in range(1, 2001)]
    pushed = [f for f in heavy if f]
    # probability min(1, p * a / ref) = 0.4, keeping ref / 2 = 1/8 of a = 4
    assert 0.3 < len(pushed) / len(heavy) < 0.5
    assert set(pushed) == {1.0 - 1.0 / 8.0}
    assert schedule.fraction(1, 1e6, 1.0) == MAX_FRACTION  # p a / ref >= 1: a push, capped
    light = [schedule.fraction(k, 0.5, float(k)) for k in range(1, 2001)]
    assert set(light) == {0.0, 0.5} and 0.05 < sum(f > 0 for f in light) / len(light) < 0.15
    # the reference follows the incoming messages: twice their mean weight
    for k in range(16):
        schedule.observe("a", k, 2.0, float(k))
    assert schedule.reference() == 4.0


def test_the_per_step_coin_is_the_papers() -> None:
    schedule = PushSchedule("step", 0.25, random.Random(4))
    draws = [schedule.fraction(k, 1.0, k * 0.01) for k in range(1, 4001)]
    assert set(draws) == {0.0, 0.5}
    assert 0.2 < sum(f > 0 for f in draws) / len(draws) < 0.3
    assert not any(
        PushSchedule("clock", 0.0, random.Random(5)).fraction(k, 1.0, k) for k in range(1, 100)
    )
    with pytest.raises(ValueError, match="schedule"):
        PushSchedule("hourly", 0.1, random.Random(6))


def test_nodes_sending_more_than_half_conserve_the_weight() -> None:
    """The weight rule: a node above the founder's weight sends all but half of it (fractions
    3/4, 0.9, ...) through real gRPC, and the weights still sum to the founders' 2."""

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Linear(4, 2)

    a = GossipNode(model(), node_config("a", "weight", schedule="weight", p=0.5))
    b = GossipNode(model(), node_config("b", "weight", schedule="weight", p=0.5, peers=[a.address]))
    try:
        wait_until(lambda: a.peers.pushable() and b.peers.pushable(), 10, "peers")
        heaviest = 0.0
        for _ in range(60):
            for node in (a, b):
                node.step()
                heaviest = max(heaviest, node.weight)
            wait_until(lambda: a.in_flight == 0 and b.in_flight == 0, 30, "pushes")
        assert heaviest > 1.0  # so some push sent more than half
        assert a.counters.get("pushes_acked") > 0 and b.counters.get("pushes_acked") > 0
        total = a.finish() + b.finish()
        assert math.isclose(total, 2.0, rel_tol=0, abs_tol=1e-12)
    finally:
        a.close()
        b.close()
