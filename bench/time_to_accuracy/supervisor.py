"""The parent: runs one system at a time in fresh processes, says go when every worker is
ready, asks them to stop once the target is reached, and turns what they report into a row."""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import queue
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench.netns import free_ports, loopback_bytes
from bench.procs import reap
from bench.time_to_accuracy import links
from bench.time_to_accuracy.systems import (
    GOSSIP,
    READY_TIMEOUT_S,
    SETTINGS,
    WORKERS,
    Job,
    mean_accuracy,
    worker,
)

FINISH_GRACE_S = 60.0  # after a system's training deadline: evaluations, finish(), exit
FAILED_GRACE_S = 10.0  # after a worker failed: how long the others get before they are killed
POLL_S = 0.2  # the parent's wait for a worker's message before it checks on the processes


def curve(
    evals: dict[int, dict[int, tuple[float, float, int]]],
    world: int,
    tx0: int,
    per_worker: bool = False,
) -> list[dict[str, Any]]:
    """One point per step at which all `world` workers evaluated: their accuracies, the mean,
    the wall time (the slowest worker's training time) and the bytes: the shared loopback's
    since `tx0`, or with `per_worker` (shaped links) the sum of what each worker has sent."""
    points = []
    for step in sorted(evals):
        seen = evals[step]
        if len(seen) < world:
            continue
        accuracy = [seen[rank][1] for rank in range(world)]
        points.append(
            {
                "step": step,
                "accuracy": accuracy,
                "mean_accuracy": mean_accuracy(accuracy),
                "wall_s": max(seen[rank][0] for rank in range(world)),
                "bytes": (
                    sum(seen[rank][2] for rank in range(world))
                    if per_worker
                    else max(seen[rank][2] for rank in range(world)) - tx0
                ),
            }
        )
    return points


def latest_hit(
    evals: dict[int, dict[int, tuple[float, float, int]]], world: int, target: float
) -> float | None:
    """The training time at which the mean of every worker's latest test accuracy first
    reaches `target` (each worker counted from its first evaluation on); None if it never does.
    The rule for unequal workers: a slow worker's old evaluation counts until its next one,
    where the step rule (curve) would wait for the slowest worker to reach the same step."""
    timeline = sorted(
        (train_s, rank, accuracy)
        for seen in evals.values()
        for rank, (train_s, accuracy, _) in seen.items()
    )
    latest: dict[int, float] = {}
    for train_s, rank, accuracy in timeline:
        latest[rank] = accuracy
        if len(latest) == world and mean_accuracy([latest[r] for r in range(world)]) >= target:
            return train_s
    return None


@dataclass
class Outcome:
    """What the parent heard from one system's workers."""

    evals: dict[int, dict[int, tuple[float, float, int]]]  # step -> rank -> (train_s, acc, tx)
    done: dict[int, dict[str, Any]]  # rank -> the worker's final facts
    errors: dict[int, str]  # rank (-1: the parent) -> traceback or reason
    tx_at_go: int | None  # loopback tx bytes when training started; None: it never did


def supervise(
    procs: list[Any],
    events: Any,
    go: Any,
    stop: Any,
    args: argparse.Namespace,
    traffic: Callable[[], tuple[int, int]] = loopback_bytes,
    ready: Callable[[list[Any]], None] | None = None,
    evaluate: Any = None,
) -> Outcome:
    """Start `procs`, say go once all are ready (first calling `ready(procs)`, e.g. to cap
    their CPU), ask them to stop once the mean accuracy at a
    step reaches the target, and collect their messages until each has reported, failed or
    outlived its deadline (then it is killed). With deferred evaluation, set `evaluate` once
    every worker has trained (or failed). Never waits longer than READY_TIMEOUT_S plus the
    training timeout plus FINISH_GRACE_S."""
    world = len(procs)
    out = Outcome({}, {}, {}, None)
    ready_ranks: set[int] = set()
    trained: set[int] = set()
    silent_since: dict[int, float] = {}
    give_up = time.monotonic() + READY_TIMEOUT_S

    def failed(rank: int, why: str) -> None:
        nonlocal give_up
        out.errors[rank] = why
        stop.set()
        give_up = min(give_up, time.monotonic() + FAILED_GRACE_S)

    for proc in procs:
        proc.start()
    try:
        while len(out.done) + len(out.errors) < world:
            now = time.monotonic()
            if now > give_up:
                out.errors[-1] = (
                    f"deadline passed while {'training' if go.is_set() else 'starting'}"
                )
                break
            try:
                kind, rank, body = events.get(timeout=POLL_S)
            except queue.Empty:
                # a worker gone without a word (killed, crashed in C): its last message gets a
                # moment to arrive, then it counts as failed
                gone = {r for r, proc in enumerate(procs) if proc.exitcode is not None}
                for rank in gone - set(out.done) - set(out.errors):
                    if now - silent_since.setdefault(rank, now) > 2 * POLL_S:
                        failed(rank, f"exited with code {procs[rank].exitcode}, no report")
                continue
            if kind == "ready":
                ready_ranks.add(rank)
                if len(ready_ranks) == world:
                    if ready is not None:
                        ready(procs)
                    out.tx_at_go = traffic()[1]
                    go.set()
                    give_up = time.monotonic() + args.timeout_s + FINISH_GRACE_S
            elif kind == "eval":
                step, train_s, accuracy, tx = body
                seen = out.evals.setdefault(step, {})
                seen[rank] = (train_s, accuracy, tx)
                if (
                    len(seen) == world
                    and sum(a for _, a, _ in seen.values()) >= args.target * world
                ):
                    stop.set()  # gossip nodes stop at their next evaluation
            elif kind == "trained":
                trained.add(rank)
            elif kind == "done":
                out.done[rank] = body
            else:
                failed(rank, body)
            if evaluate is not None and len(trained | set(out.errors)) >= world:
                evaluate.set()
    finally:
        stop.set()
        for name in reap(procs, FAILED_GRACE_S if out.errors else FINISH_GRACE_S):
            out.errors.setdefault(-1, f"killed {name}, still running after the grace period")
    return out


def run_system(
    system: str,
    args: argparse.Namespace,
    device: str,
    repeat: int = 0,
    encoding: str = "fp32",
    ready: Callable[[list[Any]], None] | None = None,
) -> dict[str, Any]:
    """Train `system` once in fresh processes (seeds of `repeat`; gossip pushes in `encoding`);
    returns its row of results. With args.link_mbit every worker runs in its namespace of
    links.ShapedLinks (made by the caller), and bytes are counted on those links.
    `ready(procs)` is called once its workers are ready, before they start training."""
    world = 1 if system == "sgd" else WORKERS
    shaped = bool(getattr(args, "link_mbit", 0))

    def traffic() -> tuple[int, int]:
        return links.link_bytes(world) if shaped else loopback_bytes()

    ports = free_ports(world if system in GOSSIP else 1 if system == "ddp" else 0)
    settings = {name: getattr(args, name) for name in SETTINGS}
    gpus = torch.cuda.device_count() if device == "cuda" else 0  # workers share them round-robin
    jobs = [
        Job(
            system,
            rank,
            world,
            ports,
            f"cuda:{rank % gpus}" if gpus else "cpu",
            **settings,
            repeat=repeat,
            encoding=encoding,
            netns=links.namespace(rank) if shaped else "",
        )
        for rank in range(world)
    ]
    ctx = mp.get_context("spawn")
    events, go, stop, evaluate = ctx.Queue(), ctx.Event(), ctx.Event(), ctx.Event()
    procs = [
        # daemons: a parent that exits early takes them along (one killed outright leaves
        # them to stop by themselves at their next evaluation)
        ctx.Process(
            target=worker,
            args=(job, events, go, stop, evaluate),
            name=f"{system}-{job.rank}",
            daemon=True,
        )
        for job in jobs
    ]
    rx0, tx0 = traffic()
    out = supervise(procs, events, go, stop, args, traffic, ready, evaluate)
    rx1, tx1 = traffic()

    tx_at_go = tx0 if out.tx_at_go is None else out.tx_at_go
    points = curve(out.evals, world, tx_at_go, per_worker=shaped)
    hit = next((pt for pt in points if pt["mean_accuracy"] >= args.target), None)
    best = max(points, key=lambda pt: pt["mean_accuracy"], default=None)
    finals = [out.done[rank] for rank in sorted(out.done)]
    row: dict[str, Any] = {
        "system": system,
        "repeat": repeat,
        "variant": system if system not in GOSSIP or encoding == "fp32" else f"{system}-{encoding}",
        "label": f"{system} p={args.p:g}{_suffix(encoding)}" if system in GOSSIP else system,
        "schedule": GOSSIP.get(system),
        "encoding": encoding if system in GOSSIP else None,
        "link_mbit": getattr(args, "link_mbit", 0) or None,
        "workers": world,
        "device": jobs[0].device.split(":")[0],
        "reached": hit is not None,
        "wall_s_to_target": hit["wall_s"] if hit else None,
        "steps_to_target": hit["step"] if hit else None,
        "bytes_to_target": hit["bytes"] if hit else None,
        "best_accuracy": best["mean_accuracy"] if best else None,
        "best_step": best["step"] if best else None,
        "final_accuracy": (
            sum(f["accuracy"] for f in finals) / world if len(finals) == world else None
        ),
        "steps_done": [f["steps"] for f in finals],
        "eval_s": [f["eval_s"] for f in finals],
        "setup_bytes": tx_at_go - tx0,
        "training_bytes": tx1 - tx_at_go,
        "total_bytes": tx1 - tx0,
        "total_rx_bytes": rx1 - rx0,
        "curve": points,
        "wall_s_to_target_latest": latest_hit(out.evals, world, args.target),
        "errors": [
            f"worker {r}: {text.strip().splitlines()[-1]}" for r, text in out.errors.items()
        ],
    }
    if system in GOSSIP and finals:
        row["final_weights"] = [f["weight"] for f in finals]
        row["weight_sum"] = math.fsum(row["final_weights"])
        for key in (
            "founders", "pushes_acked", "pushes_returned", "payload_bytes_sent",
            "pushes_skipped_budget",
        ):  # fmt: skip
            row[key] = sum(f[key] for f in finals)
    for rank, text in out.errors.items():
        print(f"{system} worker {rank} failed:\n{text}", file=sys.stderr)
    return row


def _suffix(encoding: str) -> str:
    return "" if encoding == "fp32" else f" {encoding}"
