"""The command line of the soak run (see the package's docstring)."""

from __future__ import annotations

import argparse
import atexit
import json
import signal
import sys
import threading
import time
from pathlib import Path

from bench.soak import __doc__ as DOC  # the soak run's description
from bench.soak.churn import run
from bench.soak.cluster import Cluster
from bench.soak.report import print_table
from bench.soak.summary import summarise


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=DOC.split("\n\n")[0],
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
