"""Benchmark: wall time, steps and bytes on the wire to a target test accuracy, for 4 GoSGD
gossip nodes against 4-process DistributedDataParallel and one process of plain SGD.

    python bench/time_to_accuracy.py [--model mlp|cnn] [--target 0.95] [--p 0.1]
        [--max-steps 2000] [--eval-every 10] [--timeout-s 300] [--device cpu|cuda]
        [--repeats 1] [--json bench/results/time_to_accuracy.json] [--no-netns]

The systems, run one after the other, train the same model from the same initial weights
(`cluster_seed`), with the same per-worker batch size, learning rate and momentum:
  gossip  4 processes, each a GossipNode (push probability --p, peers = the other three on
          127.0.0.1, no mDNS), node i on shard i/4 of the training set;
  ddp     4 processes of DistributedDataParallel (gloo, gradients all-reduced every step,
          rendezvous through a TCP store on 127.0.0.1), rank i on shard i/4;
  sgd     1 process of plain SGD on the whole training set.
A step is one optimizer step of one worker on one batch of --batch-size examples (every batch
is full: a short epoch tail is skipped, the same way in every worker).

The rule. The clock starts when every worker of the system is ready (data loaded, model built,
peers confirmed or process group up). Every worker evaluates its own model on the whole test
set every --eval-every steps. The target is reached at the first step k at which the mean test
accuracy of the workers' models at step k is >= --target (DDP's models agree to rounding: the
ranks' all-reduce results may differ in the last bits, and so, rarely, may an accuracy; sgd
has one). Wall time to target is when the slowest worker finished step k, less the time that
worker spent evaluating (reported apart). Gossip nodes stop at their next evaluation once the
target is reached (the parent sees all four), DDP ranks all-gather their accuracies and stop
when the same mean reaches the target, and every worker stops by itself at --max-steps or
after --timeout-s.

Bytes on the wire. The benchmark runs in a private network namespace: it re-executes itself
under `unshare --net --mount` (root), brings its loopback up, and nothing but its own
processes talk there. Bytes are the loopback's transmitted bytes in /proc/net/dev, which is
per namespace (/sys/class/net/lo/statistics still shows the host's after `unshare -n` unless
sysfs is remounted), so every system is counted the same way: payload, gRPC or gloo framing,
TCP/IP headers and ACKs, membership calls. On loopback every packet is received as it is sent,
so rx equals tx; both are recorded. Bytes to target run from the start of training to the
evaluation at step k (each worker reads the counter there; the largest reading counts); setup
(rendezvous, DDP's initial broadcast, the gossip nodes' first Hellos) and the whole run are
reported apart. With --no-netns the host's loopback is read instead, other traffic included.

Repeats. One run of a system is one draw: gossip's message schedule depends on timing, and
every system on its initial model and data order. `--repeats N` runs every system N times;
repeat r > 0 seeds the initial model, the data order and the gossip draws from its own names
(repeat 0 is the single run's seeds), the systems of one repeat share them, and each ratio is
against the DDP run of the same repeat. The JSON has every run (`systems`, each row with its
`repeat`) and, per system, the median, min and max over the repeats that reached the target
(`summary`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import math
import multiprocessing as mp
import os
import queue
import shlex
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from report import write_json  # bench/report.py, beside this script
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from gosgd_p2p import GossipNode, NodeConfig
from gosgd_p2p.config import cluster_seed, text_seed
from gosgd_p2p.data import BatchSampler, evaluate, load_dataset, shard
from gosgd_p2p.models import MODELS, build_model

CLUSTER = "time-to-accuracy"  # seeds the initial model every worker of every system starts from
WORKERS = 4  # processes of the gossip and the DDP system
SYSTEMS = ("gossip", "ddp", "sgd")
# The flags every worker of every system shares (Job fields of the same names).
SETTINGS = (
    "model", "dataset", "batch_size", "lr", "momentum", "p", "max_steps", "eval_every", "target",
    "timeout_s", "threads",
)  # fmt: skip
READY_TIMEOUT_S = 180.0  # longest wait for every worker to be ready (spawn, imports, peers)
FINISH_GRACE_S = 60.0  # after a system's training deadline: evaluations, finish(), exit
FAILED_GRACE_S = 10.0  # after a worker failed: how long the others get before they are killed
DRAIN_TIMEOUT_S = 30.0  # gossip finish(): longest wait for a node's in-flight pushes
COLLECTIVE_TIMEOUT_S = 60.0  # DDP: a collective stuck this long fails instead of hanging
POLL_S = 0.2  # the parent's wait for a worker's message before it checks on the processes
NETNS_ENV = "GOSGD_TTA_NETNS"  # set in the re-executed process, which runs in its own namespace
SHARED_LOOPBACK = "shared loopback, counts include other traffic"
PRIVATE_LOOPBACK = "private network namespace (unshare --net --mount), loopback only"
RULE = (
    "target reached at the first evaluation step k where the mean test accuracy of the "
    "workers' models is >= target; wall time = when the slowest worker finished step k, "
    "evaluation time excluded; bytes = loopback tx bytes from the start of training"
)


# --- byte counting: the loopback of this network namespace ------------------------------------


def loopback_bytes() -> tuple[int, int]:
    """(rx, tx) bytes of `lo` in /proc/net/dev of the calling process's network namespace."""
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        name, _, fields = line.partition(":")
        if name.strip() == "lo":
            values = fields.split()
            return int(values[0]), int(values[8])
    raise RuntimeError("no lo interface in /proc/net/dev")


def enter_private_namespace() -> None:
    """Re-execute this script in a new network and mount namespace (does not return), or exit
    with one line saying why that is impossible here."""
    why = None
    if os.geteuid() != 0:
        why = "it needs root"
    elif shutil.which("unshare") is None:
        why = "`unshare` (util-linux) is not installed"
    else:
        probe = subprocess.run(
            ["unshare", "--net", "--mount", "true"], capture_output=True, text=True, timeout=30
        )
        if probe.returncode != 0:
            why = probe.stderr.strip() or f"unshare exited {probe.returncode}"
    if why is not None:
        sys.exit(
            f"time_to_accuracy: cannot count bytes in a private network namespace ({why}); "
            "run as root, or pass --no-netns to count the shared host loopback"
        )
    sys.stdout.flush()
    argv = ["unshare", "--net", "--mount", sys.executable, *sys.argv]
    os.execvpe("unshare", argv, dict(os.environ, **{NETNS_ENV: "1"}))


def bring_up_loopback() -> None:
    """Inside the new namespace: set lo up (the ioctl `ip link set lo up` makes, so iproute2
    need not be installed), and check that lo is all there is."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1  # <linux/sockios.h>, <net/if.h>
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sh14x", b"lo", 0)  # struct ifreq: name, flags
        _, flags = struct.unpack("16sh14x", fcntl.ioctl(sock, siocgifflags, request))
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sh14x", b"lo", flags | iff_up))
    names = [
        line.partition(":")[0].strip()
        for line in Path("/proc/net/dev").read_text().splitlines()[2:]
    ]
    if names != ["lo"]:
        sys.exit(
            f"time_to_accuracy: {NETNS_ENV} is set but this namespace has {names}, not lo only"
        )


def free_ports(count: int) -> tuple[int, ...]:
    """`count` distinct TCP ports free on 127.0.0.1, bound together and then released (in a
    private namespace nothing else can take them before the workers bind them)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return tuple(sock.getsockname()[1] for sock in socks)


# --- workers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """What one worker process trains. Every field but system, rank, world, ports and device is
    the same for every worker of every system."""

    system: str  # gossip | ddp | sgd
    rank: int  # this worker's index; it trains on shard rank/world
    world: int  # workers of this system
    ports: tuple[int, ...]  # gossip: every node's gRPC port; ddp: the TCP store's port
    device: str  # torch device of this worker
    model: str  # mlp | cnn | resnet18
    dataset: str  # digits | synthetic | cifar10
    batch_size: int  # examples per step per worker
    lr: float  # SGD learning rate
    momentum: float  # SGD momentum
    p: float  # gossip: push probability per step
    max_steps: int  # steps per worker at most
    eval_every: int  # steps between evaluations
    target: float  # test accuracy that counts as trained
    timeout_s: float  # training seconds per worker at most
    threads: int  # torch CPU threads per worker
    repeat: int = 0  # which repeat: seeds the initial model, the data order and the gossip draws


def _seeded(job: Job, what: str) -> str:
    """The name a random stream of `job` is seeded from; repeat 0 keeps the original names."""
    run = CLUSTER if job.repeat == 0 else f"{CLUSTER}#{job.repeat}"
    return f"{run}:{what}" if what else run


# Messages a worker puts on the parent's queue, as tuples:
#   ("ready", rank, None)                      model built, peers or process group up
#   ("eval", rank, (step, train_s, acc, tx))   an evaluation; tx = loopback tx bytes then
#   ("done", rank, {...})                      final facts (steps, accuracy, gossip weight)
#   ("error", rank, traceback)                 the worker failed


def worker(job: Job, events: Any, go: Any, stop: Any) -> None:
    """Entry point of every worker process: wait for `go`, train, report on `events`, exit by
    itself (at max_steps, timeout_s, a `stop` request at an evaluation, or the parent's death)."""
    try:
        torch.set_num_threads(job.threads)
        {"gossip": _gossip_worker, "ddp": _ddp_worker, "sgd": _sgd_worker}[job.system](
            job, events, go, stop
        )
    except BaseException:
        events.put(("error", job.rank, traceback.format_exc()))
        sys.exit(1)


@dataclass
class Setup:
    """One worker's model (on its device), data stream and test set."""

    model: nn.Module
    batches: BatchSampler
    test_x: Tensor
    test_y: Tensor
    device: torch.device


def _setup(job: Job) -> Setup:
    device = torch.device(job.device)
    data = load_dataset(job.dataset)
    if job.world > 1:
        data = shard(data, job.rank, job.world)
    if len(data.train_y) < job.batch_size:
        raise ValueError(f"shard of {len(data.train_y)} examples < batch size {job.batch_size}")
    batches = BatchSampler(
        data.train_x, data.train_y, job.batch_size, seed=text_seed(_seeded(job, f"data:{job.rank}"))
    )
    torch.manual_seed(cluster_seed(_seeded(job, "")))  # every worker of every system: one start
    model = build_model(job.model, data.input_shape, data.num_classes).to(device)
    return Setup(model, batches, data.test_x.to(device), data.test_y.to(device), device)


def _train(
    job: Job,
    setup: Setup,
    net: nn.Module,
    events: Any,
    go: Any,
    stop: Any,
    after_step: Callable[[], None],
    vote: Callable[[float, bool], bool],
) -> dict[str, Any]:
    """The loop every worker runs; returns its facts: steps taken, accuracy at the last
    evaluation, and eval_s (seconds spent evaluating and voting, not counted as training).

    `net` is what the forward pass calls (the model, or DDP around it); `after_step` runs after
    each optimizer step (node.step for gossip). After each evaluation `vote(accuracy,
    stop_requested)` says whether to stop; stop_requested means the parent asked, the deadline
    passed or the parent died.
    """
    model, device = setup.model, setup.device
    optimizer = torch.optim.SGD(model.parameters(), lr=job.lr, momentum=job.momentum)
    parent = os.getppid()
    events.put(("ready", job.rank, None))
    if not go.wait(READY_TIMEOUT_S):
        raise TimeoutError(f"no start signal after {READY_TIMEOUT_S:.0f} s")
    start = time.monotonic()
    paused = 0.0  # seconds spent evaluating and voting: not training time
    step, accuracy = 0, 0.0
    while step < job.max_steps:
        # one local step on a full batch
        x, y = next(setup.batches)
        if len(y) < job.batch_size:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        after_step()
        step += 1
        if step % job.eval_every and step < job.max_steps:
            continue
        # evaluate, report, and decide whether to go on (the pause is not training time)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        pause_start = time.monotonic()
        train_s = pause_start - start - paused
        _, accuracy = evaluate(model, setup.test_x, setup.test_y, device)
        events.put(("eval", job.rank, (step, train_s, accuracy, loopback_bytes()[1])))
        requested = stop.is_set() or train_s > job.timeout_s or os.getppid() != parent
        done = vote(accuracy, requested)
        paused += time.monotonic() - pause_start
        if done:
            break
    return {"steps": step, "accuracy": accuracy, "eval_s": paused}


def _sgd_worker(job: Job, events: Any, go: Any, stop: Any) -> None:
    setup = _setup(job)
    facts = _train(
        job,
        setup,
        setup.model,
        events,
        go,
        stop,
        lambda: None,
        lambda acc, asked: acc >= job.target or asked,
    )
    events.put(("done", job.rank, facts))


def _gossip_worker(job: Job, events: Any, go: Any, stop: Any) -> None:
    setup = _setup(job)
    addresses = [f"127.0.0.1:{port}" for port in job.ports]
    config = NodeConfig(
        listen=addresses[job.rank],
        peers=[a for i, a in enumerate(addresses) if i != job.rank],
        node_id=f"node-{job.rank}",
        cluster=CLUSTER,
        mdns=False,
        p=job.p,
        seed=text_seed(_seeded(job, f"gossip:{job.rank}")),
        drain_timeout_s=DRAIN_TIMEOUT_S,
    )
    node = GossipNode(setup.model, config)
    try:
        if not node.peers.wait_live(job.world - 1, READY_TIMEOUT_S):
            raise TimeoutError(f"node {job.rank} did not meet its {job.world - 1} peers")
        # the parent decides on the mean of all nodes: only its request (or a deadline) stops
        facts = _train(
            job, setup, setup.model, events, go, stop, node.step, lambda acc, asked: asked
        )
        weight = node.finish()  # settles every message: the weights now sum to the founders'
        _, facts["accuracy"] = evaluate(setup.model, setup.test_x, setup.test_y, setup.device)
        stats = node.stats()
        facts |= {
            "weight": weight,
            "founders": int(not node.joined),
            "pushes_acked": stats.get("pushes_acked", 0),
            "pushes_returned": stats.get("pushes_returned", 0),
            "payload_bytes_sent": stats.get("bytes_sent", 0),
        }
        events.put(("done", job.rank, facts))
    finally:
        node.close()


def _init_gloo(rank: int, world: int, port: int) -> None:
    """Join a gloo process group whose TCP store listens on 127.0.0.1:`port` (rank 0's)."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's pairs on 127.0.0.1, not the host's name
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )


def _ddp_worker(job: Job, events: Any, go: Any, stop: Any) -> None:
    _init_gloo(job.rank, job.world, job.ports[0])
    try:
        setup = _setup(job)
        cuda = setup.device.type == "cuda"
        net = DistributedDataParallel(setup.model, device_ids=[setup.device] if cuda else None)

        def vote(accuracy: float, asked: bool) -> bool:
            # The parent's rule, the mean accuracy of the ranks, decided by every rank alike: the
            # ranks' models may differ in the last bits (and so, rarely, in one test answer),
            # and a deadline or a request may reach one rank only.
            votes = [torch.zeros(2, dtype=torch.float64) for _ in range(job.world)]
            dist.all_gather(votes, torch.tensor([accuracy, float(asked)], dtype=torch.float64))
            accuracies = [float(v[0]) for v in votes]  # in rank order, as the parent sums them
            return mean_accuracy(accuracies) >= job.target or any(v[1] > 0 for v in votes)

        facts = _train(job, setup, net, events, go, stop, lambda: None, vote)
        events.put(("done", job.rank, facts))
    finally:
        dist.destroy_process_group()


def _gloo_cuda_probe(rank: int, port: int, out: Any) -> None:
    try:
        _init_gloo(rank, 2, port)
        flag = torch.ones(4, device="cuda")
        dist.all_reduce(flag)
        torch.cuda.synchronize()
        ok = bool((flag == 2).all())
        dist.destroy_process_group()
        out.put((rank, None if ok else f"all-reduce gave {flag.tolist()}, not 2s"))
    except Exception as err:  # reported: the benchmark falls back to DDP on the CPU
        out.put((rank, f"{type(err).__name__}: {err}".splitlines()[0]))


def gloo_cuda_problem() -> str | None:
    """None when gloo all-reduces CUDA tensors between two processes here, else why not."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_ports(1)[0]
    procs = [ctx.Process(target=_gloo_cuda_probe, args=(r, port, out), daemon=True) for r in (0, 1)]
    for proc in procs:
        proc.start()
    try:
        for _ in procs:
            problem = out.get(timeout=READY_TIMEOUT_S)[1]
            if problem is not None:
                return str(problem)
    except queue.Empty:
        return f"no answer from the probe in {READY_TIMEOUT_S:.0f} s"
    finally:
        _reap(procs, 10.0)
    return None


# --- the parent: one system at a time ---------------------------------------------------------


def _reap(procs: list[Any], grace_s: float) -> list[str]:
    """Join every process within `grace_s` in all; kill the ones still running. Returns their
    names."""
    deadline = time.monotonic() + grace_s
    killed = []
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(10)
            killed.append(proc.name)
    return killed


def mean_accuracy(accuracies: list[float]) -> float:
    """The target rule's mean, computed the same way by the parent and by DDP's ranks."""
    return sum(accuracies) / len(accuracies)


def curve(
    evals: dict[int, dict[int, tuple[float, float, int]]], world: int, tx0: int
) -> list[dict[str, Any]]:
    """One point per step at which all `world` workers evaluated: their accuracies, the mean,
    the wall time (the slowest worker's training time) and the loopback bytes since `tx0`."""
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
                "bytes": max(seen[rank][2] for rank in range(world)) - tx0,
            }
        )
    return points


@dataclass
class Outcome:
    """What the parent heard from one system's workers."""

    evals: dict[int, dict[int, tuple[float, float, int]]]  # step -> rank -> (train_s, acc, tx)
    done: dict[int, dict[str, Any]]  # rank -> the worker's final facts
    errors: dict[int, str]  # rank (-1: the parent) -> traceback or reason
    tx_at_go: int | None  # loopback tx bytes when training started; None: it never did


def supervise(
    procs: list[Any], events: Any, go: Any, stop: Any, args: argparse.Namespace
) -> Outcome:
    """Start `procs`, say go once all are ready, ask them to stop once the mean accuracy at a
    step reaches the target, and collect their messages until each has reported, failed or
    outlived its deadline (then it is killed). Never waits longer than READY_TIMEOUT_S plus
    the training timeout plus FINISH_GRACE_S."""
    world = len(procs)
    out = Outcome({}, {}, {}, None)
    ready: set[int] = set()
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
                ready.add(rank)
                if len(ready) == world:
                    out.tx_at_go = loopback_bytes()[1]
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
            elif kind == "done":
                out.done[rank] = body
            else:
                failed(rank, body)
    finally:
        stop.set()
        for name in _reap(procs, FAILED_GRACE_S if out.errors else FINISH_GRACE_S):
            out.errors.setdefault(-1, f"killed {name}, still running after the grace period")
    return out


def run_system(
    system: str, args: argparse.Namespace, device: str, repeat: int = 0
) -> dict[str, Any]:
    """Train `system` once in fresh processes (seeds of `repeat`); returns its row of results."""
    world = 1 if system == "sgd" else WORKERS
    ports = free_ports(world if system == "gossip" else 1 if system == "ddp" else 0)
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
        )
        for rank in range(world)
    ]
    ctx = mp.get_context("spawn")
    events, go, stop = ctx.Queue(), ctx.Event(), ctx.Event()
    procs = [
        # daemons: a parent that exits early takes them along (one killed outright leaves
        # them to stop by themselves at their next evaluation)
        ctx.Process(
            target=worker, args=(job, events, go, stop), name=f"{system}-{job.rank}", daemon=True
        )
        for job in jobs
    ]
    rx0, tx0 = loopback_bytes()
    out = supervise(procs, events, go, stop, args)
    rx1, tx1 = loopback_bytes()

    tx_at_go = tx0 if out.tx_at_go is None else out.tx_at_go
    points = curve(out.evals, world, tx_at_go)
    hit = next((pt for pt in points if pt["mean_accuracy"] >= args.target), None)
    best = max(points, key=lambda pt: pt["mean_accuracy"], default=None)
    finals = [out.done[rank] for rank in sorted(out.done)]
    row: dict[str, Any] = {
        "system": system,
        "repeat": repeat,
        "label": f"gossip p={args.p:g}" if system == "gossip" else system,
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
        "errors": [
            f"worker {r}: {text.strip().splitlines()[-1]}" for r, text in out.errors.items()
        ],
    }
    if system == "gossip" and finals:
        row["final_weights"] = [f["weight"] for f in finals]
        row["weight_sum"] = math.fsum(row["final_weights"])
        for key in ("founders", "pushes_acked", "pushes_returned", "payload_bytes_sent"):
            row[key] = sum(f[key] for f in finals)
    for rank, text in out.errors.items():
        print(f"{system} worker {rank} failed:\n{text}", file=sys.stderr)
    return row


# --- report -----------------------------------------------------------------------------------


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def summarize(rows: list[dict[str, Any]], systems: list[str]) -> dict[str, dict[str, Any]]:
    """Per system, over the repeats: how many reached the target, and the median, min and max
    of steps, wall time, bytes and the ratios to DDP (each ratio against the DDP run of the same
    repeat), over the repeats that reached it."""
    keys = ("steps_to_target", "wall_s_to_target", "bytes_to_target", "wall_ratio_vs_ddp",
            "bytes_ratio_vs_ddp")  # fmt: skip
    summary: dict[str, dict[str, Any]] = {}
    for system in systems:
        mine = [r for r in rows if r["system"] == system]
        entry: dict[str, Any] = {"runs": len(mine), "reached": sum(r["reached"] for r in mine)}
        for key in keys:
            values = [r[key] for r in mine if r[key] is not None]
            entry[key] = (
                {"median": statistics.median(values), "min": min(values), "max": max(values)}
                if values
                else None
            )
        summary[system] = entry
    return summary


def print_summary(summary: dict[str, dict[str, Any]], repeats: int) -> None:
    print(f"\nover {repeats} repeats: median [min - max] over the repeats that reached the target")
    print(
        f"{'system':<8} {'reached':>7} {'steps':>16} {'wall s':>19} {'MB':>22} "
        f"{'wall/DDP':>19} {'bytes/DDP':>22}"
    )

    def cell(stat: dict[str, float] | None, spec: str, scale: float = 1.0) -> str:
        if stat is None:
            return "-"
        lo, mid, hi = (format(stat[k] * scale, spec) for k in ("min", "median", "max"))
        return f"{mid} [{lo}-{hi}]"

    for system, entry in summary.items():
        print(
            f"{system:<8} {entry['reached']:>3}/{entry['runs']:<3} "
            f"{cell(entry['steps_to_target'], '.0f'):>16} "
            f"{cell(entry['wall_s_to_target'], '.2f'):>19} "
            f"{cell(entry['bytes_to_target'], '.2f', 1e-6):>22} "
            f"{cell(entry['wall_ratio_vs_ddp'], '.2f'):>19} "
            f"{cell(entry['bytes_ratio_vs_ddp'], '.3f'):>22}"
        )


def print_table(
    rows: list[dict[str, Any]], args: argparse.Namespace, counting: str, repeat: int = 0
) -> None:
    seeds = f" (repeat {repeat})" if args.repeats > 1 else ""
    print(
        f"\ntime to {args.target:g} test accuracy{seeds}: {args.model} on {args.dataset}, batch "
        f"{args.batch_size}/worker, lr {args.lr:g}, momentum {args.momentum:g}, "
        f"max {args.max_steps} steps, eval every {args.eval_every}, {args.threads} thread(s)/worker"
    )
    print(
        f"{'system':<14} {'workers':>7} {'wall s':>8} {'steps':>6} {'final acc':>9} "
        f"{'best acc':>8} {'MB to target':>12} {'MB total':>9} {'wall/DDP':>9} {'bytes/DDP':>9} "
        f"{'eval s':>7}"
    )
    for r in rows:
        mb = r["bytes_to_target"] / 1e6 if r["reached"] else None
        print(
            f"{r['label']:<14} {r['workers']:>7} {_fmt(r['wall_s_to_target'], '.2f'):>8} "
            f"{_fmt(r['steps_to_target'], 'd'):>6} {_fmt(r['final_accuracy'], '.4f'):>9} "
            f"{_fmt(r['best_accuracy'], '.4f'):>8} {_fmt(mb, '.3f'):>12} "
            f"{r['total_bytes'] / 1e6:>9.3f} {_fmt(r['wall_ratio_vs_ddp'], '.2f', 'x'):>9} "
            f"{_fmt(r['bytes_ratio_vs_ddp'], '.3f', 'x'):>9} {max(r['eval_s'], default=0):>7.2f}"
        )
    for r in rows:
        if not r["reached"]:
            print(
                f"{r['label']}: did not reach {args.target:g} in {max(r['steps_done'], default=0)}"
                f" steps; best mean accuracy {_fmt(r['best_accuracy'], '.4f')}"
                f" at step {_fmt(r['best_step'], 'd')}"
            )
        for err in r["errors"]:
            print(f"{r['label']}: FAILED {err}")
        if "weight_sum" in r:
            print(
                f"{r['label']}: final weights {[round(w, 6) for w in r['final_weights']]} "
                f"sum {r['weight_sum']:.12g}; {r['pushes_acked']} pushes acked, "
                f"{r['payload_bytes_sent'] / 1e6:.3f} MB of state sent"
            )
    print(f"rule: {RULE}")
    print(
        "final acc: mean over the workers when they stopped (gossip: after finish()); "
        "best acc: best mean at a step all workers evaluated; eval s: the most any worker spent "
        "evaluating (not in wall s)"
    )
    print(f"bytes: /proc/net/dev lo, {counting}; MB total includes setup and shutdown")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="mlp")
    parser.add_argument("--dataset", choices=("digits", "synthetic"), default="digits")
    parser.add_argument("--target", type=float, default=0.95, help="test accuracy (0.95)")
    parser.add_argument("--p", type=float, default=0.1, help="gossip push probability (0.1)")
    parser.add_argument("--batch-size", type=int, default=32, help="per worker (32)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (0.05)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (0.9)")
    parser.add_argument("--max-steps", type=int, default=2000, help="per worker (2000)")
    parser.add_argument("--eval-every", type=int, default=10, help="steps (10)")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per system (300)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (1)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="subset, in this order")
    parser.add_argument(
        "--repeats", type=int, default=1,
        help="runs of every system, each seeding the initial model, data order and draws anew",
    )  # fmt: skip
    parser.add_argument("--json", default="bench/results/time_to_accuracy.json")
    parser.add_argument("--no-netns", action="store_true", help="count the host's loopback")
    args = parser.parse_args()
    systems = [s for s in args.systems.split(",") if s]
    if not systems or any(s not in SYSTEMS for s in systems):
        parser.error(f"--systems: a comma-separated subset of {','.join(SYSTEMS)}")
    if min(args.max_steps, args.eval_every, args.batch_size, args.threads, args.repeats) < 1:
        parser.error(
            "--max-steps, --eval-every, --batch-size, --threads and --repeats must be >= 1"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")

    # bytes: this namespace's loopback, entered by re-executing ourselves
    if args.no_netns:
        counting = SHARED_LOOPBACK
    elif os.environ.get(NETNS_ENV) == "1":
        bring_up_loopback()
        counting = PRIVATE_LOOPBACK
    else:
        enter_private_namespace()
        return  # not reached: the process now runs the namespaced copy

    ddp_device, ddp_note = args.device, None
    if args.device == "cuda" and "ddp" in systems:
        ddp_note = gloo_cuda_problem()
        if ddp_note is not None:
            ddp_device = "cpu"
            print(f"DDP runs on the CPU: gloo cannot all-reduce CUDA tensors here ({ddp_note})")

    all_rows = []
    for repeat in range(args.repeats):
        rows = []
        for system in systems:
            print(f"repeat {repeat}: running {system} ...", end=" ", flush=True)
            started = time.monotonic()
            device = ddp_device if system == "ddp" else args.device
            rows.append(run_system(system, args, device, repeat))
            print(f"{time.monotonic() - started:.1f} s, processes included", flush=True)
        base = next((r for r in rows if r["system"] == "ddp"), {})  # ratios need DDP in the run
        for r in rows:
            r["wall_ratio_vs_ddp"] = _ratio(r["wall_s_to_target"], base.get("wall_s_to_target"))
            r["bytes_ratio_vs_ddp"] = _ratio(r["bytes_to_target"], base.get("bytes_to_target"))
        print_table(rows, args, counting, repeat)
        all_rows += rows
    summary = summarize(all_rows, systems)
    if args.repeats > 1:
        print_summary(summary, args.repeats)
    write_json(
        args.json,
        "time_to_accuracy",
        command=shlex.join(["python", *sys.argv]),
        settings={name: getattr(args, name) for name in (*SETTINGS, "device")},
        threads_per_worker=args.threads,
        ddp_device=ddp_device,
        ddp_device_note=ddp_note,
        rule=RULE,
        bytes_counted=f"/proc/net/dev lo tx bytes; {counting}",
        repeats=args.repeats,
        summary=summary,
        systems=all_rows,
    )


if __name__ == "__main__":
    main()
