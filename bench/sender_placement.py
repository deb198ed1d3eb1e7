"""Benchmark: where the sender runs, and what each push costs the training loop there.

    python -m bench.sender_placement [--model mlp] [--p 0.1] [--steps 3000] [--repeats 5]
        [--rate 200] [--placements node,sendproc,...] [--pin [process|thread]]
        [--json bench/results/sender_placement.json]

The overhead benchmark shows that a small, fast model (the mlp: a small state, a short step)
pays far more for gossip at p = 0.1 than a bigger one does. This asks why: is it the GIL the sender
shares with the training thread (then a sender in another process would remove it), or the
CPU each push costs on a small machine (then it would not)? One trainer process trains with
the overhead benchmark's loop while a sink node in another process takes every push and drops
it (bench/sink.py); the pushes go out in one of these ways:
  node     the project's GossipNode at push probability p (its sender threads);
  sendproc the same node with send_process: its pushes are made by a child process, from
           shared send buffers (gosgd_p2p.sendproc);
  network  the same node with network_process: its gRPC server and its pushes run in a child
           process without torch (gosgd_p2p.netproc);
  thread   one thread of the trainer streams the message with grpc's sync API;
  asyncio  an asyncio event loop on one thread of the trainer streams it with grpc.aio;
  process  the trainer copies its state into shared memory and signals a sender process over
           a pipe; that process streams it with grpc's sync API.
  unary    a probe, not a push: the thread of `thread` sends the same wire bytes as one unary
           call to the sink's health service, which reads and refuses them: what a unary call
           of that size costs apart from the push's handling (the node's own pushes of one
           chunk go as the PushMessage call).
  receive  the other side of the same traffic: the trainer's node (p = 0) takes pushes that
           another process sends it with the node's client (PeerClient) at --rate messages a
           second, and merges them (its server threads run in the trainer's process, as in
           every node).
  netrecv  `receive` with the trainer's node in network_process mode: its server runs in the
           child, which hands each message over through a shared receive slot.
  traffic  the floor of `receive` and `netrecv` on a shared machine: the same pusher sends at
           --rate to the sink instead, while the trainer's node (p = 0) idles; the trainer
           handles no message and pays only for the CPU the traffic takes beside it ("pushes"
           counts the pusher's).
The raw placements (thread, asyncio, process) send the same wire chunks (wire.split_for_
streaming) and keep one push in flight: a draw that finds the sender busy is skipped. Every
placement runs in a fresh trainer process, interleaved over the repeats; `none` (p = 0) is the
baseline. Reported: median step time, its ratio to `none`, pushes (for `receive`: messages
merged), the training time lost per push, (step - baseline) x steps / pushes, and the
trainer's CPU per push beyond the baseline's: the training thread's ("main CPU") and its other
threads' ("other CPU"), in ms. A node that pushes into the sink gets its weight back
(sink.refill), as a cluster would send it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import multiprocessing as mp
import os
import random
import statistics
import threading
import time
from collections.abc import Callable
from multiprocessing import shared_memory
from typing import Any

import grpc
import torch

from bench import procs, sink, workloads
from bench.report import fmt, write_json
from bench.workloads import CLUSTER
from gosgd_p2p.client import PeerClient, PushFailed
from gosgd_p2p.state import StateLayout, module_state
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import PROTOCOL_VERSION, split_for_streaming

PLACEMENTS = (
    "none", "node", "sendproc", "network", "thread", "asyncio", "process", "unary", "receive",
    "netrecv", "traffic",
)  # fmt: skip
#: The placements that run a GossipNode, and whether it pushes (else it receives or idles).
NODE_PUSHES = {
    "none": False, "node": True, "sendproc": True, "network": True, "receive": False,
    "netrecv": False, "traffic": False,
}  # fmt: skip
#: The placements with a pusher process, and whether it pushes to the trainer (else the sink).
PUSHED = {"receive": True, "netrecv": True, "traffic": False}
METHOD = "/gosgd_p2p.v1.Gossip/PushState"
UNARY_PROBE = "/grpc.health.v1.Health/Check"
TIMEOUT_S = 10.0
READY_TIMEOUT_S = 120.0
BATCH_SIZE = 32


def _header(layout: StateLayout, sender: str, message_id: int) -> pb.StateHeader:
    return pb.StateHeader(
        sender_id=sender, message_id=message_id, weight=2.0**-20, fingerprint=layout.fingerprint,
        encoding=pb.ENCODING_FP32, payload_bytes=layout.nbytes, cluster=CLUSTER,
        protocol_version=PROTOCOL_VERSION,
    )  # fmt: skip


def _send(call: Any, layout: StateLayout, sender: str, message_id: int, data: memoryview) -> None:
    ack = call(split_for_streaming(_header(layout, sender, message_id), data), timeout=TIMEOUT_S)
    if not ack.receiver_id:
        raise RuntimeError("push without a receiver id in its ack")


def _send_unary(
    call: Any, layout: StateLayout, sender: str, message_id: int, data: memoryview
) -> None:
    request = b"".join(split_for_streaming(_header(layout, sender, message_id), data))
    try:
        call(request, timeout=TIMEOUT_S)
    except grpc.RpcError as err:  # refused after reading: expected, unless it never arrived
        if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise


def sender_process(address: str, model: str, shm_name: str, conn: Any) -> None:
    """The `process` placement's sender: one push of the shared buffer per message id received."""
    layout = StateLayout(module_state(workloads.model(model, "cpu")))
    shm = shared_memory.SharedMemory(name=shm_name)
    try:
        data = shm.buf[: layout.nbytes]
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=TIMEOUT_S)
            call = channel.stream_unary(METHOD, None, pb.PushAck.FromString)
            conn.send(0)  # ready: the trainer's clock may start
            while (message_id := conn.recv()) is not None:
                _send(call, layout, f"proc-{os.getppid()}", message_id, data)
                conn.send(message_id)
        del data
    finally:
        shm.close()


def pusher_process(address: str, model: str, rate: float, conn: Any) -> None:
    """The `receive` placement's peer: after "go", pushes to `address` at `rate` a second until
    "stop", then sends back how many it pushed and how many the node refused as busy (its
    inbox full: a node answers so when it merges slower than messages arrive)."""
    layout = StateLayout(module_state(workloads.model(model, "cpu")))
    data = memoryview(bytearray(layout.nbytes))  # zeros: a valid state
    pushed = refused = 0
    client = PeerClient()  # the calls a node makes: PushMessage for a state of one chunk
    client.push(address, _header(layout, f"pusher-{os.getpid()}", 0), data, TIMEOUT_S)
    conn.send("ready")
    conn.recv()  # go
    due = time.monotonic()
    while not conn.poll(max(0.0, due - time.monotonic())):
        pushed += 1
        header = _header(layout, f"pusher-{os.getpid()}", pushed)
        try:
            client.push(address, header, data, TIMEOUT_S)
        except PushFailed as err:
            if err.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            refused += 1
        due = max(due + 1.0 / rate, time.monotonic() - 0.05)  # no catch-up burst
    conn.recv()  # stop
    client.close()
    conn.send((pushed, refused))


class _Raw:
    """A raw placement's sender: start(message_id) begins a push of `flat`; busy() is True until
    it is acked. The trainer copies the state into `flat` before start()."""

    def __init__(self, placement: str, address: str, model: str, layout: StateLayout) -> None:
        self.placement = placement
        self.layout = layout
        self.sender = f"{placement}-{os.getpid()}"
        self._busy = False
        self.errors: list[BaseException] = []
        self.close: Callable[[], None]
        if placement == "process":
            self._shm = shared_memory.SharedMemory(create=True, size=layout.nbytes)
            self.flat = torch.frombuffer(self._shm.buf, dtype=torch.float32)
            ctx = mp.get_context("spawn")
            self._conn, theirs = ctx.Pipe()
            self._proc = ctx.Process(
                target=sender_process, args=(address, model, self._shm.name, theirs)
            )
            self._proc.start()
            if not self._conn.poll(READY_TIMEOUT_S):  # spawn and imports: seconds
                raise TimeoutError(f"sender process not ready in {READY_TIMEOUT_S:.0f} s")
            self._conn.recv()
            self.pid = self._proc.pid
            self.close = self._close_process
            return
        self.flat = torch.empty(layout.numel)
        data = memoryview(self.flat.numpy()).cast("B")
        if placement in ("thread", "unary"):
            channel = grpc.insecure_channel(address)
            if placement == "thread":
                call = channel.stream_unary(METHOD, None, pb.PushAck.FromString)
                send = _send
            else:
                call = channel.unary_unary(UNARY_PROBE, None, None)
                send = _send_unary
            wake = threading.Condition()
            pending: list[int | None] = []

            def run() -> None:
                while True:
                    with wake:
                        wake.wait_for(lambda: pending)
                        message_id = pending.pop()
                    if message_id is None:
                        return
                    try:
                        send(call, layout, self.sender, message_id, data)
                    except BaseException as err:  # recorded; the run then fails
                        self.errors.append(err)
                    self._busy = False

            thread = threading.Thread(target=run, name="bench-sender", daemon=True)
            thread.start()

            def start(message_id: int | None) -> None:
                with wake:
                    pending.append(message_id)
                    wake.notify()

            def close() -> None:
                start(None)
                thread.join(TIMEOUT_S)
                channel.close()

            self._start, self.close = start, close
        elif placement == "asyncio":
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="bench-aio-loop", daemon=True)
            thread.start()

            async def open_call() -> Any:
                channel = grpc.aio.insecure_channel(address)
                return channel, channel.stream_unary(METHOD, None, pb.PushAck.FromString)

            achannel, acall = asyncio.run_coroutine_threadsafe(open_call(), loop).result()

            async def push(message_id: int) -> None:
                header = _header(layout, self.sender, message_id)
                try:
                    await acall(split_for_streaming(header, data), timeout=TIMEOUT_S)
                except BaseException as err:  # recorded; the run then fails
                    self.errors.append(err)
                self._busy = False

            def start_aio(message_id: int | None) -> None:
                assert message_id is not None
                asyncio.run_coroutine_threadsafe(push(message_id), loop)

            def close_aio() -> None:
                asyncio.run_coroutine_threadsafe(achannel.close(), loop).result(TIMEOUT_S)
                loop.call_soon_threadsafe(loop.stop)
                thread.join(TIMEOUT_S)

            self._start, self.close = start_aio, close_aio
        else:
            raise ValueError(f"unknown placement {placement!r}")

    def busy(self) -> bool:
        if self.placement == "process" and self._busy and self._conn.poll():
            self._conn.recv()
            self.pid = self._proc.pid
            self._busy = False
        return self._busy

    def start(self, message_id: int) -> None:
        self._busy = True
        if self.placement == "process":
            self._conn.send(message_id)
        else:
            self._start(message_id)

    def _close_process(self) -> None:
        self._conn.send(None)
        self._proc.join(TIMEOUT_S)
        del self.flat
        self._shm.close()
        self._shm.unlink()
        if self._proc.exitcode != 0:
            self.errors.append(RuntimeError(f"sender process exit code {self._proc.exitcode}"))


def pin_all(pid: int, cpus: set[int]) -> None:
    """Run every thread of process `pid` on `cpus` only (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(tid), cpus)


def other_cpus() -> set[int]:
    """Every CPU of this machine but CPU 0, the trainer's under --pin."""
    return set(range(1, os.cpu_count() or 2))


def trainer(job: dict[str, Any], out: Any) -> None:
    """Train job["steps"] steps with the job's placement; put (mean step s, pushes, pushes the
    node refused as busy, this process's CPU ms per step by thread (procs.thread_cpu_s), peak
    RSS MB of this process, peak RSS MB of the node's child process or 0)."""
    from gosgd_p2p import GossipNode, NodeConfig

    if job["pin"]:
        os.sched_setaffinity(0, {0})  # before any thread starts: they all inherit it
    torch.set_num_threads(1)
    work = workloads.workload(job["model"], BATCH_SIZE, "cpu")
    model = work.model
    placement, p = job["placement"], job["p"]
    state = [t for _, t in module_state(model)]
    layout = StateLayout(module_state(model))
    node = raw = None
    pusher = None
    if placement in NODE_PUSHES:
        pushing = NODE_PUSHES[placement]
        node = GossipNode(
            model,
            NodeConfig(node_id=f"t{os.getpid()}", cluster=CLUSTER, p=p if pushing else 0.0,
                       peers=[job["sink"]], mdns=False, send_process=placement == "sendproc",
                       network_process=placement in ("network", "netrecv")),
        )  # fmt: skip
        if placement in PUSHED:
            ctx = mp.get_context("spawn")
            pusher, theirs = ctx.Pipe()
            target = node.address if PUSHED[placement] else job["sink"]
            proc = ctx.Process(
                target=pusher_process, args=(target, job["model"], job["rate"], theirs)
            )
            proc.start()
            if not pusher.poll(READY_TIMEOUT_S):
                raise TimeoutError(f"pusher not ready in {READY_TIMEOUT_S:.0f} s")
            pusher.recv()
            if job["pin"]:
                pin_all(proc.pid, other_cpus())
        if job["pin"] and node.send_process_pid is not None:
            pin_all(node.send_process_pid, other_cpus())
    else:
        raw = _Raw(placement, job["sink"], job["model"], layout)
        if job["pin"] and placement == "process":
            pin_all(raw.pid, other_cpus())
    rng = random.Random(0)
    ids = itertools.count(1)
    pushes = 0

    def step() -> None:
        nonlocal pushes
        work.step()
        if node is not None:
            node.step()
            sink.refill(node)
        elif rng.random() < p and raw is not None and not raw.busy():
            layout.flatten_into(state, raw.flat)
            raw.start(next(ids))
            pushes += 1

    for _ in range(job["warmup"]):
        step()
    if job["pin"] == "thread":  # the node's threads exist by now (those it starts later do not)
        pin_all(os.getpid(), other_cpus())
        os.sched_setaffinity(0, {0})  # the calling thread: the training thread
    pushes = refused = 0
    counted = "merged_received" if pusher is not None else "pushes_started"
    if pusher is not None:
        pusher.send("go")
        while PUSHED[placement] and node is not None and not node.counters.get(counted):
            step()  # until the first one arrived
    before = node.counters.get(counted) if node is not None else 0
    cpu_before = procs.thread_cpu_s()
    started = time.perf_counter()
    for _ in range(job["steps"]):
        step()
    per_step = (time.perf_counter() - started) / job["steps"]
    cpu_after = procs.thread_cpu_s()
    cpu_ms = {k: (v - cpu_before.get(k, 0.0)) * 1e3 / job["steps"] for k, v in cpu_after.items()}
    if pusher is not None:
        pusher.send("stop")
        if not pusher.poll(TIMEOUT_S):
            raise TimeoutError("the pusher did not stop")
        pushed, refused = pusher.recv()
        proc.join(TIMEOUT_S)
    child_mb = 0.0
    if node is not None:
        pushes = node.counters.get(counted) - before if PUSHED.get(placement, True) else pushed
        child = node.send_process_pid
        child_mb = (procs.rss_mb(child, "VmHWM") or 0.0) if child is not None else 0.0
        node.finish()
        node.close()
    elif raw is not None:
        deadline = time.monotonic() + TIMEOUT_S
        while raw.busy() and time.monotonic() < deadline:
            time.sleep(0.001)
        raw.close()
        if raw.errors:
            raise RuntimeError(f"{placement}: {len(raw.errors)} failed pushes: {raw.errors[0]!r}")
    rss_mb = procs.rss_mb(os.getpid(), "VmHWM") or 0.0
    out.put((per_step, pushes, refused, cpu_ms, rss_mb, child_mb))


def _cpu_medians(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The median over `rows` of each thread group's CPU ms per step (0 where a run lacks it)."""
    groups = {group for r in rows for group in r["cpu_ms_per_step"]}
    return {g: statistics.median(r["cpu_ms_per_step"].get(g, 0.0) for r in rows) for g in groups}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rate", type=float, default=200.0, help="receive: pushes a second")
    parser.add_argument(
        "--placements", default=",".join(PLACEMENTS), help="which to run; none always runs"
    )
    parser.add_argument(
        "--pin", nargs="?", const="process", choices=("process", "thread"), default=None,
        help="process (the default): the trainer's process on CPU 0, the sink, pusher and "
        "child processes on the others, as if the peers were other machines; thread: only the "
        "training thread on CPU 0, the trainer's other threads (gRPC's, the node's) with the "
        "rest, as on a host with cores to spare",
    )  # fmt: skip
    parser.add_argument("--json", default="bench/results/sender_placement.json")
    args = parser.parse_args()
    if args.pin and (os.cpu_count() or 1) < 2:
        parser.error("--pin needs at least 2 CPUs")
    chosen = ["none"] + [n for n in args.placements.split(",") if n in PLACEMENTS and n != "none"]
    if unknown := set(args.placements.split(",")) - set(PLACEMENTS):
        parser.error(f"unknown placements: {', '.join(sorted(unknown))}")
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in chosen}
    with sink.running(args.model) as (address, sink_pid):
        if args.pin:
            pin_all(sink_pid, other_cpus())
        for _ in range(args.repeats):  # interleaved, so drift hits every placement alike
            for placement in chosen:
                job = {"placement": placement, "p": args.p, "sink": address, "model": args.model,
                       "steps": args.steps, "warmup": args.warmup, "rate": args.rate,
                       "pin": args.pin}  # fmt: skip
                per_step, pushes, refused, cpu_ms, rss_mb, child_mb = procs.run_job(
                    trainer, job, limit_s=600, name="trainer"
                )
                row = {"step_s": per_step, "pushes": pushes, "refused": refused,
                       "cpu_ms_per_step": cpu_ms, "peak_rss_mb": rss_mb,
                       "child_peak_rss_mb": child_mb}  # fmt: skip
                runs[placement].append(row)
                busy = f", {refused} refused as busy" if refused else ""
                print(f"  {placement:<8} {per_step * 1e3:.4f} ms/step, {pushes} pushes{busy}",
                      flush=True)  # fmt: skip
    base = statistics.median(r["step_s"] for r in runs["none"])
    base_cpu = _cpu_medians(runs["none"])
    print(f"{'placement':<9} {'step ms':>8} {'slowdown':>9} {'pushes':>7} {'lost ms/push':>13} "
          f"{'main CPU':>9} {'other CPU':>10} {'RSS MB':>7} {'child MB':>9}")  # fmt: skip
    summary = {}
    for placement, rows in runs.items():
        step_s = statistics.median(r["step_s"] for r in rows)
        pushes = statistics.median(r["pushes"] for r in rows)
        lost = (step_s - base) * args.steps / pushes * 1e3 if pushes else None
        rss = max(r["peak_rss_mb"] for r in rows)
        child = max(r["child_peak_rss_mb"] for r in rows)
        # the trainer's CPU per push beyond the baseline's, by thread
        cpu = {group: (ms - base_cpu.get(group, 0.0)) * args.steps / pushes if pushes else None
               for group, ms in _cpu_medians(rows).items()}  # fmt: skip
        main_cpu = cpu.get("main")
        other_cpu = (
            sum(v for g, v in cpu.items() if g != "main" and v is not None) if pushes else None
        )
        summary[placement] = {"step_s": step_s, "slowdown": step_s / base, "pushes": pushes,
                              "lost_ms_per_push": lost, "cpu_ms_per_push": cpu,
                              "peak_rss_mb": rss, "child_peak_rss_mb": child}  # fmt: skip
        print(
            f"{placement:<9} {step_s * 1e3:>8.4f} {step_s / base:>8.3f}x {pushes:>7.0f} "
            f"{fmt(lost, '.2f'):>13} {fmt(main_cpu, '.3f'):>9} {fmt(other_cpu, '.3f'):>10} "
            f"{rss:>7.0f} {child:>9.0f}"
        )
    write_json(args.json, "sender_placement", model=args.model, p=args.p, steps=args.steps,
               receive_rate=args.rate, pinned=args.pin, median=summary, runs=runs)  # fmt: skip


if __name__ == "__main__":
    main()
