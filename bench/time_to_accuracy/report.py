"""The tables a run prints, its summary over repeats, and the ratios to DDP."""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from bench.report import fmt

RULE = (
    "target reached at the first evaluation step k where the mean test accuracy of the "
    "workers' models is >= target; wall time = when the slowest worker finished step k, "
    "evaluation time excluded; bytes = loopback tx bytes (with shaped links: the sum of the "
    "workers' link tx bytes) from the start of training"
)


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def ratios_vs_ddp(rows: list[dict[str, Any]]) -> None:
    """Add each row's wall time and bytes to the target as ratios to the DDP row of the same
    repeat (None without DDP in the run, or when one of the two did not reach the target)."""
    base = next((r for r in rows if r["system"] == "ddp"), {})
    for r in rows:
        r["wall_ratio_vs_ddp"] = _ratio(r["wall_s_to_target"], base.get("wall_s_to_target"))
        r["bytes_ratio_vs_ddp"] = _ratio(r["bytes_to_target"], base.get("bytes_to_target"))


def summarize(rows: list[dict[str, Any]], systems: list[str]) -> dict[str, dict[str, Any]]:
    """Per system (each gossip encoding apart: its `variant`), over the repeats: how many
    reached the target, and the median, min and max of steps, wall time, bytes, the ratios to
    DDP (each against the DDP run of the same repeat) over the repeats that reached it, and of
    the final accuracy over all of them."""
    keys = ("steps_to_target", "wall_s_to_target", "bytes_to_target", "wall_ratio_vs_ddp",
            "bytes_ratio_vs_ddp", "final_accuracy")  # fmt: skip
    summary: dict[str, dict[str, Any]] = {}
    variants = list(dict.fromkeys(r["variant"] for s in systems for r in rows if r["system"] == s))
    for system in variants:
        mine = [r for r in rows if r["variant"] == system]
        entry: dict[str, Any] = {"runs": len(mine), "reached": sum(r["reached"] for r in mine)}
        for key in keys:
            values = [r[key] for r in mine if r[key] is not None]
            entry[key] = (
                {"median": statistics.median(values), "min": min(values), "max": max(values)}
                if values
                else None
            )
        summary[system] = entry
    return summary


def print_summary(summary: dict[str, dict[str, Any]], repeats: int) -> None:
    print(f"\nover {repeats} repeats: median [min - max] over the repeats that reached the target")
    print(
        f"{'system':<12} {'reached':>7} {'steps':>16} {'wall s':>19} {'MB':>22} "
        f"{'wall/DDP':>19} {'bytes/DDP':>22} {'final acc':>22}"
    )

    def cell(stat: dict[str, float] | None, spec: str, scale: float = 1.0) -> str:
        if stat is None:
            return "-"
        lo, mid, hi = (format(stat[k] * scale, spec) for k in ("min", "median", "max"))
        return f"{mid} [{lo}-{hi}]"

    for system, entry in summary.items():
        print(
            f"{system:<12} {entry['reached']:>3}/{entry['runs']:<3} "
            f"{cell(entry['steps_to_target'], '.0f'):>16} "
            f"{cell(entry['wall_s_to_target'], '.2f'):>19} "
            f"{cell(entry['bytes_to_target'], '.2f', 1e-6):>22} "
            f"{cell(entry['wall_ratio_vs_ddp'], '.2f'):>19} "
            f"{cell(entry['bytes_ratio_vs_ddp'], '.3f'):>22} "
            f"{cell(entry['final_accuracy'], '.4f'):>22}"
        )


def print_table(
    rows: list[dict[str, Any]], args: argparse.Namespace, counting: str, repeat: int = 0
) -> None:
    seeds = f" (repeat {repeat})" if args.repeats > 1 else ""
    print(
        f"\ntime to {args.target:g} test accuracy{seeds}: {args.model} on {args.dataset}, batch "
        f"{args.batch_size}/worker, lr {args.lr:g}, momentum {args.momentum:g}, "
        f"max {args.max_steps} steps, eval every {args.eval_every}"
        f"{' (deferred)' if args.defer_eval else ''}, {args.threads} thread(s)/worker"
    )
    print(
        f"{'system':<19} {'workers':>7} {'wall s':>8} {'steps':>6} {'final acc':>9} "
        f"{'best acc':>8} {'MB to target':>12} {'MB total':>9} {'wall/DDP':>9} {'bytes/DDP':>9} "
        f"{'eval s':>7}"
    )
    for r in rows:
        mb = r["bytes_to_target"] / 1e6 if r["reached"] else None
        print(
            f"{r['label']:<19} {r['workers']:>7} {fmt(r['wall_s_to_target'], '.2f'):>8} "
            f"{fmt(r['steps_to_target'], 'd'):>6} {fmt(r['final_accuracy'], '.4f'):>9} "
            f"{fmt(r['best_accuracy'], '.4f'):>8} {fmt(mb, '.3f'):>12} "
            f"{r['total_bytes'] / 1e6:>9.3f} {fmt(r['wall_ratio_vs_ddp'], '.2f', 'x'):>9} "
            f"{fmt(r['bytes_ratio_vs_ddp'], '.3f', 'x'):>9} {max(r['eval_s'], default=0):>7.2f}"
        )
    for r in rows:
        if not r["reached"]:
            print(
                f"{r['label']}: did not reach {args.target:g} in {max(r['steps_done'], default=0)}"
                f" steps; best mean accuracy {fmt(r['best_accuracy'], '.4f')}"
                f" at step {fmt(r['best_step'], 'd')}"
            )
        for err in r["errors"]:
            print(f"{r['label']}: FAILED {err}")
        if "weight_sum" in r:
            print(
                f"{r['label']}: final weights {[round(w, 6) for w in r['final_weights']]} "
                f"sum {r['weight_sum']:.12g}; {r['pushes_acked']} pushes acked, "
                f"{r['payload_bytes_sent'] / 1e6:.3f} MB of state sent"
            )
    print(f"rule: {RULE}")
    print(
        "final acc: mean over the workers when they stopped (gossip: after finish()); "
        "best acc: best mean at a step all workers evaluated; eval s: the most any worker spent "
        "evaluating (not in wall s)"
    )
    print(f"bytes: /proc/net/dev, {counting}; MB total includes setup and shutdown")
