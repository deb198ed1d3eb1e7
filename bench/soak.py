"""Soak test: a local gosgd-node cluster under churn for minutes; weight, memory and accuracy.

Starts N `gosgd-node` daemons on 127.0.0.1 (founders, all with weight 1), then every 20-40 s
(seeded) stops a random live node, with kill -9 (`--mode kill`) or SIGTERM (`--mode term`,
a graceful leave that hands the whole weight to a live peer), waits until it has exited, and
after a short pause restarts it with the same node id (`--restart-ids new`: a fresh one) and
checkpoint folder, seeded with a live node's address: it resumes its step and optimizer state
and rejoins with weight 0 through FetchState. At least `--min-alive` (3) nodes stay up. Every
~5 s it samples each live node's RSS (VmRSS) and its latest JSON record. The founders all wait
for their N-1 peers before training: a founder that trained early would make a later one join
with weight 0 instead of founding with 1.

The exact final total. Nodes run with a step budget that outlasts the run, so none finishes
by itself. At the end the nodes leave one at a time by SIGTERM, each waited for: every leave
hands the node's whole weight to a survivor (exact, the receiver merges it like any message),
and the last node, with no live peer left, keeps its weight ("weight X leaves with us" in its
stderr) and writes it in its final JSON record. The final total is therefore the sum of the
final-record weights of the incarnations stopped at the end (all 0 but the last one's). In
term mode it must equal N (within 1e-9); in kill mode it may only have dropped (<= N), by the
weights the kill -9ed incarnations held.

Also checked: no restart founds (which would invent weight), no node exits unexpectedly, the
stderr logs hold no traceback; and reported against the issue's targets: RSS grows < 10% after
warm-up, and test accuracy reaches 0.95.

Usage: python bench/soak.py --nodes 6 --minutes 10 --mode kill [--seed 0] [--out runs/soak-kill]
Writes <out>/soak.json and prints a table; the node logs are <out>/<slot>-<incarnation>.{jsonl,
err,out}. Exit status 1 when a weight check fails.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

CHURN_EVERY_S = (20.0, 40.0)  # seconds between two stops, uniform
RESTART_PAUSE_S = (2.0, 5.0)  # seconds between a node's exit and its restart, uniform
SAMPLE_EVERY_S = 5.0  # seconds between samples of RSS and JSON records
PRINT_EVERY = 6  # print a progress line every this many samples
STARTUP_TIMEOUT_S = 180.0  # longest wait for a node to print its address
EXIT_TIMEOUT_S = 300.0  # longest wait for a node to exit after a signal (drain is 120 s)
HUGE_STEPS = 10**9  # a step budget that outlasts any run: nodes never finish by themselves
RSS_TARGET = 0.10  # the issue's target: RSS grows less than this after warm-up
ACCURACY_TARGET = 0.95  # the issue's target test accuracy
EXACT = 1e-9  # tolerance of the weight checks

NODE_FLAGS = [
    "--no-mdns",
    "--model", "cnn",
    "--dataset", "digits",
    "--p", "0.1",
    "--threads", "1",
    "--eval-every", "50",
    "--checkpoint-every", "100",
    "--steps", str(HUGE_STEPS),
    "--listen", "127.0.0.1:0",
]  # fmt: skip


try:  # loaded here, not in the forked child, where only async-signal-safe work is wise
    _PRCTL: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _PRCTL = None


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when this script dies, even by kill -9 (Linux)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def rss_mb(pid: int, field: str = "VmRSS") -> float | None:
    """VmRSS (or `field`, e.g. VmHWM: the peak) of process `pid` in MB (2**20 bytes); None when
    it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


@dataclass
class Incarnation:
    """One gosgd-node process of a slot; its stdout is pumped to a file by a reader thread."""

    slot: int
    number: int
    proc: subprocess.Popen[str]
    started_s: float  # run-relative start time
    log_json: Path
    stderr_path: Path
    stdout_path: Path
    _stderr: IO[str]
    address: str | None = None
    ended_s: float | None = None
    how: str = ""  # killed | left | stopped-at-end | exited-unexpectedly | startup-failed
    rc: int | None = None
    exit_wait_s: float | None = None  # from the signal to the exit
    records: list[dict[str, Any]] = field(default_factory=list)
    seen_s: list[float] = field(default_factory=list)  # run time each record was first read
    rss: list[tuple[float, float]] = field(default_factory=list)  # (run time s, MB)
    _addresses: queue.Queue[str | None] = field(default_factory=queue.Queue)
    _offset: int = 0  # bytes of log_json already parsed
    _reader: threading.Thread | None = None

    @property
    def name(self) -> str:
        return f"node-{self.slot}"

    @property
    def tag(self) -> str:
        return f"{self.name}-{self.number}"

    def pump_stdout(self) -> None:
        """Reader thread: copy stdout to a file; hand the announced address to the queue."""
        assert self.proc.stdout is not None
        with open(self.stdout_path, "w") as out:
            for line in self.proc.stdout:
                out.write(line)
                out.flush()
                if " listening on " in line:
                    self._addresses.put(line.rsplit(" ", 1)[1].strip())
        self._addresses.put(None)  # EOF: the process has exited

    def poll_address(self, timeout: float | None = None) -> str | None:
        """The address once announced; waits up to `timeout` s (None: does not wait)."""
        if self.address is None:
            try:
                got = (
                    self._addresses.get(timeout=timeout)
                    if timeout
                    else self._addresses.get_nowait()
                )
            except queue.Empty:
                return None
            if got is None:
                self._addresses.put(None)  # keep the EOF mark for later polls
            self.address = got
        return self.address

    def alive(self) -> bool:
        return self.proc.poll() is None

    def read_records(self, now_s: float) -> list[dict[str, Any]]:
        """Parse the JSON lines appended since the last call (complete lines only)."""
        if not self.log_json.exists():
            return self.records
        with open(self.log_json, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            if line.strip():
                self.records.append(json.loads(line))
                self.seen_s.append(round(now_s, 3))
        self._offset += end
        return self.records

    def wait_exit(self, timeout: float, now: Callable[[], float]) -> int | None:
        """Wait for the exit; None (after a SIGKILL) when it took longer than `timeout` s."""
        try:
            self.rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.rc = None
        self.close(now())
        return self.rc

    def close(self, now_s: float) -> None:
        if self._reader is not None:
            self._reader.join(10)
        self._stderr.close()
        self.read_records(now_s)


class Cluster:
    """The node processes of a soak run, started and stopped from the main thread only."""

    def __init__(self, out: Path, nodes: int, cluster: str, new_ids: bool) -> None:
        self.out = out
        self.new_ids = new_ids  # a restart gets node id node-<slot>.<incarnation>
        self.nodes = nodes
        self.cluster = cluster
        self.t0 = time.monotonic()
        self.current: list[Incarnation | None] = [None] * nodes
        self.history: list[Incarnation] = []

    def now(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.t0

    def start(self, slot: int, peers: list[str], extra: list[str]) -> Incarnation:
        number = sum(1 for inc in self.history if inc.slot == slot)
        tag = f"node-{slot}-{number}"
        node_id = f"node-{slot}.{number}" if self.new_ids and number else f"node-{slot}"
        cmd = [
            sys.executable, "-m", "gosgd_p2p.cli",
            "--node-id", node_id,
            "--cluster", self.cluster,
            "--checkpoint-dir", str(self.out / f"ckpt-node-{slot}"),
            "--log-json", str(self.out / f"{tag}.jsonl"),
            *NODE_FLAGS,
            *extra,
        ]  # fmt: skip
        if peers:
            cmd += ["--peers", ",".join(peers)]
        stderr_path = self.out / f"{tag}.err"
        stderr = open(stderr_path, "w")  # noqa: SIM115 - closed by Incarnation.close
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            preexec_fn=_die_with_parent,
        )
        inc = Incarnation(
            slot=slot,
            number=number,
            proc=proc,
            started_s=self.now(),
            log_json=self.out / f"{tag}.jsonl",
            stderr_path=stderr_path,
            stdout_path=self.out / f"{tag}.out",
            _stderr=stderr,
        )
        inc._reader = threading.Thread(target=inc.pump_stdout, name=f"soak-{tag}", daemon=True)
        inc._reader.start()
        self.history.append(inc)
        self.current[slot] = inc
        return inc

    def live(self) -> list[Incarnation]:
        """Running incarnations that have announced their address."""
        return [
            inc for inc in self.current if inc and inc.alive() and inc.poll_address() is not None
        ]

    def stop(self, inc: Incarnation, sig: int, how: str) -> int | None:
        """Send `sig` and wait for the exit; the slot is then empty."""
        sent = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            inc.proc.send_signal(sig)
        inc.wait_exit(EXIT_TIMEOUT_S, self.now)
        inc.exit_wait_s = round(time.monotonic() - sent, 3)
        inc.ended_s = round(self.now(), 3)
        inc.how = how if inc.rc is not None else f"{how} (hung: SIGKILLed)"
        self.current[inc.slot] = None
        return inc.rc

    def kill_all(self) -> None:
        """Last resort (finally/atexit): SIGKILL every process still running."""
        for inc in self.history:
            if inc.proc.poll() is None:
                inc.proc.kill()
                inc.proc.wait()
                inc.how = inc.how or "killed-at-cleanup"
            with contextlib.suppress(Exception):
                inc.close(self.now())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--nodes", type=int, default=6, help="cluster size N (>= min-alive + 1)")
    p.add_argument("--minutes", type=float, default=10.0, help="length of the churn phase")
    p.add_argument("--mode", choices=["kill", "term"], required=True, help="SIGKILL or SIGTERM")
    p.add_argument("--seed", type=int, default=0, help="seeds the churn schedule")
    p.add_argument("--out", type=Path, default=None, help="output folder (new or empty)")
    p.add_argument("--min-alive", type=int, default=3, help="never stop below this many nodes")
    p.add_argument(
        "--restart-ids",
        choices=["same", "new"],
        default="same",
        help="a restart reuses its node id, or takes node-<slot>.<incarnation> (same checkpoint)",
    )
    p.add_argument("--warmup", type=float, default=120.0, help="seconds before the RSS baseline")
    args = p.parse_args(argv)
    if args.nodes <= args.min_alive:
        p.error(f"--nodes {args.nodes}: need more than --min-alive {args.min_alive} to churn")
    if args.out is None:
        args.out = Path("runs") / f"soak-{args.mode}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.out.exists() and any(args.out.iterdir()):
        p.error(f"--out {args.out} is not empty (old checkpoints would be resumed): delete it")
    return args


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
        acc = "-" if v["test_accuracy"] is None else f"{v['test_accuracy']:.3f}"
        w = "-" if v["weight"] is None else f"{v['weight']:.3f}"
        rss = "-" if v["rss_mb"] is None else f"{v['rss_mb']:.0f}"
        step = "-" if v["step"] is None else v["step"]
        parts.append(f"{name}#{v['incarnation']} s{step} acc {acc} w {w} {rss}MB")
    return " | ".join(parts)


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


def _pct(g: dict[str, Any] | None, key: str = "growth") -> str:
    return "-" if g is None else f"{100 * g[key]:+.1f}%"


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


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
            f"{_num(r and r['base_mb'], '.1f'):>13}{_num(r and r['max_mb'], '.1f'):>9}"
            f"{_pct(r):>9}{_pct(wg):>11}"
            f"{_num(node['final_accuracy'], '.4f'):>11}{_num(node['max_accuracy'], '.4f'):>9}"
            f"{_num(node['final_step'], 'd'):>8}"
        )
    inc_max = t["rss_growth_incarnation_max"]
    print(
        f"RSS growth after {s['warmup']:g} s warm-up, worst incarnation: "
        f"{_num(inc_max and 100 * inc_max, '+.1f')}% (target < {100 * RSS_TARGET:.0f}%: "
        f"{'met' if t['rss_met'] else 'NOT met'}); per slot over the run: "
        f"{_num(t['rss_growth_run_max'] and 100 * t['rss_growth_run_max'], '+.1f')}%"
    )
    print(
        f"accuracy: max {_num(t['max_accuracy'], '.4f')}, target {ACCURACY_TARGET} "
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(
        args.out.resolve(),
        args.nodes,
        f"soak-{args.out.name}-{args.seed}",
        new_ids=args.restart_ids == "new",
    )
    atexit.register(cluster.kill_all)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    try:
        raw = run(args, cluster, stopping)
    except KeyboardInterrupt as err:
        print(f"soak: interrupted ({err}); every node killed, no summary", file=sys.stderr)
        return 130
    finally:
        cluster.kill_all()
    summary = summarise(args, cluster, raw)
    summary["warmup"] = args.warmup
    (args.out / "soak.json").write_text(json.dumps(summary, indent=1) + "\n")
    print_table(summary)
    print(f"wrote {args.out / 'soak.json'}")
    return 0 if all(summary["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
