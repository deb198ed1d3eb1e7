"""The table a soak run prints from its summary."""

from __future__ import annotations

from collections import Counter
from typing import Any

from bench.report import fmt
from bench.soak.summary import ACCURACY_TARGET, RSS_TARGET


def _pct(g: dict[str, Any] | None, key: str = "growth") -> str:
    return "-" if g is None else f"{100 * g[key]:+.1f}%"


def print_table(s: dict[str, Any]) -> None:
    verb = "kill -9" if s["mode"] == "kill" else "SIGTERM leaves"
    t = s["targets"]
    print(
        f"\nsoak: mode {s['mode']}, {s['minutes']:g} min, {s['nodes']} nodes, seed {s['seed']}, "
        f"restarts reuse the node id: {s['restart_ids'] == 'same'}"
    )
    print(f"churn: {s['churn']} {verb}, {s['restarts']} restarts")
    bound = "must equal N" if s["mode"] == "term" else "must be <= N"
    print(
        f"final total weight {s['final_total_weight']!r} vs N = {s['nodes']} ({bound}); "
        f"held by {s['last_node']} at the end, its log: {s['last_node_logged_kept']}"
    )
    print(
        f"{'node':8}{'incs':>5}{'RSS@warm MB':>13}{'max MB':>9}{'growth':>9}"
        f"{'worst inc':>11}{'final acc':>11}{'max acc':>9}{'steps':>8}"
    )
    for node in s["per_node"]:
        r = node["rss_run"]
        worst = node["rss_worst_incarnation"]
        wg = node["rss_incarnations"][worst] if worst else None
        print(
            f"{node['node']:8}{node['incarnations']:>5}"
            f"{fmt(r and r['base_mb'], '.1f'):>13}{fmt(r and r['max_mb'], '.1f'):>9}"
            f"{_pct(r):>9}{_pct(wg):>11}"
            f"{fmt(node['final_accuracy'], '.4f'):>11}{fmt(node['max_accuracy'], '.4f'):>9}"
            f"{fmt(node['final_step'], 'd'):>8}"
        )
    inc_max = t["rss_growth_incarnation_max"]
    print(
        f"RSS growth after {s['warmup']:g} s warm-up, worst incarnation: "
        f"{fmt(inc_max and 100 * inc_max, '+.1f')}% (target < {100 * RSS_TARGET:.0f}%: "
        f"{'met' if t['rss_met'] else 'NOT met'}); per slot over the run: "
        f"{fmt(t['rss_growth_run_max'] and 100 * t['rss_growth_run_max'], '+.1f')}%"
    )
    print(
        f"accuracy: max {fmt(t['max_accuracy'], '.4f')}, target {ACCURACY_TARGET} "
        + (
            f"reached by {t['accuracy_reached_by']} at step {t['accuracy_reached_at_step']} "
            f"(read at t = {t['accuracy_reached_seen_at_s']:.0f} s)"
            if t["accuracy_met"]
            else "NOT reached"
        )
    )
    tracebacks = sum(i["stderr"]["tracebacks"] for i in s["incarnations"])
    messages: Counter[str] = Counter()
    for inc in s["incarnations"]:
        messages.update(inc["stderr"]["messages"])
    print(f"node stderr: {tracebacks} traceback(s); warnings/errors by kind:")
    for msg, count in messages.most_common(12):
        print(f"  {count:5d}  {msg}")
    for name, ok in s["checks"].items():
        print(f"check {name}: {'ok' if ok else 'FAILED'}")
