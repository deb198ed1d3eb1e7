"""The schedule of a soak run: found the cluster, churn it, stop it node by node; sampling."""

from __future__ import annotations

import argparse
import random
import signal
import threading
from typing import Any

from bench.procs import rss_mb
from bench.report import fmt
from bench.soak.cluster import STARTUP_TIMEOUT_S, Cluster, Incarnation

CHURN_EVERY_S = (20.0, 40.0)  # seconds between two stops, uniform
RESTART_PAUSE_S = (2.0, 5.0)  # seconds between a node's exit and its restart, uniform
SAMPLE_EVERY_S = 5.0  # seconds between samples of RSS and JSON records
PRINT_EVERY = 6  # print a progress line every this many samples


def run(args: argparse.Namespace, cluster: Cluster, stopping: threading.Event) -> dict[str, Any]:
    """Found the cluster, churn it until --minutes, then stop it node by node; the raw facts."""
    rng = random.Random(args.seed)
    n = args.nodes
    churn_sig = signal.SIGKILL if args.mode == "kill" else signal.SIGTERM
    churn_how = "killed" if args.mode == "kill" else "left"
    events: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []

    def event(kind: str, inc: Incarnation, **more: Any) -> None:
        events.append({"t": round(cluster.now(), 3), "event": kind, "node": inc.tag, **more})

    # founders: all wait for the N-1 others, so none starts training (and makes a later
    # founder join with weight 0) before every founder has decided to found
    founder_wait = ["--wait-for-peers", str(n - 1), "--wait-timeout", str(STARTUP_TIMEOUT_S)]
    first = cluster.start(0, [], founder_wait)
    seed = first.poll_address(STARTUP_TIMEOUT_S)
    if seed is None:
        raise RuntimeError(f"node-0 did not start; see {first.stderr_path}")
    for slot in range(1, n):
        cluster.start(slot, [seed], founder_wait)
    for inc in list(cluster.current):
        assert inc is not None
        if inc.poll_address(STARTUP_TIMEOUT_S) is None:
            raise RuntimeError(f"{inc.name} did not start; see {inc.stderr_path}")
        event("started", inc, address=inc.address)

    # churn phase: one loop owns every process; it waits on a deadline, never on a sleep
    end = args.minutes * 60.0
    next_churn = rng.uniform(*CHURN_EVERY_S)
    next_sample = 0.0
    pending: dict[int, float] = {}  # slot -> run time of its restart
    while (now := cluster.now()) < end and not stopping.is_set():
        if now >= next_sample:
            samples.append(sample(cluster))
            if len(samples) % PRINT_EVERY == 1:
                print(progress_line(samples[-1], events), flush=True)
            next_sample = max(next_sample + SAMPLE_EVERY_S, now)
        for inc in list(cluster.current):
            if inc is None:
                continue
            if not inc.alive():  # nobody signalled it
                cluster.stop(inc, signal.SIGKILL, "exited-unexpectedly")
                event("exited-unexpectedly", inc, rc=inc.rc)
                pending[inc.slot] = now + rng.uniform(*RESTART_PAUSE_S)
            elif inc.address is None and now - inc.started_s > STARTUP_TIMEOUT_S:
                cluster.stop(inc, signal.SIGKILL, "startup-failed")
                event("startup-failed", inc)
                pending[inc.slot] = now + rng.uniform(*RESTART_PAUSE_S)
        for slot, at in sorted(pending.items()):
            live = cluster.live()
            if at <= now and live:
                del pending[slot]
                peer = rng.choice(live)
                inc = cluster.start(slot, [peer.address or ""], [])
                event("restarted", inc, peers=[peer.address])
        if now >= next_churn:
            live = cluster.live()
            if len(live) > args.min_alive:
                victim = rng.choice(live)
                rc = cluster.stop(victim, churn_sig, churn_how)
                event(churn_how, victim, rc=rc, exit_wait_s=victim.exit_wait_s)
                pending[victim.slot] = cluster.now() + rng.uniform(*RESTART_PAUSE_S)
                next_churn = cluster.now() + rng.uniform(*CHURN_EVERY_S)
            else:
                next_churn = now + 1.0  # a restart is due soon: try again then
        wake = min([next_sample, next_churn, end, *pending.values()])
        stopping.wait(max(0.0, min(wake - cluster.now(), 1.0)))
    samples.append(sample(cluster))
    print(progress_line(samples[-1], events), flush=True)

    # end: a node still starting is waited for, then every node leaves in turn; the last
    # one has nobody to hand to and keeps the whole remaining weight
    for inc in cluster.current:
        if inc is not None and inc.alive():
            inc.poll_address(STARTUP_TIMEOUT_S)
    order = [inc for inc in cluster.current if inc is not None]
    rng.shuffle(order)
    for inc in order:
        rc = cluster.stop(inc, signal.SIGTERM, "stopped-at-end")
        event("stopped-at-end", inc, rc=rc, exit_wait_s=inc.exit_wait_s)
    return {"events": events, "samples": samples, "stopped_at_end": [i.tag for i in order]}


def sample(cluster: Cluster) -> dict[str, Any]:
    """RSS and the latest JSON record of every live node, at one moment."""
    t = round(cluster.now(), 3)
    nodes: dict[str, Any] = {}
    for inc in cluster.current:
        if inc is None or not inc.alive():
            continue
        mb = rss_mb(inc.proc.pid)
        if mb is not None:
            inc.rss.append((t, mb))
        recs = inc.read_records(t)
        last = recs[-1] if recs else {}
        nodes[inc.name] = {
            "incarnation": inc.number,
            "rss_mb": None if mb is None else round(mb, 1),
            "step": last.get("step"),
            "weight": last.get("weight"),
            "test_accuracy": last.get("test_accuracy"),
        }
    return {"t": t, "nodes": nodes}


def progress_line(s: dict[str, Any], events: list[dict[str, Any]]) -> str:
    churn = sum(1 for e in events if e["event"] in ("killed", "left"))
    parts = [f"t={s['t']:6.0f}s churn {churn:3d}"]
    for name, v in sorted(s["nodes"].items()):
        acc, w = fmt(v["test_accuracy"], ".3f"), fmt(v["weight"], ".3f")
        rss, step = fmt(v["rss_mb"], ".0f"), fmt(v["step"], "")
        parts.append(f"{name}#{v['incarnation']} s{step} acc {acc} w {w} {rss}MB")
    return " | ".join(parts)
