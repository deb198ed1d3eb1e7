"""Benchmark: what gossip costs the training loop, at p = 0, 0.1 and 1.0.

    python bench/overhead.py [--models mlp,cnn] [--steps 300] [--send-process] [--json PATH]

For each model and p, a fresh process trains one node with the built-in loop shape (forward,
backward, SGD step, node.step()) while a sink node in another process takes its pushes (and
releases them unmerged, so the sink does not compete for the CPU with merges). Each run reports
the mean step time after a warm-up and the peak RSS of the training process (and peak CUDA
memory on a GPU). Ratios are against p = 0 measured in the same run. On a CUDA machine
`--models resnet18 --device cuda --batch-size 128` is the GPU configuration.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import resource
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from report import write_json  # bench/report.py, beside this script
from sink import release_unmerged  # bench/sink.py
from soak import rss_mb  # bench/soak.py

from gosgd_p2p.wire import CHUNK_BYTES

CLUSTER = "overhead"


def _model(name: str, device: str) -> torch.nn.Module:
    from gosgd_p2p.config import cluster_seed
    from gosgd_p2p.models import build_model

    torch.manual_seed(cluster_seed(CLUSTER))
    shape = (3, 32, 32) if name == "resnet18" else (1, 8, 8)
    return build_model(name, shape, 10).to(device)


def sink(model_name: str, ready: Any, stop: Any) -> None:
    """A peer that acknowledges every push and drops it."""
    from gosgd_p2p import GossipNode, NodeConfig

    torch.set_num_threads(1)
    node = GossipNode(
        _model(model_name, "cpu"),
        NodeConfig(node_id="sink", cluster=CLUSTER, p=0.0, mdns=False, inbox_size=8),
    )

    release_unmerged(node, stop, every_s=0.001)
    ready.put(node.address)
    stop.wait()
    node.close()


def trainer(args: dict[str, Any], out: Any) -> None:
    """Train `steps` steps at push probability p; put (mean step s, peak RSS MB, GPU MB)."""
    from gosgd_p2p import GossipNode, NodeConfig

    torch.set_num_threads(args["threads"])
    if args["switch_interval"]:
        sys.setswitchinterval(args["switch_interval"])
    device = args["device"]
    model = _model(args["model"], device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    shape = (3, 32, 32) if args["model"] == "resnet18" else (1, 8, 8)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args["batch_size"], *shape, generator=gen).to(device)
    y = torch.randint(0, 10, (args["batch_size"],), generator=gen).to(device)
    node = GossipNode(
        model,
        NodeConfig(
            node_id="t",
            cluster=CLUSTER,
            p=args["p"],
            peers=[args["sink"]],
            mdns=False,
            chunk_bytes=args["chunk_bytes"],
            send_process=args["send_process"],
        ),  # fmt: skip
    )
    cuda = device.startswith("cuda")

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        node.step()

    for _ in range(args["warmup"]):
        step()
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args["steps"]):
        step()
    if cuda:
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - started) / args["steps"]
    pushes = node.counters.get("pushes_started")
    child = node.send_process_pid
    child_mb = (rss_mb(child, "VmHWM") or 0.0) if child is not None else 0.0
    node.finish()
    node.close()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0
    out.put((per_step, peak_mb, gpu_mb, pushes, child_mb))


def _result(proc: Any, out: Any, limit_s: float) -> Any:
    """The trainer's result; fails at once if it died instead of waiting out the limit."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            return out.get(timeout=1.0)
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"trainer exited with code {proc.exitcode}") from None
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"trainer gave no result in {limit_s} s") from None


def run(model: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    sink_proc = ctx.Process(target=sink, args=(model, ready, stop))
    sink_proc.start()
    rows = []
    try:
        address = ready.get(timeout=120)
        runs = [(0.0, CHUNK_BYTES, False)]
        runs += [(p, c, False) for c in args.chunk_sizes for p in (0.1, 1.0)]
        if args.send_process:
            runs += [(p, CHUNK_BYTES, True) for p in (0.1, 1.0)]
        for p, chunk_bytes, send_process in runs:
            out = ctx.Queue()
            job = {
                "model": model, "p": p, "sink": address, "steps": args.steps,
                "warmup": args.warmup, "device": args.device, "threads": args.threads,
                "batch_size": args.batch_size, "switch_interval": args.switch_interval,
                "chunk_bytes": chunk_bytes, "send_process": send_process,
            }  # fmt: skip
            proc = ctx.Process(target=trainer, args=(job, out))
            proc.start()
            per_step, rss, gpu, pushes, child_mb = _result(proc, out, limit_s=1800)
            proc.join(60)
            rows.append(
                {"model": model, "p": p, "chunk_kib": chunk_bytes >> 10, "step_s": per_step,
                 "peak_rss_mb": rss, "peak_gpu_mb": gpu, "pushes": pushes,
                 "send_process": send_process, "send_process_rss_mb": child_mb}
            )  # fmt: skip
    finally:
        stop.set()
        sink_proc.join(30)
    base = rows[0]
    for r in rows:
        r["slowdown"] = r["step_s"] / base["step_s"]
        r["rss_ratio"] = r["peak_rss_mb"] / base["peak_rss_mb"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of the trainer")
    parser.add_argument(
        "--switch-interval", type=float, default=0.0,
        help="sys.setswitchinterval of the trainer, seconds (0: Python's default, 0.005)",
    )  # fmt: skip
    parser.add_argument("--chunks-kib", default="1024", help="sender chunk sizes to try, KiB")
    parser.add_argument(
        "--send-process", action="store_true",
        help="also run p = 0.1 and 1.0 with the pushes made by a child process (send_process)",
    )  # fmt: skip
    parser.add_argument("--json", default="bench/results/overhead.json")
    args = parser.parse_args()
    args.chunk_sizes = [int(k) << 10 for k in args.chunks_kib.split(",")]
    rows = [r for m in args.models.split(",") for r in run(m, args)]
    print(f"{'model':>9} {'p':>5} {'sender':>6} {'chunk':>9} {'step ms':>8} {'slowdown':>9} "
          f"{'pushes':>7} {'peak RSS MB':>12} {'RSS ratio':>10} {'GPU MB':>7}")  # fmt: skip
    for r in rows:
        sender = f"+{r['send_process_rss_mb']:.0f}" if r["send_process"] else "node"
        print(
            f"{r['model']:>9} {r['p']:>5} {sender:>6} {r['chunk_kib']:>5} KiB "
            f"{r['step_s'] * 1e3:>8.3f} "
            f"{r['slowdown']:>8.3f}x "
            f"{r['pushes']:>7} {r['peak_rss_mb']:>12.0f} {r['rss_ratio']:>9.2f}x "
            f"{r['peak_gpu_mb']:>7.0f}"
        )
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    for r in rows:
        r["images_per_s"] = args.batch_size / r["step_s"]
    switch = args.switch_interval or sys.getswitchinterval()
    write_json(args.json, "overhead", device=args.device, gpu=gpu, torch=torch.__version__,
               batch_size=args.batch_size, steps=args.steps, switch_interval=switch,
               rows=rows)  # fmt: skip


if __name__ == "__main__":
    main()
