"""Benchmark: what gossip costs the training loop, at p = 0, 0.1 and 1.0.

    python -m bench.overhead [--models mlp,cnn] [--steps 300] [--send-process]
        [--network-process] [--json PATH]

For each model and p, a fresh process trains one node with the built-in loop shape (forward,
backward, SGD step, node.step()) while a sink node in another process takes its pushes (and
releases them unmerged, so the sink does not compete for the CPU with merges). Each run reports
the mean step time after a warm-up and the peak RSS of the training process (and peak CUDA
memory on a GPU). Ratios are against p = 0 measured in the same run. On a CUDA machine
`--models resnet18 --device cuda --batch-size 128` is the GPU configuration.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from typing import Any

import torch

from bench import procs, sink, workloads
from bench.report import write_json
from gosgd_p2p.wire import CHUNK_BYTES


def trainer(args: dict[str, Any], out: Any) -> None:
    """Train `steps` steps at push probability p; put (mean step s, peak RSS MB, GPU MB)."""
    from gosgd_p2p import GossipNode, NodeConfig

    torch.set_num_threads(args["threads"])
    if args["switch_interval"]:
        sys.setswitchinterval(args["switch_interval"])
    device = args["device"]
    work = workloads.workload(args["model"], args["batch_size"], device)
    node = GossipNode(
        work.model,
        NodeConfig(
            node_id="t",
            cluster=workloads.CLUSTER,
            p=args["p"],
            peers=[args["sink"]],
            mdns=False,
            chunk_bytes=args["chunk_bytes"],
            send_process=args["mode"] == "send_process",
            network_process=args["mode"] == "network_process",
        ),  # fmt: skip
    )
    cuda = device.startswith("cuda")

    def step() -> None:
        work.step()
        node.step()
        sink.refill(node)

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
    child_mb = (procs.rss_mb(child, "VmHWM") or 0.0) if child is not None else 0.0
    node.finish()
    node.close()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0
    out.put((per_step, peak_mb, gpu_mb, pushes, child_mb))


def run(model: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    with sink.running(model) as (address, _):
        runs = [(0.0, CHUNK_BYTES, "threads")]
        runs += [(p, c, "threads") for c in args.chunk_sizes for p in (0.1, 1.0)]
        for mode in ("send_process", "network_process"):
            if getattr(args, mode):
                runs += [(p, CHUNK_BYTES, mode) for p in (0.1, 1.0)]
        for p, chunk_bytes, mode in runs:
            job = {
                "model": model, "p": p, "sink": address, "steps": args.steps,
                "warmup": args.warmup, "device": args.device, "threads": args.threads,
                "batch_size": args.batch_size, "switch_interval": args.switch_interval,
                "chunk_bytes": chunk_bytes, "mode": mode,
            }  # fmt: skip
            per_step, rss, gpu, pushes, child_mb = procs.run_job(
                trainer, job, limit_s=1800, name="trainer"
            )
            rows.append(
                {"model": model, "p": p, "chunk_kib": chunk_bytes >> 10, "step_s": per_step,
                 "peak_rss_mb": rss, "peak_gpu_mb": gpu, "pushes": pushes,
                 "mode": mode, "send_process": mode == "send_process",
                 "send_process_rss_mb": child_mb}
            )  # fmt: skip
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
    parser.add_argument(
        "--network-process", action="store_true",
        help="also run p = 0.1 and 1.0 with gRPC served and pushes made by a child process "
        "(network_process)",
    )  # fmt: skip
    parser.add_argument("--json", default="bench/results/overhead.json")
    args = parser.parse_args()
    args.chunk_sizes = [int(k) << 10 for k in args.chunks_kib.split(",")]
    rows = [r for m in args.models.split(",") for r in run(m, args)]
    print(f"{'model':>9} {'p':>5} {'sender':>6} {'chunk':>9} {'step ms':>8} {'slowdown':>9} "
          f"{'pushes':>7} {'peak RSS MB':>12} {'RSS ratio':>10} {'GPU MB':>7}")  # fmt: skip
    for r in rows:
        child = {"send_process": "s", "network_process": "n"}.get(r["mode"])
        sender = f"{child}+{r['send_process_rss_mb']:.0f}" if child else "node"
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
