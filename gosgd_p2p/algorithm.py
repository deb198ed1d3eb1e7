"""GoSGD sum-weight gossip (Blot, Picard, Cord, arXiv 1804.01852, Algorithms 1 and 2).

Pure torch, no networking: the rule a reader looks for lives here, and the node, the simulator
and the tests all call it.

Every node i holds a state x_i (its float tensors) and a weight a_i (a Python float, i.e.
float64). The invariant: the sum of all weights, at nodes plus in flight, never changes.

- Send: halve the weight, `a_i <- a_i / 2`, and send (x_i, a_i / 2) to one peer; only a weight
  that halves to something (`can_split`) is sent. Any other fraction keeps the sum exact too
  (`split`). Weights are whole numbers of a quantum (`WEIGHT_QUANTUM`), so no sum of them
  ever rounds: the total is exact bit for bit, not only to an ulp per merge.
- When to send is the push schedule (`PushSchedule`): the paper's coin per step ("step"), a
  Poisson clock in seconds at the cluster's pace ("clock"), or a weight-aware coin ("weight").
  A node's long-run share of the weight is inversely proportional to how much it sends per
  second, so a per-step coin lets a slow node gather weight; a clock in seconds does not.
- A push ends in one `PushOutcome`: acked (the receiver holds the weight), returned (the sender
  merges it back) or written off (lost with a receiver that vanished while it may have held it:
  never taken back, so never counted twice).
- Merge a message (x_s, a_s): `x_i <- x_i + a_s / (a_i + a_s) * (x_s - x_i)`, `a_i <- a_i + a_s`.
- A message that cannot be delivered is merged by its own sender, like any incoming one: the
  sender's weight returns exactly, and its state moves towards the snapshot it had sent.
- The model the cluster converges to is the weighted average sum(a_i x_i) / sum(a_i).
"""

from __future__ import annotations

import math
import random
import statistics
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from gosgd_p2p.config import SCHEDULES
from gosgd_p2p.wire import WEIGHT_LIMIT, WEIGHT_QUANTUM, on_grid

__all__ = [
    "SCHEDULES",
    "PushFate",
    "PushOutcome",
    "PushSchedule",
    "StepRates",
    "WEIGHT_LIMIT",
    "WEIGHT_QUANTUM",
    "WeightError",
    "can_split",
    "check_weight",
    "consensus",
    "halve",
    "merge_",
    "on_grid",
    "split",
    "to_grid",
]


class WeightError(ValueError):
    """A weight that must not enter the sum: not finite, negative, or zero where it must be > 0."""


def check_weight(a: float, *, positive: bool) -> float:
    """Return `a` as a float if it is finite and > 0 (positive) or >= 0; raise WeightError."""
    a = float(a)
    if not math.isfinite(a) or a < 0.0 or (positive and a == 0.0):
        kind = "> 0" if positive else ">= 0"
        raise WeightError(f"weight must be finite and {kind}, got {a!r}")
    return a


def to_grid(a: float) -> float:
    """`a` rounded down to a whole number of quanta (a founder's weight, e.g. from a checkpoint)."""
    return math.floor(check_weight(a, positive=False) / WEIGHT_QUANTUM) * WEIGHT_QUANTUM


def halve(a: float) -> tuple[float, float]:
    """Split weight `a` for a send: returns (kept, sent), with kept + sent == a exactly.

    `sent` is half of `a` rounded to a whole number of quanta (exactly half for an even number
    of quanta). Call only when can_split(a).
    """
    return split(a, 0.5)


def split(a: float, fraction: float) -> tuple[float, float]:
    """Split weight `a` to send about `fraction` of it (0 < fraction < 1): returns (kept, sent),
    both > 0, with kept + sent == a exactly and sent == a - kept exactly.

    `sent` is `fraction * a` rounded to a whole number of quanta, and at least one quantum is
    both sent and kept; `kept = a - sent` is exact because both lie on the grid (for a weight
    off the grid, e.g. from an older checkpoint, kept keeps its low bits, still exactly).
    Call only when can_split(a).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    if not can_split(a):
        raise WeightError(f"weight {a!r} is too small to split")
    quanta = math.floor(a / WEIGHT_QUANTUM)  # whole quanta in a: >= 2
    send = min(max(round(a * fraction / WEIGHT_QUANTUM), 1), quanta - 1)
    sent = send * WEIGHT_QUANTUM
    return a - sent, sent


def can_split(a: float) -> bool:
    """Whether weight `a` may be split for a push or a donation: both parts keep a quantum,
    and the parts add exactly (a < WEIGHT_LIMIT).

    A node with no weight (a joiner before its state, a node that left) or with a single
    quantum has nothing to give.
    """
    return 2.0 * WEIGHT_QUANTUM <= a < WEIGHT_LIMIT


class PushFate(str, Enum):
    """How a push (or a leave's hand-over) ended, from its sender's side."""

    ACKED = "acked"  # the receiver committed it: the weight is the receiver's
    RETURNED = "returned"  # certainly not committed: the sender merges it back
    WRITTEN_OFF = "written_off"  # the receiver vanished, maybe holding it: lost, never taken back


@dataclass(frozen=True)
class PushOutcome:
    """The settled fate of one push and the amount of weight it settles (float64)."""

    fate: PushFate
    weight: float
    receiver_id: str = ""  # the node that acked it, when known


@torch.no_grad()
def merge_(
    x: Sequence[torch.Tensor],
    a: float,
    x_s: Sequence[torch.Tensor],
    a_s: float,
    *,
    scratch: bool = False,
) -> float:
    """Merge the message (x_s, a_s) into (x, a) in place; return the new weight a + a_s.

    `x` and `x_s` are matching sequences of tensors (same shapes; x_s may be float32 while x is
    another float type, and may live on another device only if it is a CPU tensor for a CPU x).
    `a` >= 0 and `a_s` > 0 are weights. A node with a == 0 (a joiner) takes x_s exactly.
    With `scratch`, x_s is the caller's to lose: when a > 0 it holds x_s - x (the x before the
    merge) afterwards, and x takes x + t (x_s - x) from it, which needs no tensor of its own.
    Must be called by the one thread that owns x and a.
    """
    a = check_weight(a, positive=False)
    a_s = check_weight(a_s, positive=True)
    if len(x) != len(x_s):
        raise ValueError(f"state has {len(x)} tensors, message has {len(x_s)}")
    if a == 0.0:
        # A node without weight takes x_s exactly (lerp by 1 would keep a NaN already in x).
        for d, s in zip(x, x_s, strict=True):
            d.copy_(s)
        return a_s
    t = a_s / (a + a_s)
    # One fused kernel per dtype group instead of one launch per tensor.
    same = [(d, s) for d, s in zip(x, x_s, strict=True) if d.dtype == s.dtype]
    if same:
        dst, src = (list(group) for group in zip(*same, strict=True))
        if scratch:
            torch._foreach_sub_(src, dst)
            torch._foreach_add_(dst, src, alpha=t)
        else:
            torch._foreach_lerp_(dst, src, t)
    for d, s in zip(x, x_s, strict=True):
        if d.dtype != s.dtype:
            if scratch:  # in x's precision, as the lerp would be
                diff = s.to(d.dtype).sub_(d)
                d.add_(diff, alpha=t)
                s.copy_(diff)
            else:
                d.lerp_(s.to(d.dtype), t)
    return a + a_s


@torch.no_grad()
def consensus(
    states: Sequence[Sequence[torch.Tensor]], weights: Sequence[float]
) -> list[torch.Tensor]:
    """The weighted average sum(a_i x_i) / sum(a_i) of several states, computed in float64.

    `states[i]` is node i's tensors (matching shapes); `weights[i]` >= 0 with a positive sum.
    Returns new float64 tensors on the CPU.
    """
    if len(states) != len(weights) or not states:
        raise ValueError("need one weight per state and at least one state")
    ws = [check_weight(w, positive=False) for w in weights]
    total = math.fsum(ws)
    if total <= 0.0:
        raise WeightError("weights sum to zero: no node holds any mass")
    out = [torch.zeros(t.shape, dtype=torch.float64) for t in states[0]]
    for state, w in zip(states, ws, strict=True):
        for acc, t in zip(out, state, strict=True):
            acc.add_(t.detach().to("cpu", torch.float64), alpha=w / total)
    return out


MAX_RINGS = 8  # clock rings a node may owe: more rings than steps beyond this are dropped
MAX_FRACTION = 0.99  # "weight": the most of its weight a node sends in one push
RATE_MEMORY = 256  # peers whose step rate a node remembers (the least recently heard go first)
OWN_RATE_STEPS = 8  # own step rate: one sample per this many local steps
RATE_SMOOTHING = 0.5  # weight of a new sample in a step rate's moving average
REFERENCE_MESSAGES = 16  # "weight": incoming messages whose mean weight sets the reference


class StepRates:
    """Steps per second of this node and of the peers it hears from, for the "clock" schedule.

    Each incoming message carries its sender's step count: two messages of one sender give its
    rate over the time between them (arrival jitter is small against that time); the first one
    gives a first guess, its step count over the time since this node's first step (right for
    nodes that started together, corrected by the next message otherwise). The own rate is
    sampled every OWN_RATE_STEPS steps. Each rate is a moving average, so it follows a node
    whose speed changes. Training thread only (or the simulator's loop).
    """

    def __init__(self) -> None:
        self._own: tuple[int, float] | None = None  # (step, time) of the last own sample
        self._start: float | None = None  # time of this node's first step
        self._own_rate: float | None = None
        self._seen: OrderedDict[str, tuple[int, float]] = OrderedDict()  # last (step, time)
        self._rates: dict[str, float] = {}

    @staticmethod
    def _smooth(old: float | None, new: float) -> float:
        return new if old is None else old + RATE_SMOOTHING * (new - old)

    def own(self, step: int, now: float) -> None:
        """This node has taken `step` steps at time `now` (seconds)."""
        if self._own is None:
            self._own = (step, now)
            self._start = now
            return
        step0, t0 = self._own
        if step - step0 >= OWN_RATE_STEPS and now > t0:
            self._own_rate = self._smooth(self._own_rate, (step - step0) / (now - t0))
            self._own = (step, now)

    def peer(self, sender: str, step: int, now: float) -> None:
        """A message of `sender`, taken at its step `step`, arrived at time `now` (seconds)."""
        last = self._seen.pop(sender, None)
        self._seen[sender] = (step, now)
        if last is not None and step > last[0] and now > last[1]:
            rate = (step - last[0]) / (now - last[1])
            self._rates[sender] = self._smooth(self._rates.get(sender), rate)
        elif last is None and self._start is not None and now > self._start:
            self._rates[sender] = step / (now - self._start)
        while len(self._seen) > RATE_MEMORY:
            gone, _ = self._seen.popitem(last=False)
            self._rates.pop(gone, None)

    @property
    def own_rate(self) -> float | None:
        return self._own_rate

    def cluster(self) -> float | None:
        """The median step rate over this node and the peers with a rate; None before the
        own rate is known. A median: a minority of slow (or fast) nodes does not move it."""
        if self._own_rate is None:
            return None
        return statistics.median([self._own_rate, *self._rates.values()])


class PushSchedule:
    """When a node pushes and which fraction of its weight it sends; one per node, called by
    the training thread (or the simulator's loop) once per local step.

    - "step": the paper's coin, with probability p per step; sends half.
    - "clock": a Poisson clock in seconds rings at `rate` per second; each ring is one push of
      half the weight, made at the first step after it (rings that fall into one step are
      owed to the next steps, at most MAX_RINGS). `rate` None: p times the cluster's median
      step rate (StepRates), so every node pushes as often in seconds as a typical node does
      with the per-step coin, however slow it is itself. Until its own rate is known a node
      uses the per-step coin. Halves only, as with the coin.
    - "weight": the per-step coin, made stronger when the weight is above a reference (the
      founder's weight, then twice the mean weight of recent incoming messages): probability
      min(1, p a / ref) and a fraction that keeps ref / 2 (at least half is sent).

    Any fraction is split exactly (`split`): the weight sent is exactly what the sender loses.
    A merge rounds the receiver's sum to a double, whatever the schedule; halves keep the
    weights dyadic, so that rounding is rare and the total stays exact to a few ulps.
    """

    def __init__(
        self,
        kind: str,
        p: float,
        rng: random.Random,
        *,
        rate: float | None = None,
        reference: float = 1.0,
    ) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        if rate is not None and not (math.isfinite(rate) and rate >= 0.0):
            raise ValueError(f"push rate must be finite and >= 0, got {rate}")
        self.kind = kind
        self.p = p
        self.fixed_rate = rate
        self.rates = StepRates()
        self._rng = rng
        self._next_ring: float | None = None
        self._owed = 0  # clock rings not pushed yet
        self._reference = check_weight(reference, positive=True)
        self._incoming: list[float] = []  # weights of recent incoming messages ("weight")

    def rate(self) -> float | None:
        """The clock's rate in pushes per second; None while it is not known yet."""
        if self.fixed_rate is not None:
            return self.fixed_rate
        cluster = self.rates.cluster()
        return None if cluster is None else self.p * cluster

    def observe(self, sender: str, sender_step: int, weight: float, now: float) -> None:
        """An incoming message (not a returned one) was merged at time `now` (seconds)."""
        self.rates.peer(sender, sender_step, now)
        self._incoming.append(weight)
        del self._incoming[:-REFERENCE_MESSAGES]

    def reference(self) -> float:
        """The weight the "weight" rule holds a node to: about the mean weight of a node."""
        if not self._incoming:
            return self._reference
        return 2.0 * math.fsum(self._incoming) / len(self._incoming)

    def fraction(self, step: int, weight: float, now: float) -> float:
        """Whether to push at this step (taken at time `now`, seconds): the fraction of the
        weight to send, in (0, 1), or 0.0 for no push. Consumes the clock's rings."""
        self.rates.own(step, now)
        if self.p == 0.0 and self.fixed_rate is None:
            return 0.0
        if self.kind == "clock":
            rate = self.rate()
            if rate is not None:
                return self._clock(rate, now)
        if self.kind == "weight":
            ref = self.reference()
            if weight > ref:
                if self._rng.random() < min(1.0, self.p * weight / ref):
                    return max(0.5, min(MAX_FRACTION, 1.0 - ref / (2.0 * weight)))
                return 0.0
        return 0.5 if self._rng.random() < self.p else 0.0

    def missed(self) -> None:
        """The push fraction() asked for did not go out (no peer, every send buffer busy):
        the clock owes that ring to the next step; a coin forgets it."""
        if self.kind == "clock" and self._next_ring is not None:
            self._owed = min(MAX_RINGS, self._owed + 1)

    def _clock(self, rate: float, now: float) -> float:
        if rate <= 0.0:
            self._next_ring = None
            return 0.0
        if self._next_ring is None:
            self._next_ring = now + self._rng.expovariate(rate)
        while self._next_ring <= now and self._owed < MAX_RINGS:
            self._owed += 1
            self._next_ring += self._rng.expovariate(rate)
        if self._next_ring <= now:  # owes as many pushes as it may: later rings are dropped
            self._next_ring = now + self._rng.expovariate(rate)
        if not self._owed:
            return 0.0
        self._owed -= 1
        return 0.5
