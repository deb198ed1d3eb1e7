"""Reproduce the GoSGD paper's comparisons in gosgd-sim and write docs/experiments.md.

    python -m bench.experiments            # its run time is recorded in docs/experiments.md

1. GoSGD with p in {0.01, 0.02, 0.1, 1} against all-reduce SGD, local SGD (H = 10), EASGD
   (tau = 10) and no communication, at M = 4, 8 and 16 nodes, each node on its own shard of
   the digits training set (mlp).
2. Consensus distance against M (4 to 256) for GoSGD at p = 0.02 and 0.1.

The network is simulated as 1 Gb/s links with 0.5 ms latency and a local step of 10 ms, so
that communication costs something. Results go between the markers of docs/experiments.md
(tables, plots under docs/img/, raw numbers in bench/results/experiments.json); the prose
around them is kept.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.report import fmt
from gosgd_p2p.data import load_dataset
from gosgd_p2p.sim import SimConfig, Simulation, plot

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "experiments.md"
IMG = ROOT / "docs" / "img"
START, END = "<!-- results:start -->", "<!-- results:end -->"
NETWORK = {"step_time_s": 0.01, "latency_s": 0.0005, "bandwidth_bps": 125e6}
TARGET = 0.95  # accuracy of the consensus model that counts as "trained"


def methods() -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = [
        (f"GoSGD p={p:g}", {"algorithm": "gosgd", "p": p}) for p in (0.01, 0.02, 0.1, 1.0)
    ]
    out += [
        ("all-reduce SGD", {"algorithm": "allreduce"}),
        ("local SGD H=10", {"algorithm": "localsgd", "period": 10}),
        ("EASGD tau=10", {"algorithm": "easgd", "period": 10}),
        ("no communication", {"algorithm": "none"}),
    ]
    return out


def first_reaching(history: list[dict[str, Any]], key: str) -> float | None:
    for h in history:
        if h["accuracy"] >= TARGET:
            return float(h[key])
    return None


def comparison(data: Any, steps: int) -> tuple[str, dict[str, Any]]:
    lines, raw = [], {}
    for m in (4, 8, 16):
        runs = {}
        lines += [
            f"\n**M = {m} nodes** (each on 1/{m} of the training set, {steps} steps per node)\n",
            "| method | final acc. | virtual s to 0.95 | steps to 0.95 | MB sent per node "
            "| final consensus distance |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for label, kw in methods():
            cfg = SimConfig(nodes=m, steps=steps, shard=True, eval_every=10, **NETWORK, **kw)
            hist = Simulation(cfg, data).run()
            runs[label] = hist
            last = hist[-1]
            lines.append(
                f"| {label} | {last['accuracy']:.4f} | {fmt(first_reaching(hist, 'time'), '.2f')}"
                f" | {fmt(first_reaching(hist, 'step'), '.0f')}"
                f" | {last['bytes_per_node'] / 1e6:.2f} | {last['consensus_distance']:.3g} |"
            )
        image = IMG / f"compare_M{m}.png"
        plot(runs, image, f"digits / mlp, M = {m}, sharded data")
        lines.append(f"\n![M = {m}](img/{image.name})\n")
        raw[str(m)] = runs
    return "\n".join(lines), raw


def scaling(data: Any, steps: int) -> tuple[str, dict[str, Any]]:
    raw: dict[str, Any] = {}
    lines = [
        f"\n| M | p | consensus distance after {steps} steps | mean over the run "
        "| final acc. | wall s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    curves = {}
    for p in (0.02, 0.1):
        for m in (4, 16, 64, 256):
            cfg = SimConfig(nodes=m, p=p, steps=steps, shard=False, eval_every=10, **NETWORK)
            started = time.perf_counter()
            hist = Simulation(cfg, data).run()
            wall = time.perf_counter() - started
            mean_dist = sum(h["consensus_distance"] for h in hist) / len(hist)
            lines.append(
                f"| {m} | {p:g} | {hist[-1]['consensus_distance']:.3g} | {mean_dist:.3g} "
                f"| {hist[-1]['accuracy']:.4f} | {wall:.1f} |"
            )
            curves[f"M={m} p={p:g}"] = hist
            raw[f"{m}-{p:g}"] = hist
    image = IMG / "consensus_vs_M.png"
    plot(curves, image, "digits / mlp, full data per node: consensus distance against M")
    lines.append(f"\n![consensus distance against M](img/{image.name})\n")
    return "\n".join(lines), raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="local steps per node")
    parser.add_argument("--scaling-steps", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    IMG.mkdir(parents=True, exist_ok=True)
    data = load_dataset("digits")
    started = time.perf_counter()
    table1, raw1 = comparison(data, args.steps)
    table2, raw2 = scaling(data, args.scaling_steps)
    wall = time.perf_counter() - started
    block = "\n".join(
        [
            START,
            f"_Generated by `python -m bench.experiments` on {time.strftime('%Y-%m-%d')} "
            f"in {wall / 60:.1f} min; network: 1 Gb/s links, 0.5 ms latency, 10 ms per local "
            "step; model mlp, data digits, batch 32, lr 0.05, momentum 0.9, seed 0._",
            "\n### 1. GoSGD against the baselines\n",
            table1,
            "\n### 2. Consensus distance against the number of nodes\n",
            table2,
            END,
        ]
    )
    text = DOC.read_text() if DOC.exists() else f"# Experiments\n\n{START}\n{END}\n"
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    DOC.write_text(head + block + tail)
    out = ROOT / "bench" / "results" / "experiments.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"comparison": raw1, "scaling": raw2}) + "\n")
    print(f"wrote {DOC} and {out} in {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
