"""Benchmark: stragglers in gosgd-sim. A share of the nodes steps at a third of the speed; how
much later does the consensus model reach the target, and how much of the weight do the slow
nodes hold, for each push schedule, against the same cluster with every node at full speed?

    python -m bench.stragglers [--sizes 4,16,64] [--schedules step,clock,weight]
        [--seeds 10,5,3] [--target 0.97] [--lr 0.01] [--json bench/results/stragglers_sim.json]

Every run is gosgd-sim (virtual time, so the ratios do not depend on this machine's load):
M nodes, an MLP on digits, p = 0.1 (the clock: p pushes per step of a typical node, the same
mean push rate and bytes as the coin when all nodes are equal), evaluations of the consensus
model every 5 mean steps, stopped at the target. Slow: the last M/4 nodes at speed 1/3. The
slow nodes' share is their time-averaged share of the total weight while every node trains.
A ratio is a run with slow nodes over the all-equal run of the same schedule and seed.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from typing import Any

import torch

from bench.report import write_json
from gosgd_p2p.data import load_dataset
from gosgd_p2p.sim import SimConfig, Simulation

SLOW_SHARE = 0.25  # of the nodes
SLOW_SPEED = 1.0 / 3.0


def run(nodes: int, schedule: str, slow: float, seed: int, args: argparse.Namespace) -> dict:
    cfg = SimConfig(
        nodes=nodes, schedule=schedule, p=args.p, slow=slow, slow_speed=SLOW_SPEED,
        steps=args.max_steps, eval_every=5, lr=args.lr, target=args.target, seed=seed,
    )  # fmt: skip
    started = time.perf_counter()
    sim = Simulation(cfg, DATA)
    history = sim.run()
    slow_nodes = [i for i, v in enumerate(cfg.initial_speeds()) if v < 1.0]
    return {
        "nodes": nodes,
        "schedule": schedule,
        "slow": slow,
        "seed": seed,
        "time_to_target": sim.time_to_target,
        "steps_to_target": next((h["step"] for h in history if h["accuracy"] >= args.target), None),
        "slow_share": sum(sim.shares[i] for i in slow_nodes) if slow_nodes else None,
        "shares": sim.shares,
        "total_weight": history[-1]["total_weight"],
        "bytes_per_node": history[-1]["bytes_per_node"],
        "wall_s": time.perf_counter() - started,
    }


def stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


DATA: Any = None


def main() -> None:
    global DATA
    parser = argparse.ArgumentParser(prog="python -m bench.stragglers", description=__doc__)
    parser.add_argument("--sizes", default="4,16,64")
    parser.add_argument("--schedules", default="step,clock,weight")
    parser.add_argument("--seeds", default="10,5,3", help="runs per size, one per size")
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--json", default="bench/results/stragglers_sim.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    DATA = load_dataset("digits")
    rows = []
    summary = []
    sizes = [int(v) for v in args.sizes.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    if len(seeds) != len(sizes):
        parser.error("--seeds: one count per size")
    for nodes, runs in zip(sizes, seeds, strict=True):
        for schedule in args.schedules.split(","):
            mine = []
            for seed in range(runs):
                for slow in (0.0, SLOW_SHARE):
                    row = run(nodes, schedule, slow, seed, args)
                    mine.append(row)
                    print(
                        f"M={nodes:<3} {schedule:<6} slow={slow:<4} seed={seed} "
                        f"time {row['time_to_target']} slow share {row['slow_share']} "
                        f"total {row['total_weight']!r} ({row['wall_s']:.1f} s)",
                        flush=True,
                    )
            rows += mine
            equal = {r["seed"]: r for r in mine if r["slow"] == 0.0}
            ratios = [
                r["time_to_target"] / equal[r["seed"]]["time_to_target"]
                for r in mine
                if r["slow"] and r["time_to_target"] and equal[r["seed"]]["time_to_target"]
            ]
            entry = {
                "nodes": nodes,
                "schedule": schedule,
                "equal_time": stats([r["time_to_target"] for r in mine if not r["slow"]
                                     and r["time_to_target"] is not None]),
                "slow_time": stats([r["time_to_target"] for r in mine if r["slow"]
                                    and r["time_to_target"] is not None]),
                "ratio": stats(ratios),
                "slow_share": stats([r["slow_share"] for r in mine if r["slow"]]),
                "bytes_per_node_equal": stats([r["bytes_per_node"] for r in mine
                                               if not r["slow"]]),
                "reached": sum(r["time_to_target"] is not None for r in mine),
                "runs": len(mine),
            }  # fmt: skip
            summary.append(entry)
    print("\nmedian [min-max] over the seeds; slow: 1/4 of the nodes at speed 1/3")
    print(
        f"{'M':>3} {'schedule':<8} {'runs':>4} {'t equal':>18} {'t slow':>18} {'ratio':>18} "
        f"{'share':>18} {'MB/node equal':>14}"
    )

    def cell(s: dict[str, float] | None) -> str:
        return "-" if s is None else f"{s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}]"

    for e in summary:
        mb = e["bytes_per_node_equal"]
        print(
            f"{e['nodes']:>3} {e['schedule']:<8} {e['runs'] // 2:>4} {cell(e['equal_time']):>18} "
            f"{cell(e['slow_time']):>18} {cell(e['ratio']):>18} {cell(e['slow_share']):>18} "
            f"{mb['median'] / 1e6 if mb else 0:>14.2f}"
        )
    write_json(
        args.json,
        "stragglers_sim",
        command=shlex.join(["python", "-m", "bench.stragglers", *sys.argv[1:]]),
        settings={k: getattr(args, k) for k in ("target", "lr", "p", "max_steps", "seeds")},
        model="mlp",
        dataset="digits",
        slow_share_of_nodes=SLOW_SHARE,
        slow_speed=SLOW_SPEED,
        summary=summary,
        runs=rows,
    )


if __name__ == "__main__":
    main()
