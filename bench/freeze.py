"""A long pause of live nodes: gosgd-node daemons, some SIGSTOPped for a while, then SIGCONT.

A VM pause, a long GC stall or a closed laptop lid freezes a node without killing it: its port
stays open and its kernel still accepts connections, but nothing answers. Pushes to it time
out with their last chunk sent, so their senders must ask it (ResolvePush) once it thaws,
neither take the weight back nor write it off before then. The check: every node exits 0 and
the final weights sum to the number of founders.

    python -m bench.freeze [--nodes 4] [--frozen 2] [--freeze-after-s 5] [--freeze-s 100]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import write_json

START_S = 120.0  # how long a daemon may take to say where it listens


def _start(tmp: Path, i: int, args: argparse.Namespace, seed: str | None) -> tuple[Any, str]:
    """Start node i; returns (process, its address)."""
    cmd = [
        sys.executable, "-m", "gosgd_p2p.cli",
        "--node-id", f"n{i}", "--listen", "127.0.0.1:0", "--threads", "1", "--no-mdns",
        "--cluster", "freeze", "--model", args.model, "--steps", str(args.steps),
        "--eval-every", "500", "--wait-for-peers", str(args.nodes - 1),
        "--log-json", str(tmp / f"n{i}.jsonl"),
    ] + (["--peers", seed] if seed else [])  # fmt: skip
    err = open(tmp / f"n{i}.err", "w")  # noqa: SIM115 - the process holds it until it exits
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    deadline = time.monotonic() + START_S
    assert proc.stdout is not None
    for line in proc.stdout:
        if " listening on " in line:
            return proc, line.rsplit(" ", 1)[1].strip()
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"n{i} did not start: {(tmp / f'n{i}.err').read_text()}")


def _final(log: Path) -> dict[str, Any]:
    records = [json.loads(s) for s in log.read_text().splitlines() if s.strip()]
    return next(r for r in records if r["final"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--frozen", type=int, default=2, help="how many nodes are frozen")
    parser.add_argument("--freeze-s", type=float, default=100.0, help="seconds frozen")
    parser.add_argument(
        "--freeze-after-s", type=float, default=5.0, help="seconds of training before the freeze"
    )
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--json", default="bench/results/freeze.json")
    args = parser.parse_args()
    if not 0 < args.frozen < args.nodes:
        parser.error("--frozen must leave at least one node running")
    tmp = Path(tempfile.mkdtemp(prefix="gosgd-freeze-"))
    procs: list[Any] = []
    try:
        first, seed = _start(tmp, 0, args, None)
        procs.append(first)
        procs += [_start(tmp, i, args, seed)[0] for i in range(1, args.nodes)]
        logs = [tmp / f"n{i}.jsonl" for i in range(args.nodes)]
        while not all(log.exists() and log.read_text().strip() for log in logs):
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a node exited before training; logs in {tmp}")
            time.sleep(0.5)  # polls the first progress record of every node
        time.sleep(args.freeze_after_s)  # training, before the pause
        frozen = procs[-args.frozen :]
        for proc in frozen:
            os.kill(proc.pid, signal.SIGSTOP)
        print(f"froze {args.frozen} of {args.nodes} nodes for {args.freeze_s:g} s", flush=True)
        time.sleep(args.freeze_s)  # the pause under test
        for proc in frozen:
            os.kill(proc.pid, signal.SIGCONT)
        codes = [p.wait(args.freeze_s + 900) for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
    finals = [_final(log) for log in logs]
    weights = [f["weight"] for f in finals]
    total = math.fsum(weights)
    print(f"exit codes {codes}")
    print(f"final weights {weights}")
    print(f"total {total!r} (founders {args.nodes}; exact: {abs(total - args.nodes) < 1e-9})")
    print("steps", [f["step"] for f in finals], "accuracy", [f["test_accuracy"] for f in finals])
    print("messages sent", [f["messages_sent"] for f in finals])
    write_json(
        args.json,
        "freeze",
        config=vars(args),
        exit_codes=codes,
        weights=weights,
        total=total,
        steps=[f["step"] for f in finals],
        test_accuracy=[f["test_accuracy"] for f in finals],
        messages_sent=[f["messages_sent"] for f in finals],
        logs=str(tmp),
    )


if __name__ == "__main__":
    main()
