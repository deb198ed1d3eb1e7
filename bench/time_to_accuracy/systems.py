"""The three systems, as what one worker process of each runs: gossip (a GossipNode), ddp
(DistributedDataParallel over gloo) and sgd (plain SGD); the training loop they share."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from bench.netns import free_ports, loopback_bytes
from bench.procs import reap
from bench.time_to_accuracy import links
from bench.time_to_accuracy.wide import bench_model
from gosgd_p2p import GossipNode, NodeConfig
from gosgd_p2p.config import cluster_seed, text_seed
from gosgd_p2p.data import BatchSampler, load_dataset, shard
from gosgd_p2p.data import evaluate as evaluate_model

CLUSTER = "time-to-accuracy"  # seeds the initial model every worker of every system starts from
WORKERS = 4  # processes of the gossip and the DDP system
SYSTEMS = ("gossip", "ddp", "sgd")  # the default run
# gossip on the node's default push schedule, and on the paper's coin per step (stragglers)
GOSSIP = {"gossip": NodeConfig.schedule, "gossip-step": "step"}
KNOWN_SYSTEMS = (*SYSTEMS, "gossip-step")
# The flags every worker of every system shares (Job fields of the same names).
SETTINGS = (
    "model", "dataset", "batch_size", "lr", "momentum", "p", "max_steps", "eval_every", "target",
    "timeout_s", "threads", "defer_eval",
)  # fmt: skip
READY_TIMEOUT_S = 180.0  # longest wait for every worker to be ready (spawn, imports, peers)
DRAIN_TIMEOUT_S = 30.0  # gossip finish(): longest wait for a node's in-flight pushes
COLLECTIVE_TIMEOUT_S = 60.0  # DDP: a collective stuck this long fails instead of hanging


@dataclass(frozen=True)
class Job:
    """What one worker process trains. Every field but system, rank, world, ports and device is
    the same for every worker of every system."""

    system: str  # gossip | gossip-step | ddp | sgd
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
    # keep a copy of the model at each evaluation step and evaluate the copies once every
    # worker has trained max_steps: no evaluation shares the cores with anyone's training
    defer_eval: bool = False
    repeat: int = 0  # which repeat: seeds the initial model, the data order and the gossip draws
    encoding: str = "fp32"  # gossip: the wire encoding of the nodes' pushes
    netns: str = ""  # --link-mbit: the network namespace this worker runs in (links.py)


def _seeded(job: Job, what: str) -> str:
    """The name a random stream of `job` is seeded from; repeat 0 keeps the original names."""
    run = CLUSTER if job.repeat == 0 else f"{CLUSTER}#{job.repeat}"
    return f"{run}:{what}" if what else run


# Messages a worker puts on the parent's queue, as tuples:
#   ("ready", rank, None)                      model built, peers or process group up
#   ("eval", rank, (step, train_s, acc, tx))   an evaluation; tx = loopback tx bytes then
#   ("trained", rank, None)                    defer_eval: training over, copies kept; the
#                                              parent sets `evaluate` once all have said so
#   ("done", rank, {...})                      final facts (steps, accuracy, gossip weight)
#   ("error", rank, traceback)                 the worker failed


def worker(job: Job, events: Any, go: Any, stop: Any, evaluate: Any = None) -> None:
    """Entry point of every worker process: wait for `go`, train, report on `events`, exit by
    itself (at max_steps, timeout_s, a `stop` request at an evaluation, or the parent's death).
    With job.defer_eval it evaluates its kept copies once `evaluate` is set (or after
    READY_TIMEOUT_S without it)."""
    try:
        if job.netns:  # first, before any thread: every socket of this worker lives there
            links.enter(job.netns)
        torch.set_num_threads(job.threads)
        run = {"ddp": _ddp_worker, "sgd": _sgd_worker}.get(job.system, _gossip_worker)
        run(job, events, go, stop, evaluate)
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
    model = bench_model(job.model, data.input_shape, data.num_classes).to(device)
    return Setup(model, batches, data.test_x.to(device), data.test_y.to(device), device)


def _train(
    job: Job,
    setup: Setup,
    net: nn.Module,
    channels: tuple[Any, Any, Any, Any],
    after_step: Callable[[], None],
    vote: Callable[[float, bool], bool],
) -> dict[str, Any]:
    """The loop every worker runs; returns its facts: steps taken, accuracy at the last
    evaluation, and eval_s (seconds spent evaluating and voting, not counted as training).

    `channels` are the parent's (events, go, stop, evaluate). `net` is what the forward pass
    calls (the model, or DDP around it); `after_step` runs after each optimizer step (node.step
    for gossip). After each evaluation `vote(accuracy, stop_requested)` says whether to stop;
    stop_requested means the parent asked, the deadline passed or the parent died. With
    job.defer_eval an evaluation step only keeps a copy of the model (and votes with accuracy
    0, so only a request or a deadline stops); the copies are evaluated after training, once
    the parent says every worker has trained, and reported then with their step's train_s.
    """
    events, go, stop, evaluate = channels
    model, device = setup.model, setup.device
    optimizer = torch.optim.SGD(model.parameters(), lr=job.lr, momentum=job.momentum)
    parent = os.getppid()
    # defer_eval: room for every copy, allocated and touched now, so that keeping one is a
    # plain copy (fresh memory would page-fault on the cores the other workers train on)
    copies = job.max_steps // job.eval_every + 1 if job.defer_eval else 0
    spare = [_copy_state(model) for _ in range(copies)]
    events.put(("ready", job.rank, None))
    if not go.wait(READY_TIMEOUT_S):
        raise TimeoutError(f"no start signal after {READY_TIMEOUT_S:.0f} s")
    start = time.monotonic()
    sent = _sent_bytes(job)
    paused = 0.0  # seconds spent evaluating and voting: not training time
    step, accuracy = 0, 0.0
    kept: list[tuple[int, float, dict[str, Tensor], int]] = []  # defer_eval: (step, ..., tx)
    while step < job.max_steps:
        # one local step on a full batch (the sampler drops an epoch's short last one)
        x, y = next(setup.batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        after_step()
        step += 1
        if step % job.eval_every and step < job.max_steps:
            continue
        # evaluate (or keep a copy), report, and decide whether to go on (not training time)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        pause_start = time.monotonic()
        train_s = pause_start - start - paused
        if job.defer_eval:
            state = spare.pop()
            for name, t in model.state_dict().items():
                state[name].copy_(t)
            kept.append((step, train_s, state, sent()))
        else:
            _, accuracy = evaluate_model(model, setup.test_x, setup.test_y, device)
            events.put(("eval", job.rank, (step, train_s, accuracy, sent())))
        requested = stop.is_set() or train_s > job.timeout_s or os.getppid() != parent
        done = vote(0.0 if job.defer_eval else accuracy, requested)
        paused += time.monotonic() - pause_start
        if done:
            break
    if job.defer_eval:
        accuracy = _evaluate_kept(job, setup, kept, events, evaluate)
    return {"steps": step, "accuracy": accuracy, "eval_s": paused}


def _evaluate_kept(
    job: Job,
    setup: Setup,
    kept: list[tuple[int, float, dict[str, Tensor], int]],
    events: Any,
    evaluate: Any,
) -> float:
    """defer_eval: once every worker has trained (the parent sets `evaluate`), evaluate the
    kept copies and report each as its step's evaluation; returns the last one's accuracy.
    Each copy is loaded into the model in place (a gossip node's state aliases its tensors),
    and the trained state is put back afterwards."""
    events.put(("trained", job.rank, None))
    evaluate.wait(READY_TIMEOUT_S)  # a worker that failed must not hold the others forever
    model = setup.model
    trained = _copy_state(model)
    accuracy = 0.0
    for step, train_s, state, tx in kept:
        model.load_state_dict(state)
        _, accuracy = evaluate_model(model, setup.test_x, setup.test_y, setup.device)
        events.put(("eval", job.rank, (step, train_s, accuracy, tx)))
    model.load_state_dict(trained)
    return accuracy


def _copy_state(model: nn.Module) -> dict[str, Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _sent_bytes(job: Job) -> Callable[[], int]:
    """What a worker reports as its bytes: on a shaped link, what it has sent on it since
    training started; otherwise the shared loopback's transmitted bytes."""
    if not job.netns:
        return lambda: loopback_bytes()[1]
    at_go = links.worker_tx_bytes()
    return lambda: links.worker_tx_bytes() - at_go


def _host(job: Job, rank: int) -> str:
    """The address worker `rank` of `job`'s system listens on."""
    return links.host(rank) if job.netns else "127.0.0.1"


def _sgd_worker(job: Job, events: Any, go: Any, stop: Any, evaluate: Any) -> None:
    setup = _setup(job)
    facts = _train(
        job,
        setup,
        setup.model,
        (events, go, stop, evaluate),
        lambda: None,
        lambda acc, asked: acc >= job.target or asked,
    )
    events.put(("done", job.rank, facts))


def _gossip_worker(job: Job, events: Any, go: Any, stop: Any, evaluate: Any) -> None:
    setup = _setup(job)
    addresses = [f"{_host(job, i)}:{port}" for i, port in enumerate(job.ports)]
    config = NodeConfig(
        listen=addresses[job.rank],
        peers=[a for i, a in enumerate(addresses) if i != job.rank],
        node_id=f"node-{job.rank}",
        cluster=CLUSTER,
        mdns=False,
        p=job.p,
        schedule=GOSSIP[job.system],
        seed=text_seed(_seeded(job, f"gossip:{job.rank}")),
        drain_timeout_s=DRAIN_TIMEOUT_S,
        encoding=job.encoding,
        insecure=bool(job.netns),  # peers on other (private) hosts, no token
    )
    node = GossipNode(setup.model, config)
    try:
        if not node.peers.wait_live(job.world - 1, READY_TIMEOUT_S):
            raise TimeoutError(f"node {job.rank} did not meet its {job.world - 1} peers")
        # the parent decides on the mean of all nodes: only its request (or a deadline) stops
        facts = _train(
            job,
            setup,
            setup.model,
            (events, go, stop, evaluate),
            node.step,
            lambda acc, asked: asked,
        )
        weight = node.finish()  # settles every message: the weights now sum to the founders'
        _, facts["accuracy"] = evaluate_model(setup.model, setup.test_x, setup.test_y, setup.device)
        stats = node.stats()
        facts |= {
            "weight": weight,
            "founders": int(not node.joined),
            "pushes_acked": stats.get("pushes_acked", 0),
            "pushes_returned": stats.get("pushes_returned", 0),
            "payload_bytes_sent": stats.get("bytes_sent", 0),
            "pushes_skipped_budget": stats.get("pushes_skipped_budget", 0),
        }
        events.put(("done", job.rank, facts))
    finally:
        node.close()


def _init_gloo(rank: int, world: int, port: int, host: str = "127.0.0.1") -> None:
    """Join a gloo process group whose TCP store listens on `host`:`port` (rank 0's)."""
    # gloo's pairs on the interface that carries `host`, not on the host's name
    os.environ["GLOO_SOCKET_IFNAME"] = "lo" if host.startswith("127.") else links.IFNAME
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{host}:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )


def _ddp_worker(job: Job, events: Any, go: Any, stop: Any, evaluate: Any) -> None:
    _init_gloo(job.rank, job.world, job.ports[0], _host(job, 0))
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

        facts = _train(job, setup, net, (events, go, stop, evaluate), lambda: None, vote)
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
        reap(procs, 10.0)
    return None


def mean_accuracy(accuracies: list[float]) -> float:
    """The target rule's mean, computed the same way by the parent and by DDP's ranks."""
    return sum(accuracies) / len(accuracies)
