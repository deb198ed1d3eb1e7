"""GoSGD sum-weight gossip (Blot, Picard, Cord, arXiv 1804.01852, Algorithms 1 and 2).

Pure torch, no networking: the rule a reader looks for lives here, and the node, the simulator
and the tests all call it.

Every node i holds a state x_i (its float tensors) and a weight a_i (a Python float, i.e.
float64). The invariant: the sum of all weights, at nodes plus in flight, never changes.

- Send: halve the weight, `a_i <- a_i / 2`, and send (x_i, a_i / 2) to one peer.
- Merge a message (x_s, a_s): `x_i <- x_i + a_s / (a_i + a_s) * (x_s - x_i)`, `a_i <- a_i + a_s`.
- A message that cannot be delivered is merged by its own sender, like any incoming one: the
  sender's weight returns exactly, and its state moves towards the snapshot it had sent.
- The model the cluster converges to is the weighted average sum(a_i x_i) / sum(a_i).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["WeightError", "check_weight", "consensus", "halve", "merge_"]


class WeightError(ValueError):
    """A weight that must not enter the sum: not finite, negative, or zero where it must be > 0."""


def check_weight(a: float, *, positive: bool) -> float:
    """Return `a` as a float if it is finite and > 0 (positive) or >= 0; raise WeightError."""
    a = float(a)
    if not math.isfinite(a) or a < 0.0 or (positive and a == 0.0):
        kind = "> 0" if positive else ">= 0"
        raise WeightError(f"weight must be finite and {kind}, got {a!r}")
    return a


def halve(a: float) -> tuple[float, float]:
    """Split weight `a` for a send: returns (kept, sent), with kept + sent == a exactly.

    Halving a binary float is exact (barring underflow, which the subtraction absorbs), so the
    sum is conserved bit for bit.
    """
    sent = a / 2.0
    return a - sent, sent


@torch.no_grad()
def merge_(x: Sequence[torch.Tensor], a: float, x_s: Sequence[torch.Tensor], a_s: float) -> float:
    """Merge the message (x_s, a_s) into (x, a) in place; return the new weight a + a_s.

    `x` and `x_s` are matching sequences of tensors (same shapes; x_s may be float32 while x is
    another float type, and may live on another device only if it is a CPU tensor for a CPU x).
    `a` >= 0 and `a_s` > 0 are weights. A node with a == 0 (a joiner) takes x_s exactly.
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
    same = [(d, s) for d, s in zip(x, x_s, strict=True) if d.dtype == s.dtype]
    if same:
        # One fused kernel per dtype group instead of one launch per tensor.
        dst, src = zip(*same, strict=True)
        torch._foreach_lerp_(list(dst), list(src), t)
    for d, s in zip(x, x_s, strict=True):
        if d.dtype != s.dtype:
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
