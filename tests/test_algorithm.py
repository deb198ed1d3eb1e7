"""The sum-weight rule in gosgd_p2p.algorithm: merge, halve, consensus, and mass conservation."""

from __future__ import annotations

import math
import random
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gosgd_p2p.algorithm import (
    WEIGHT_LIMIT,
    WEIGHT_QUANTUM,
    WeightError,
    can_split,
    check_weight,
    consensus,
    halve,
    merge_,
    on_grid,
    split,
)

torch.set_num_threads(1)

SHAPES = [(), (1,), (5,), (3, 4), (2, 3, 2)]
# Tolerances of one merge computed in each destination dtype, for values in [-10, 10].
TOL = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-2, "atol": 5e-2},
}

#: Weights on the grid, as every weight in a cluster is (from 2^-10 to 2^10).
weights = st.integers(2**22, 2**42).map(lambda n: n * WEIGHT_QUANTUM)


def _random_state(gen: torch.Generator, shapes, dtypes) -> list[torch.Tensor]:
    return [
        (torch.rand(s, generator=gen, dtype=torch.float64) * 20 - 10).to(d)
        for s, d in zip(shapes, dtypes, strict=True)
    ]


# --- merge_ -----------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    shapes=st.lists(st.sampled_from(SHAPES), min_size=1, max_size=4),
    data=st.data(),
    a=weights,
    a_s=weights,
    scratch=st.booleans(),
)
def test_merge_is_the_weighted_average(seed, shapes, data, a, a_s, scratch) -> None:
    dtypes = [
        data.draw(st.sampled_from([torch.float32, torch.float64, torch.float16])) for _ in shapes
    ]
    gen = torch.Generator().manual_seed(seed)
    x = _random_state(gen, shapes, dtypes)
    x_s = _random_state(gen, shapes, [torch.float32] * len(shapes))
    expected = [
        (a * d.double() + a_s * s.double()) / (a + a_s) for d, s in zip(x, x_s, strict=True)
    ]

    before = [t.clone() for t in x]
    sent = [t.clone() for t in x_s]

    new_a = merge_(x, a, x_s, a_s, scratch=scratch)

    assert new_a == a + a_s
    for got, want, dtype in zip(x, expected, dtypes, strict=True):
        assert got.dtype == dtype  # merged in place, dtype kept
        torch.testing.assert_close(got.double(), want, **TOL[dtype])
    for left, old_x, s in zip(x_s, before, sent, strict=True):
        # scratch: the message's tensors hold x_s - x, so a caller can take its norm
        assert torch.equal(left, (s.to(old_x.dtype) - old_x).to(s.dtype) if scratch else s)


def test_a_merge_with_scratch_keeps_an_equal_state_bitwise() -> None:
    gen = torch.Generator().manual_seed(7)
    x = _random_state(gen, SHAPES, [torch.float32] * len(SHAPES))
    x_s = [t.clone() for t in x]
    same = [t.clone() for t in x]
    merge_(x, 3.0, x_s, 1.0, scratch=True)
    for got, want, diff in zip(x, same, x_s, strict=True):
        assert torch.equal(got, want)
        assert not diff.any()


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]),
    a_s=st.floats(min_value=1e-300, max_value=1e6),
)
def test_merge_into_zero_weight_takes_the_message_bitwise(seed, dtype, a_s) -> None:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4,), (2, 3), ()]
    x = _random_state(gen, shapes, [dtype] * 3)
    x_s = _random_state(gen, shapes, [torch.float32] * 3)

    sent = [t.clone() for t in x_s]

    assert merge_(x, 0.0, x_s, a_s, scratch=True) == a_s

    for got, src, kept in zip(x, x_s, sent, strict=True):
        assert torch.equal(got, src.to(dtype))
        assert torch.equal(src, kept)  # a == 0 copies: the message is left as it came


def test_merge_into_zero_weight_overwrites_non_finite_values() -> None:
    x = [torch.tensor([float("nan"), float("inf"), 1.0])]
    x_s = [torch.tensor([1.0, 2.0, 3.0])]
    merge_(x, 0.0, x_s, 0.5)
    assert torch.equal(x[0], x_s[0])


def test_merge_groups_same_and_mixed_dtypes_in_one_call() -> None:
    x = [
        torch.full((3,), 1.0, dtype=torch.float32),
        torch.full((2,), 1.0, dtype=torch.float64),
        torch.full((2, 2), 1.0, dtype=torch.float16),
        torch.full((1,), 1.0, dtype=torch.float32),
    ]
    x_s = [torch.full(t.shape, 4.0, dtype=torch.float32) for t in x]
    assert merge_(x, 3.0, x_s, 1.0) == 4.0
    for t in x:
        assert torch.equal(t, torch.full(t.shape, 1.75, dtype=t.dtype))  # (3*1 + 4)/4


@pytest.mark.parametrize("bad", [0.0, -1.0, -0.0, math.nan, math.inf, -math.inf])
def test_merge_rejects_a_bad_message_weight(bad: float) -> None:
    x = [torch.ones(3)]
    before = x[0].clone()
    with pytest.raises(WeightError):
        merge_(x, 1.0, [torch.zeros(3)], bad)
    assert torch.equal(x[0], before)


@pytest.mark.parametrize("bad", [-1.0, -1e-300, math.nan, math.inf, -math.inf])
def test_merge_rejects_a_bad_local_weight(bad: float) -> None:
    x = [torch.ones(3)]
    with pytest.raises(WeightError):
        merge_(x, bad, [torch.zeros(3)], 1.0)
    assert torch.equal(x[0], torch.ones(3))


def test_merge_rejects_states_of_different_lengths() -> None:
    x = [torch.ones(3), torch.ones(2)]
    with pytest.raises(ValueError, match="2 tensors.*1"):
        merge_(x, 1.0, [torch.zeros(3)], 1.0)
    assert all(torch.equal(t, torch.ones_like(t)) for t in x)


def test_check_weight_accepts_zero_only_when_not_positive() -> None:
    assert check_weight(0, positive=False) == 0.0
    assert isinstance(check_weight(1, positive=True), float)
    with pytest.raises(WeightError, match="> 0"):
        check_weight(0.0, positive=True)
    assert issubclass(WeightError, ValueError)


# --- halve ------------------------------------------------------------------------------------

SUBNORMALS = [5e-324, 1e-323, 1.5e-323, 2.2250738585072009e-308, 2.2250738585072014e-308]


def _bits(x: float) -> float:
    return struct.unpack("<d", struct.pack("<Q", x))[0]


Q = WEIGHT_QUANTUM


@pytest.mark.parametrize("a", [1.0, 3.0, 2 * Q, 3 * Q, 1024.0 + Q, WEIGHT_LIMIT - Q, 0.1])
def test_halve_conserves_known_values(a: float) -> None:
    kept, sent = halve(a)
    assert kept + sent == a
    assert a - kept == sent
    assert 0.0 < sent <= a and 0.0 < kept <= a
    assert on_grid(sent)
    assert on_grid(kept) == on_grid(a)  # 0.1 is off the grid (an old checkpoint): kept stays off


@pytest.mark.parametrize(
    "a", [0.0, Q, 1.5 * Q, WEIGHT_LIMIT, 1e308, math.inf, math.nan, *SUBNORMALS]
)
def test_a_weight_below_two_quanta_or_past_the_limit_does_not_split(a: float) -> None:
    assert not can_split(a)
    with pytest.raises(WeightError):
        halve(a)
    with pytest.raises(WeightError):
        split(a, 0.25)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(2, int(WEIGHT_LIMIT / Q) - 1).map(lambda n: n * Q),
    st.floats(min_value=1e-30, max_value=1.0, exclude_max=True),
)
def test_split_on_the_grid_is_exact_and_stays_on_it(a: float, fraction: float) -> None:
    kept, sent = split(a, fraction)
    assert kept + sent == a and a - kept == sent
    assert on_grid(kept) and on_grid(sent) and kept > 0.0 and sent > 0.0
    assert abs(sent - a * fraction) <= max(Q, a * 1e-15)  # rounded to a quantum, or clamped
    kept_half, sent_half = halve(a)
    if (a / Q) % 2 == 0:
        assert kept_half == sent_half == a / 2


def test_many_pushes_among_four_nodes_keep_the_total_bit_exact() -> None:
    """Plain float halving drifts: the total of four nodes is off by an ulp within about a
    hundred pushes. On the weight grid no sum ever rounds."""
    rng = random.Random(1)
    w = [1.0] * 4
    for _ in range(100_000):
        i, j = rng.sample(range(4), 2)
        if can_split(w[i]):
            w[i], sent = split(w[i], rng.choice([0.5, 0.5, 0.3, 0.9]))
            w[j] += sent
        assert sum(w) == 4.0  # a plain float sum: no rounding anywhere
    assert math.fsum(w) == 4.0


# --- consensus --------------------------------------------------------------------------------


def test_consensus_is_the_weighted_mean_in_float64() -> None:
    states = [
        [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]], dtype=torch.float16)],
        [torch.tensor([3.0, 6.0]), torch.tensor([[4.0]], dtype=torch.float16)],
        [torch.tensor([9.0, 9.0]), torch.tensor([[8.0]], dtype=torch.float16)],
    ]
    out = consensus(states, [1.0, 3.0, 0.0])
    assert [t.dtype for t in out] == [torch.float64, torch.float64]
    assert [t.shape for t in out] == [torch.Size([2]), torch.Size([1, 1])]
    torch.testing.assert_close(out[0], torch.tensor([2.5, 5.0], dtype=torch.float64))
    torch.testing.assert_close(out[1], torch.tensor([[3.0]], dtype=torch.float64))


def test_consensus_is_scale_free() -> None:
    gen = torch.Generator().manual_seed(1)
    states = [[torch.randn(4, generator=gen)] for _ in range(3)]
    w = [0.25, 0.5, 0.125]
    a = consensus(states, w)
    b = consensus(states, [x * 1024 for x in w])
    torch.testing.assert_close(a[0], b[0], rtol=1e-14, atol=1e-14)


def test_consensus_rejects_bad_inputs() -> None:
    s = [torch.ones(2)]
    with pytest.raises(WeightError, match="zero"):
        consensus([s, s], [0.0, 0.0])
    with pytest.raises(ValueError):
        consensus([s, s], [1.0])
    with pytest.raises(ValueError):
        consensus([], [])
    with pytest.raises(WeightError):
        consensus([s, s], [1.0, -1.0])
    with pytest.raises(WeightError):
        consensus([s], [math.nan])


# --- a simulated cluster: mass conservation and the invariant average -------------------------


Flight = tuple[int, int, list[torch.Tensor], float]  # (sender, receiver, snapshot, weight)


def _mass(weights: list[float], in_flight: list[Flight]) -> float:
    return math.fsum(weights) + math.fsum(w for _, _, _, w in in_flight)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_cluster_conserves_mass_and_weighted_average(data: st.DataObject) -> None:
    k = data.draw(st.integers(2, 5), label="nodes")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    init_weights = data.draw(st.lists(weights, min_size=k, max_size=k), label="weights")
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3,), (2, 2)]
    states = [_random_state(gen, shapes, [torch.float32] * 2) for _ in range(k)]
    weights_now = list(init_weights)
    target = consensus(states, init_weights)
    total = _mass(weights_now, [])
    in_flight: list[Flight] = []  # every message on the network

    def apply(op: str, i: int) -> None:
        if op == "send":
            j = data.draw(st.sampled_from([n for n in range(k) if n != i]), label="to")
            weights_now[i], sent = halve(weights_now[i])
            in_flight.append((i, j, [t.clone() for t in states[i]], sent))
        else:
            sender, receiver, snapshot, w = in_flight.pop(i)
            node = receiver if op == "deliver" else sender  # a failed push returns to its sender
            weights_now[node] = merge_(states[node], weights_now[node], snapshot, w)
        assert _mass(weights_now, in_flight) == total  # exact: every weight is on the grid

    for _ in range(data.draw(st.integers(0, 30), label="steps")):
        ops = ["send"] + (["deliver", "fail"] if in_flight else [])
        op = data.draw(st.sampled_from(ops), label="op")
        if op == "send":
            apply(op, data.draw(st.integers(0, k - 1), label="from"))
        else:
            apply(op, data.draw(st.integers(0, len(in_flight) - 1), label="msg"))
    while in_flight:  # the network settles: each message is delivered or returned
        apply(data.draw(st.sampled_from(["deliver", "fail"]), label="settle"), 0)

    assert math.fsum(weights_now) == total
    for got, want in zip(consensus(states, weights_now), target, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
