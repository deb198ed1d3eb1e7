"""What a soak run comes to: the weight checks, resumes, RSS growth and accuracy, per node."""

from __future__ import annotations

import argparse
import re
from collections import Counter
from typing import Any

from bench.soak.cluster import Cluster, Incarnation

RSS_TARGET = 0.10  # the issue's target: RSS grows less than this after warm-up
ACCURACY_TARGET = 0.95  # the issue's target test accuracy
EXACT = 1e-9  # tolerance of the weight checks

_TEMPLATE = re.compile(r"\d+(\.\d+)?(e-?\d+)?")


def log_issues(inc: Incarnation) -> dict[str, Any]:
    """Tracebacks and WARNING/ERROR lines of an incarnation's stderr, numbers blanked out."""
    text = inc.stderr_path.read_text(errors="replace") if inc.stderr_path.exists() else ""
    lines = text.splitlines()
    kinds: Counter[str] = Counter()
    for line in lines:
        for level in (" WARNING ", " ERROR ", " CRITICAL "):
            if level in line:
                msg = line.split(level, 1)[1]
                kinds[level.strip() + " " + _TEMPLATE.sub("N", msg)[:160]] += 1
    tracebacks = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
    excerpts = ["\n".join(lines[i : i + 40]) for i in tracebacks[:3]]
    leaves = re.findall(r"weight (\S+) leaves with us", text)
    return {
        "tracebacks": len(tracebacks),
        "traceback_excerpts": excerpts,
        "messages": dict(kinds),
        "founded": "(founder," in text,
        "joined": "(joined," in text,
        "leaves_with_us": [float(w) for w in leaves],
    }


def rss_growth(points: list[tuple[float, float]], after: float) -> dict[str, Any] | None:
    """RSS at the first point at or after `after` s, the max from there, and the growth."""
    later = [(t, mb) for t, mb in points if t >= after]
    if not later:
        return None
    base = later[0][1]
    peak = max(mb for _, mb in later)
    return {"at_s": later[0][0], "base_mb": base, "max_mb": peak, "growth": peak / base - 1}


def summarise(args: argparse.Namespace, cluster: Cluster, raw: dict[str, Any]) -> dict[str, Any]:
    """Checks and per-node figures from what the run recorded."""
    n = args.nodes
    incs = cluster.history
    for inc in incs:
        inc.read_records(cluster.now())
    issues = {inc.tag: log_issues(inc) for inc in incs}

    # the exact final total: final records of the incarnations stopped at the end
    at_end = sorted(
        (inc for inc in incs if inc.how.startswith("stopped-at-end")),
        key=lambda inc: inc.ended_s or 0.0,
    )  # in the order they left: the last one kept the total
    finals: dict[str, float | None] = {}
    for inc in at_end:
        recs = [r for r in inc.records if r.get("final")]
        finals[inc.tag] = recs[-1]["weight"] if len(recs) == 1 else None
    total = sum(w for w in finals.values() if w is not None)
    last = at_end[-1] if at_end else None
    kept = issues[last.tag]["leaves_with_us"] if last else []

    churned = [inc for inc in incs if inc.how in ("killed", "left")]
    restarts = [inc for inc in incs if inc.number > 0]
    # a churn leave that found no taker keeps its weight (lost to the cluster): report it
    left_with = {
        inc.tag: r["weight"]
        for inc in churned
        for r in inc.records
        if r.get("final") and r["weight"] != 0.0
    }

    checks: dict[str, bool] = {
        "every_node_at_end_wrote_one_final_record": all(w is not None for w in finals.values()),
        "no_restart_founded": not any(issues[inc.tag]["founded"] for inc in restarts),
        "no_unexpected_exit": not any(
            inc.how in ("exited-unexpectedly", "startup-failed") or "hung" in inc.how
            for inc in incs
        ),
        "graceful_exits_status_0": all(
            inc.rc == 0 for inc in incs if inc.how in ("left", "stopped-at-end")
        ),
        "last_node_kept_its_weight": bool(kept) and abs(kept[-1] - total) <= 1e-5 * max(1, total),
    }
    if args.mode == "term":
        checks["total_equals_n"] = abs(total - n) <= EXACT
    else:
        checks["total_not_invented"] = total <= n + EXACT
        checks["total_positive"] = total > 0

    # resumes: a restart starts at (about) the step its predecessor had checkpointed
    resumes: list[dict[str, Any]] = []
    for inc in restarts:
        prev = next(p for p in incs if p.slot == inc.slot and p.number == inc.number - 1)
        prev_step = prev.records[-1]["step"] if prev.records else 0
        first_step = inc.records[0]["step"] if inc.records else None
        resumes.append(
            {
                "node": inc.tag,
                "prev_last_logged_step": prev_step,
                "resumed_step": first_step,
                "regressed": first_step is not None and first_step < (prev_step // 100 - 1) * 100,
                "first_weight": inc.records[0]["weight"] if inc.records else None,
            }
        )
    checks["no_resume_regressed"] = not any(r["regressed"] for r in resumes)

    # per slot: RSS after warm-up (over the run, and within each incarnation), accuracy
    per_node: list[dict[str, Any]] = []
    for slot in range(n):
        mine = [inc for inc in incs if inc.slot == slot]
        # over the run: samples of warm incarnations only (a fresh process is smaller)
        run_points = sorted(
            (t, mb) for inc in mine for t, mb in inc.rss if t - inc.started_s >= args.warmup
        )
        run_rss = rss_growth(run_points, args.warmup)
        inc_rss = {
            inc.tag: g
            for inc in mine
            if (g := rss_growth(inc.rss, inc.started_s + args.warmup)) is not None
        }
        worst = max(inc_rss.items(), key=lambda kv: kv[1]["growth"], default=None)
        recs = [r for inc in mine for r in inc.records]
        best = max(recs, key=lambda r: r["test_accuracy"], default=None)
        last_recs = mine[-1].records
        per_node.append(
            {
                "node": f"node-{slot}",
                "incarnations": len(mine),
                "rss_run": run_rss,
                "rss_incarnations": inc_rss,
                "rss_worst_incarnation": None if worst is None else worst[0],
                "final_accuracy": last_recs[-1]["test_accuracy"] if last_recs else None,
                "final_step": last_recs[-1]["step"] if last_recs else None,
                "max_accuracy": None if best is None else best["test_accuracy"],
            }
        )

    growths = [g["growth"] for node in per_node for g in node["rss_incarnations"].values()]
    run_growths = [node["rss_run"]["growth"] for node in per_node if node["rss_run"]]
    accs = [
        (r["test_accuracy"], seen, inc.tag, r["step"])
        for inc in incs
        for r, seen in zip(inc.records, inc.seen_s, strict=True)
    ]
    reached = min(
        ((seen, tag, step) for a, seen, tag, step in accs if a >= ACCURACY_TARGET), default=None
    )
    return {
        "mode": args.mode,
        "minutes": args.minutes,
        "nodes": n,
        "seed": args.seed,
        "restart_ids": args.restart_ids,
        "out": str(args.out),
        "churn": len(churned),
        "restarts": len(restarts),
        "final_total_weight": total,
        "final_weights": finals,
        "last_node": None if last is None else last.tag,
        "last_node_logged_kept": kept,
        "churn_leaves_that_kept_weight": left_with,
        "checks": checks,
        "targets": {
            "rss_growth_incarnation_max": max(growths, default=None),
            "rss_growth_run_max": max(run_growths, default=None),
            "rss_met": bool(growths) and max(growths) < RSS_TARGET,
            "max_accuracy": max((a for a, *_ in accs), default=None),
            "accuracy_reached_seen_at_s": None if reached is None else reached[0],
            "accuracy_reached_by": None if reached is None else reached[1],
            "accuracy_reached_at_step": None if reached is None else reached[2],
            "accuracy_met": reached is not None,
        },
        "per_node": per_node,
        "resumes": resumes,
        "incarnations": [
            {
                "node": inc.tag,
                "started_s": round(inc.started_s, 3),
                "ended_s": inc.ended_s,
                "how": inc.how,
                "rc": inc.rc,
                "exit_wait_s": inc.exit_wait_s,
                "address": inc.address,
                "records": len(inc.records),
                "first_step": inc.records[0]["step"] if inc.records else None,
                "last_step": inc.records[-1]["step"] if inc.records else None,
                "stderr": issues[inc.tag],
            }
            for inc in incs
        ],
        **raw,
    }
