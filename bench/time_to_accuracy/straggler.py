"""--straggler: every worker capped to the same CPU share by a cgroup cpu quota, and each
system run twice in a repeat, once with every worker equal and once with the last worker at a
third of the cap; the slowdown is the second run's wall time to the target over the first's.

The time to the target here is `wall_s_to_target_latest`: when the mean of every worker's
latest accuracy first reaches it. The benchmark's step rule (the mean at a step every worker
evaluated, timed by the slowest worker) makes every system wait for the straggler's steps,
which is the question asked of DDP, not of gossip.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from bench.cgroup import CpuCaps

SLOW_FACTOR = 3.0  # the straggler gets cap / SLOW_FACTOR cores
SYSTEMS = "ddp,gossip-step,gossip"  # the systems a straggler run compares, in this order


def capper(caps: CpuCaps, cores: float, straggler: bool) -> Callable[[list[Any]], None]:
    """What run_system calls once its workers are ready (imports and data loading are not
    what the run measures): cap each at `cores`, the last one at
    cores / SLOW_FACTOR when `straggler` (a single worker, sgd, is never the straggler)."""

    def cap(procs: list[Any]) -> None:
        for rank, proc in enumerate(procs):
            slow = straggler and len(procs) > 1 and rank == len(procs) - 1
            caps.cap(proc.pid, cores / SLOW_FACTOR if slow else cores)

    return cap


def slowdowns(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per system (each gossip encoding apart: its `variant`): the wall time to target
    (latest-accuracy rule) with the straggler over the all-equal run of the same repeat;
    median, min and max over the repeats where both reached the target; and those times."""
    out: dict[str, dict[str, Any]] = {}
    for system in dict.fromkeys(r["variant"] for r in rows):
        ratios = []
        for r in rows:
            if r["variant"] != system or not r["straggler"]:
                continue
            equal = next(
                e for e in rows
                if e["variant"] == system and e["repeat"] == r["repeat"] and not e["straggler"]
            )  # fmt: skip
            key = "wall_s_to_target_latest"
            if r.get(key) and equal.get(key):
                ratios.append(r[key] / equal[key])
        times = {
            variant: [r.get("wall_s_to_target_latest") for r in rows
                      if r["variant"] == system and r["straggler"] == slow]
            for variant, slow in (("equal", False), ("straggler", True))
        }  # fmt: skip
        out[system] = {
            "wall_s_to_target_latest": times,
            "pairs": len(ratios),
            "slowdown": {
                "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)
            } if ratios else None,
        }  # fmt: skip
    return out


def print_slowdowns(slow: dict[str, dict[str, Any]], cores: float) -> None:
    print(
        f"\nstraggler: every worker capped at {cores:g} cores, one at {cores / SLOW_FACTOR:.3g}; "
        "wall time to target (latest accuracies) over the all-equal run of the same repeat, "
        "median [min-max]"
    )
    for system, entry in slow.items():
        s = entry["slowdown"]
        cell = "-" if s is None else f"{s['median']:.2f}x [{s['min']:.2f}-{s['max']:.2f}]"
        print(f"{system:<12} {cell}  ({entry['pairs']} pairs)")
