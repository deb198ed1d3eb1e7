"""gosgd-sim: M virtual nodes in one process, on a virtual clock, to choose p and M before
renting machines.

Every virtual node has its own model copy, data order (and shard, if asked), optimizer and
weight, and runs the same rule as a real node (gosgd_p2p.algorithm: merge_, halve, consensus).
Messages cross a simulated network with a per-link latency, a bandwidth and a drop rate (a
dropped push returns to its sender, as on a real node). Time is virtual: a local step takes
`step_time_s / speed` (with jitter), a message `latency_s + bytes / bandwidth`. Nodes may have
speeds of their own (`speeds`, or a `slow` fraction of them at `slow_speed`), and the speeds
may change during the run (`speed_changes`). GoSGD nodes push on the node's push schedule
(gosgd_p2p.algorithm.PushSchedule, on the virtual clock). A run is deterministic for its seed.

Baselines on the same clock: all-reduce SGD (synchronous average every step), local SGD
(average every `period` steps), EASGD (elastic averaging with a center variable every `period`
steps) and no communication. Synchronous rounds last as long as the slowest node's step plus
the communication (ring all-reduce: 2 (M-1)/M of the state per node; EASGD: M transfers
through the center's link).

Outputs: per evaluation, virtual time, mean step, loss and accuracy of the consensus model
(sum a_i x_i / sum a_i; EASGD's center), consensus distance mean_i ||x_i - x_bar||^2, bytes
sent per node and every node's weight; over the run, each node's time-averaged share of the
total weight and the virtual time to a target accuracy; JSON and PNG (with heterogeneous
speeds, a third panel: the slow nodes' share of the weight over time).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gosgd_p2p import algorithm
from gosgd_p2p.config import SCHEDULES, NodeConfig, cluster_seed, text_seed
from gosgd_p2p.data import BatchSampler, Dataset, evaluate, load_dataset, shard
from gosgd_p2p.models import build_model
from gosgd_p2p.state import StateLayout, module_state

__all__ = ["ALGORITHMS", "SimConfig", "Simulation", "main"]

ALGORITHMS = ("gosgd", "allreduce", "localsgd", "easgd", "none")


@dataclass
class SimConfig:
    """One simulated run. Times in virtual seconds, sizes in bytes."""

    nodes: int = 8  # M, the number of virtual nodes
    algorithm: str = "gosgd"  # gosgd | allreduce | localsgd | easgd | none
    p: float = 0.1  # GoSGD push probability per step (the clock: p x the median step rate)
    schedule: str = NodeConfig.schedule  # GoSGD push schedule: step | clock | weight
    push_rate: float | None = None  # "clock": pushes per virtual second; None: from p
    period: int = 10  # local SGD averaging period H, EASGD communication period tau
    easgd_beta: float = 0.9  # EASGD moving rate beta; each node moves by alpha = beta / M
    model: str = "mlp"
    dataset: str = "digits"
    data_dir: str | None = None
    shard: bool = False  # give each node a disjoint slice of the training set
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    steps: int = 300  # local steps per node
    train: bool = True  # False: no local steps, gossip only (consensus experiments)
    step_time_s: float = 0.01  # mean virtual duration of one local step
    step_jitter: float = 0.2  # relative spread of step durations (uniform +-)
    speeds: list[float] | None = None  # per node: steps take step_time_s / speed; None: all 1
    slow: float = 0.0  # share of the nodes (the last ones) at slow_speed, when speeds is None
    slow_speed: float = 1.0 / 3.0  # the speed of those nodes
    # (virtual time, speeds of every node from then on), in time order
    speed_changes: list[tuple[float, list[float]]] = field(default_factory=list)
    target: float | None = None  # stop at the first evaluation whose accuracy reaches this
    stagger_s: float = 0.0  # node i takes its first step i * stagger_s later (fixed schedules)
    latency_s: float = 0.0005  # one-way latency of a link
    bandwidth_bps: float = 1.25e9  # bytes per second of a link (10 Gb/s)
    drop: float = 0.0  # share of pushes that fail and return to their sender
    eval_every: int = 25  # evaluate every this many (mean) local steps
    seed: int = 0
    init_spread: float = 0.0  # consensus experiments: add N(0, spread^2) noise per node to x0
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}")
        if self.nodes < 1 or self.steps < 1 or self.period < 1 or self.eval_every < 1:
            raise ValueError("nodes, steps, period and eval_every must be at least 1")
        if not 0 <= self.p <= 1 or not 0 <= self.drop < 1:
            raise ValueError("p must be in [0, 1] and drop in [0, 1)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}")
        if not 0 <= self.slow <= 1 or not self.slow_speed > 0:
            raise ValueError("slow must be in [0, 1] and slow_speed > 0")
        for speeds in [self.speeds, *(s for _, s in self.speed_changes)]:
            if speeds is not None and (len(speeds) != self.nodes or not all(v > 0 for v in speeds)):
                raise ValueError(f"speeds: {self.nodes} values > 0, one per node")
        times = [t for t, _ in self.speed_changes]
        if times != sorted(times):
            raise ValueError("speed changes must be in time order")

    def initial_speeds(self) -> list[float]:
        """Every node's speed at time 0."""
        if self.speeds is not None:
            return list(self.speeds)
        slow = round(self.slow * self.nodes)
        return [1.0] * (self.nodes - slow) + [self.slow_speed] * slow


@dataclass
class _Node:
    model: torch.nn.Module
    tensors: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    batches: BatchSampler
    rng: random.Random
    pushes: algorithm.PushSchedule
    weight: float = 1.0
    steps: int = 0
    bytes_sent: int = 0
    # (state, weight, sender, sender's step); a returned push has this node as its sender
    inbox: list[tuple[torch.Tensor, float, int, int]] = field(default_factory=list)
    weight_area: float = 0.0  # integral of the weight over virtual time, up to weight_since
    weight_since: float = 0.0


class Simulation:
    """A simulated cluster; `run()` returns the history of evaluations."""

    def __init__(self, cfg: SimConfig, data: Dataset | None = None) -> None:
        self.cfg = cfg
        self.data = data or load_dataset(cfg.dataset, cfg.data_dir)
        torch.manual_seed(cluster_seed(f"sim-{cfg.seed}"))
        template = build_model(cfg.model, self.data.input_shape, self.data.num_classes)
        self.layout = StateLayout(module_state(template))
        self.nodes: list[_Node] = []
        noise = torch.Generator().manual_seed(cfg.seed)
        for i in range(cfg.nodes):
            model = build_model(cfg.model, self.data.input_shape, self.data.num_classes)
            model.load_state_dict(template.state_dict())  # same start for every founder
            tensors = [t for _, t in module_state(model)]
            if cfg.init_spread:
                with torch.no_grad():
                    for t in tensors:
                        t.add_(torch.randn(t.shape, generator=noise) * cfg.init_spread)
            part = shard(self.data, i, cfg.nodes) if cfg.shard else self.data
            rng = random.Random(text_seed(f"gossip-{cfg.seed}-{i}"))
            self.nodes.append(
                _Node(
                    model=model,
                    tensors=tensors,
                    optimizer=torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum),
                    batches=BatchSampler(
                        part.train_x,
                        part.train_y,
                        cfg.batch_size,
                        seed=text_seed(f"{cfg.seed}-{i}"),
                    ),
                    rng=rng,
                    pushes=algorithm.PushSchedule(cfg.schedule, cfg.p, rng, rate=cfg.push_rate),
                )
            )
        self.center = [t.clone() for t in self.nodes[0].tensors] if cfg.algorithm == "easgd" else []
        self.clock = 0.0
        self._on_wire: dict[int, float] = {}  # weight of each message sent, not yet arrived
        self.schedule: list[tuple[int, int, int]] = []  # (sender, sender's step, receiver)
        self.history: list[dict[str, Any]] = []
        self.speeds = cfg.initial_speeds()
        self.time_to_target: float | None = None
        #: Each node's time-averaged share of the weight while every node trained: up to when
        #: the first node took its last step (or the run stopped at the target).
        self.shares: list[float] = []
        self._eval_model = build_model(cfg.model, self.data.input_shape, self.data.num_classes)

    # --- one node ---------------------------------------------------------------------------

    def _local_step(self, node: _Node) -> None:
        if self.cfg.train:
            x, y = next(node.batches)  # always a full batch: BatchSampler drops short ones
            loss = F.cross_entropy(node.model(x), y)
            node.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            node.optimizer.step()
        node.steps += 1

    def _step_time(self, i: int) -> float:
        jitter = self.cfg.step_jitter
        base = self.cfg.step_time_s / self.speeds[i]
        return base * (1.0 + self.nodes[i].rng.uniform(-jitter, jitter))

    def _set_weight(self, node: _Node, weight: float) -> None:
        node.weight_area += node.weight * (self.clock - node.weight_since)
        node.weight_since = self.clock
        node.weight = weight

    def _transfer_time(self) -> float:
        return self.cfg.latency_s + self.layout.nbytes / self.cfg.bandwidth_bps

    def _merge_inbox(self, node: _Node) -> None:
        for payload, weight, sender, step in node.inbox:
            if self.nodes[sender] is not node:
                node.pushes.observe(str(sender), step, weight, self.clock)
            merged = algorithm.merge_(node.tensors, node.weight, self.layout.views(payload), weight)
            self._set_weight(node, merged)
        node.inbox.clear()

    # --- GoSGD on an event queue ---------------------------------------------------------------

    def _run_gosgd(self) -> None:
        cfg, m = self.cfg, self.cfg.nodes
        events: list[tuple[float, int, str, int, Any]] = []
        seq = 0

        def push(when: float, kind: str, node: int, item: Any = None) -> None:
            nonlocal seq
            heapq.heappush(events, (when, seq, kind, node, item))
            seq += 1

        for i in range(m):
            push(self._step_time(i) + i * cfg.stagger_s, "step", i)
        for when, speeds in cfg.speed_changes:
            push(when, "speeds", -1, speeds)
        next_eval = cfg.eval_every
        while events:
            self.clock, _, kind, i, item = heapq.heappop(events)
            if kind == "speeds":
                self.speeds = list(item)  # from each node's next step on
                continue
            node = self.nodes[i]
            if kind == "arrive":
                node.inbox.append(item)
                del self._on_wire[id(item)]
                continue
            # a step: local step, then gossip (push when the schedule says, merge the inbox)
            self._local_step(node)
            fraction = node.pushes.fraction(node.steps, node.weight, self.clock)
            if m > 1 and fraction and algorithm.can_split(node.weight):
                j = node.rng.randrange(m - 1)
                j += j >= i  # uniform over the others
                snapshot = torch.empty(self.layout.numel)
                self.layout.flatten_into(node.tensors, snapshot)
                kept, sent = algorithm.split(node.weight, fraction)
                self._set_weight(node, kept)
                node.bytes_sent += self.layout.nbytes
                self.schedule.append((i, node.steps, j))
                dropped = node.rng.random() < cfg.drop
                to = i if dropped else j  # a failed push comes back to its sender
                message = (snapshot, sent, i, node.steps)
                self._on_wire[id(message)] = sent
                push(self.clock + self._transfer_time(), "arrive", to, message)
            self._merge_inbox(node)
            if node.steps < cfg.steps:
                push(self.clock + self._step_time(i), "step", i)
            elif not self.shares:
                self.shares = self.weight_shares()
            mean_steps = sum(n.steps for n in self.nodes) / m
            if next_eval <= mean_steps < cfg.steps:
                self._record()
                next_eval += cfg.eval_every
                if self.time_to_target is not None:
                    break
        self.shares = self.shares or self.weight_shares()
        # every node finished (or the target was reached): deliver what is still on the wire
        # and settle the inboxes
        for _, _, kind, i, item in sorted(events):
            if kind == "arrive":
                self.nodes[i].inbox.append(item)
                del self._on_wire[id(item)]
        for node in self.nodes:
            self._merge_inbox(node)
        self._record()

    # --- synchronous baselines -----------------------------------------------------------------

    def _average_into_all(self) -> None:
        avg = algorithm.consensus([n.tensors for n in self.nodes], [1.0] * len(self.nodes))
        with torch.no_grad():
            for node in self.nodes:
                for t, a in zip(node.tensors, avg, strict=True):
                    t.copy_(a)

    def _run_synchronous(self) -> None:
        cfg, m = self.cfg, self.cfg.nodes
        nbytes = self.layout.nbytes
        changes = list(cfg.speed_changes)
        for step in range(1, cfg.steps + 1):
            while changes and changes[0][0] <= self.clock:
                self.speeds = list(changes.pop(0)[1])
            self.clock += max(self._step_time(i) for i in range(m))
            for node in self.nodes:
                self._local_step(node)
            if step % cfg.eval_every == 0:
                self._record()  # before this round's averaging: what the nodes drifted to
                if self.time_to_target is not None:
                    break
            averages = cfg.algorithm == "allreduce" or (
                cfg.algorithm == "localsgd" and step % cfg.period == 0
            )
            if m > 1 and averages:
                # ring all-reduce: each node sends 2 (M-1)/M of the state in 2 (M-1) hops
                share = 2 * (m - 1) / m * nbytes
                self.clock += 2 * (m - 1) * cfg.latency_s + share / cfg.bandwidth_bps
                for node in self.nodes:
                    node.bytes_sent += int(share)
                self._average_into_all()
            elif cfg.algorithm == "easgd" and step % cfg.period == 0:
                self._easgd_exchange()

    def _easgd_exchange(self) -> None:
        """Elastic averaging (Zhang et al. 2015), synchronous: x_i -= a (x_i - c); c += sum."""
        cfg, m = self.cfg, self.cfg.nodes
        alpha = cfg.easgd_beta / m
        # each node sends its state to the center and gets the center back, over one link
        self.clock += 2 * cfg.latency_s + 2 * m * self.layout.nbytes / cfg.bandwidth_bps
        with torch.no_grad():
            pulls = [torch.zeros_like(c) for c in self.center]
            for node in self.nodes:
                node.bytes_sent += 2 * self.layout.nbytes
                for t, c, acc in zip(node.tensors, self.center, pulls, strict=True):
                    diff = alpha * (t - c)
                    t.sub_(diff)
                    acc.add_(diff)
            for c, acc in zip(self.center, pulls, strict=True):
                c.add_(acc)

    # --- measurements --------------------------------------------------------------------------

    def consensus_state(self) -> list[torch.Tensor]:
        """The cluster's model: sum a_i x_i / sum a_i (EASGD: the center variable)."""
        if self.cfg.algorithm == "easgd":
            return [c.double() for c in self.center]
        weights = [n.weight for n in self.nodes] if self.cfg.algorithm == "gosgd" else None
        return algorithm.consensus(
            [n.tensors for n in self.nodes], weights or [1.0] * len(self.nodes)
        )

    def consensus_distance(self, avg: Sequence[torch.Tensor]) -> float:
        """mean_i ||x_i - x_bar||^2 over the nodes."""
        total = 0.0
        for node in self.nodes:
            total += sum(
                float((t.double() - a).pow(2).sum()) for t, a in zip(node.tensors, avg, strict=True)
            )
        return total / len(self.nodes)

    def total_weight(self) -> float:
        """The weight at the nodes, waiting in inboxes and on the wire: always M (founders'
        1 each), up to the rounding of merges."""
        return math.fsum(
            [n.weight for n in self.nodes]
            + [w for n in self.nodes for _, w, _, _ in n.inbox]
            + list(self._on_wire.values())
        )

    def weight_shares(self) -> list[float]:
        """Each node's share of the total weight, averaged over the virtual time so far."""
        total = self.total_weight()
        if self.clock <= 0.0:
            return [n.weight / total for n in self.nodes]
        return [
            (n.weight_area + n.weight * (self.clock - n.weight_since)) / (self.clock * total)
            for n in self.nodes
        ]

    def _record(self) -> None:
        avg = self.consensus_state()
        with torch.no_grad():
            for (_, t), a in zip(module_state(self._eval_model), avg, strict=True):
                t.copy_(a)
        loss, acc = evaluate(
            self._eval_model, self.data.test_x, self.data.test_y, torch.device("cpu")
        )
        self.history.append(
            {
                "time": self.clock,
                "step": sum(n.steps for n in self.nodes) / len(self.nodes),
                "loss": loss,
                "accuracy": acc,
                "consensus_distance": self.consensus_distance(avg),
                "bytes_per_node": sum(n.bytes_sent for n in self.nodes) / len(self.nodes),
                # at the nodes, waiting in inboxes, and on the wire: always exactly M
                "total_weight": self.total_weight(),
                "weights": [n.weight for n in self.nodes],
            }
        )
        if self.cfg.target is not None and acc >= self.cfg.target and self.time_to_target is None:
            self.time_to_target = self.clock

    def run(self) -> list[dict[str, Any]]:
        """Simulate to the end; returns the evaluations (the last one after the last step)."""
        if self.cfg.algorithm == "gosgd":
            self._run_gosgd()
        else:
            self._run_synchronous()
        if not self.history or self.history[-1]["step"] < self.cfg.steps:
            self._record()
        return self.history


def plot(
    runs: dict[str, list[dict[str, Any]]], path: Path, title: str, slow: Sequence[int] = ()
) -> None:
    """Accuracy over virtual time and consensus distance over steps, one line per run; with
    `slow` (indices of the slow nodes), a third panel: their share of the weight over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if slow else 2, figsize=(16.5 if slow else 11, 4))
    ax1, ax2 = axes[0], axes[1]
    for label, hist in runs.items():
        ax1.plot([h["time"] for h in hist], [h["accuracy"] for h in hist], label=label)
        ax2.plot(
            [h["step"] for h in hist],
            [max(h["consensus_distance"], 1e-12) for h in hist],
            label=label,
        )
    ax1.set_xlabel("virtual time (s)")
    ax1.set_ylabel("consensus model test accuracy")
    ax2.set_xlabel("local steps per node")
    ax2.set_ylabel("consensus distance mean ||x_i - x_bar||^2")
    ax2.set_yscale("log")
    if slow:
        ax3 = axes[2]
        for label, hist in runs.items():
            shares = [sum(h["weights"][i] for i in slow) / h["total_weight"] for h in hist]
            ax3.plot([h["time"] for h in hist], shares, label=label)
        nodes = len(runs[next(iter(runs))][0]["weights"])
        ax3.axhline(len(slow) / nodes, color="grey", linestyle=":", label="their share of nodes")
        ax3.set_xlabel("virtual time (s)")
        ax3.set_ylabel(f"weight share of the {len(slow)} slow node(s)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _speeds(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _speed_change(text: str) -> tuple[float, list[float]]:
    when, sep, speeds = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not TIME:SPEED,SPEED,...")
    return float(when), _speeds(speeds)


def _parser() -> argparse.ArgumentParser:
    d = SimConfig()
    p = argparse.ArgumentParser(
        prog="gosgd-sim",
        description="Simulate M GoSGD nodes (or a baseline) in one process on a virtual clock.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--nodes", type=int, default=d.nodes)
    p.add_argument("--algorithm", choices=ALGORITHMS, default=d.algorithm)
    p.add_argument("--p", type=float, default=d.p)
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help="GoSGD pushes")
    p.add_argument("--push-rate", type=float, default=None, help="clock: pushes per virtual s")
    p.add_argument("--period", type=int, default=d.period, help="local SGD H / EASGD tau")
    p.add_argument("--model", default=d.model)
    p.add_argument("--dataset", default=d.dataset)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--shard", action="store_true")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--step-time", type=float, default=d.step_time_s, help="virtual s per step")
    p.add_argument("--speeds", type=_speeds, default=None, help="per node, e.g. 1,1,1,0.33")
    p.add_argument("--slow", type=float, default=d.slow, help="share of nodes that are slow")
    p.add_argument("--slow-speed", type=float, default=d.slow_speed, help="their speed")
    p.add_argument(
        "--speed-change", type=_speed_change, action="append", default=[],
        metavar="TIME:SPEEDS", help="from virtual second TIME on, these speeds (repeatable)",
    )  # fmt: skip
    p.add_argument("--target", type=float, default=None, help="stop at this accuracy")
    p.add_argument("--latency", type=float, default=d.latency_s, help="virtual s per message")
    p.add_argument("--bandwidth", type=float, default=d.bandwidth_bps, help="bytes/s per link")
    p.add_argument("--drop", type=float, default=d.drop)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=None, help="output folder (default runs/sim-...)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(1)  # many tiny models: threads cost more than they give
    try:
        cfg = SimConfig(
            nodes=args.nodes, algorithm=args.algorithm, p=args.p, schedule=args.schedule,
            push_rate=args.push_rate, speeds=args.speeds, slow=args.slow,
            slow_speed=args.slow_speed, speed_changes=args.speed_change, target=args.target,
            period=args.period,
            model=args.model, dataset=args.dataset, data_dir=args.data_dir, shard=args.shard,
            batch_size=args.batch_size, lr=args.lr, steps=args.steps,
            step_time_s=args.step_time, latency_s=args.latency, bandwidth_bps=args.bandwidth,
            drop=args.drop, eval_every=args.eval_every, seed=args.seed,
        )  # fmt: skip
    except ValueError as err:
        print(f"gosgd-sim: error: {err}", file=sys.stderr)
        return 2
    gossip = f"-p{cfg.p:g}-{cfg.schedule}" if cfg.algorithm == "gosgd" else ""
    label = f"{cfg.algorithm}-M{cfg.nodes}{gossip}"
    out = Path(args.out or f"runs/sim-{label}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sim = Simulation(cfg)
    history = sim.run()
    wall = time.perf_counter() - started
    last = history[-1]
    speeds = cfg.initial_speeds()
    slow = [i for i, v in enumerate(speeds) if v < max(speeds)]
    shares = sim.shares
    print(
        f"gosgd-sim {label}: {cfg.steps} steps/node in {wall:.1f} s wall, "
        f"{last['time']:.2f} s virtual; consensus accuracy {last['accuracy']:.4f}, "
        f"consensus distance {last['consensus_distance']:.3g}, "
        f"{last['bytes_per_node'] / 1e6:.2f} MB sent per node, "
        f"total weight {last['total_weight']!r}"
    )
    if cfg.target is not None:
        reached = "not reached" if sim.time_to_target is None else f"{sim.time_to_target:.3f} s"
        print(f"time to {cfg.target:g}: {reached} virtual")
    if slow and cfg.algorithm == "gosgd":
        print(
            f"slow nodes' mean share of the weight {sum(shares[i] for i in slow):.3f} "
            f"(their share of the nodes {len(slow) / cfg.nodes:.3f})"
        )
    result = {
        "config": asdict(cfg),
        "wall_s": wall,
        "time_to_target": sim.time_to_target,
        "slow_nodes": slow,
        # each node's share of the total weight, averaged over the virtual time while every
        # node trained (until the first one took its last step, or the target was reached)
        "weight_share": shares,
        "history": history,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    title = f"gosgd-sim: {cfg.model} on {cfg.dataset}, {label}"
    plot({label: history}, out / "sim.png", title, slow if cfg.algorithm == "gosgd" else ())
    print(f"wrote {out / 'results.json'} and {out / 'sim.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
