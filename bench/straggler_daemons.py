"""Benchmark: the slow node's share of the weight among 4 real gosgd-node daemons, every one
capped to the same CPU share by a cgroup cpu quota and one to a third of it, per push schedule.

    python -m bench.straggler_daemons [--schedules step,clock] [--repeats 2] [--cap 0.3]
        [--steps 900] [--json bench/results/straggler_daemons.json]

The run of tests/test_stragglers.py, measured: cnn on digits (--model mlp: a model whose
messages cost more than its steps), p = 0.1, the slow node takes a
third of the fast nodes' steps, so all four train for about as long. The slow node's share is
its weight over the founders' 4 at each of its evaluations (every 5 steps, evenly spread in
its time), averaged over its run.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.cgroup import CpuCaps, unavailable
from bench.procs import die_with_parent
from bench.report import write_json

NODES = ("fast-0", "fast-1", "fast-2", "slow")
WAIT_S = 300.0  # longest a run may take, start to exit


def run(schedule: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    cap, steps = args.cap, args.steps
    procs: dict[str, subprocess.Popen[str]] = {}
    first = ""
    common = [
        "--model", args.model, "--batch-size", str(args.batch_size), "--dataset", "digits",
        "--p", "0.1", "--eval-every", "5", "--no-mdns", "--wait-for-peers", "3",
        "--threads", "1", "--schedule", schedule, "--listen", "127.0.0.1:0",
    ]  # fmt: skip
    with CpuCaps() as caps:
        try:
            for name in NODES:
                own = ["--steps", str(steps // 3 if name == "slow" else steps)]
                own += ["--node-id", name, "--log-json", str(folder / f"{name}.jsonl")]
                peers = ["--peers", first] if first else []
                proc = subprocess.Popen(
                    [sys.executable, "-m", "gosgd_p2p.cli", *common, *own, *peers],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                    preexec_fn=die_with_parent,
                )  # fmt: skip
                procs[name] = proc
                assert proc.stdout is not None
                line = proc.stdout.readline()  # "gosgd-node NAME listening on ADDRESS"
                if " listening on " not in line:
                    raise RuntimeError(f"{name} did not start: {line!r}")
                first = first or line.rsplit(" ", 1)[1].strip()
                caps.cap(proc.pid, cap / 3 if name == "slow" else cap)
            for name, proc in procs.items():
                proc.communicate(timeout=WAIT_S)
                if proc.returncode != 0:
                    raise RuntimeError(f"{name} exited with {proc.returncode}")
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    records = {
        name: [json.loads(s) for s in (folder / f"{name}.jsonl").read_text().splitlines()]
        for name in NODES
    }
    finals = {name: next(r for r in recs if r["final"]) for name, recs in records.items()}
    shares = [r["weight"] / 4.0 for r in records["slow"] if r["step"] > 0 and not r["final"]]
    return {
        "schedule": schedule,
        "slow_mean_share": statistics.fmean(shares),
        "slow_max_share": max(shares),
        "final_weights": {n: f["weight"] for n, f in finals.items()},
        "weight_sum": math.fsum(f["weight"] for f in finals.values()),
        "final_accuracy": {n: f["test_accuracy"] for n, f in finals.items()},
        "train_s": {n: f["time"] for n, f in finals.items()},
        "messages_sent": {n: f["messages_sent"] for n, f in finals.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.straggler_daemons", description=__doc__)
    parser.add_argument("--schedules", default="step,clock")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cap", type=float, default=0.3, help="cores per node (0.3)")
    parser.add_argument("--steps", type=int, default=300, help="of a fast node (300)")
    parser.add_argument("--model", default="cnn", help="mlp | cnn (cnn)")
    parser.add_argument("--batch-size", type=int, default=32, help="(32)")
    parser.add_argument("--json", default="bench/results/straggler_daemons.json")
    args = parser.parse_args()
    why = unavailable()
    if why is not None:
        parser.error(f"cannot cap CPU: {why}")
    rows = []
    for repeat in range(args.repeats):
        for schedule in args.schedules.split(","):
            with tempfile.TemporaryDirectory() as folder:
                row = run(schedule, args, Path(folder))
            row["repeat"] = repeat
            rows.append(row)
            print(
                f"repeat {repeat} {schedule:<6} slow node's mean share "
                f"{row['slow_mean_share']:.3f} (max {row['slow_max_share']:.3f}); final "
                f"weights sum {row['weight_sum']!r}; accuracies "
                f"{[round(a, 4) for a in row['final_accuracy'].values()]}",
                flush=True,
            )
    write_json(
        args.json,
        "straggler_daemons",
        command=shlex.join(["python", "-m", "bench.straggler_daemons", *sys.argv[1:]]),
        cap_cores=args.cap,
        slow_cores=args.cap / 3,
        steps=args.steps,
        model=args.model,
        batch_size=args.batch_size,
        runs=rows,
    )


if __name__ == "__main__":
    main()
