"""Benchmark: the device side of one push and one merge of a ResNet-18 state, on CUDA.

    python -m bench.gpu_micro [--model resnet18] [--repeats 50] [--json PATH]

Snapshot, four ways: per-tensor `.cpu()`, one flat copy into pageable memory, one flat copy
into a pinned buffer (end to end), and the node's own path (gosgd_p2p.staging: gather on the
training stream, copy-out on a side stream into a pinned buffer) with the time the training
thread spends in it (enqueueing) apart from the time until the copy is done. Merge, three ways:
one flat lerp (the memory-bandwidth floor), torch._foreach_lerp_ over the tensors (what
algorithm.merge_ runs), and the node's path (copy from the pinned receive buffer into the
device, then merge_). Times are medians over `repeats`, after a warm-up; ratios are against
per-tensor `.cpu()` (snapshot) and the flat lerp (merge), measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.report import write_json
from bench.timing import times_s
from gosgd_p2p import algorithm
from gosgd_p2p.models import build_model
from gosgd_p2p.staging import Staging
from gosgd_p2p.state import StateLayout, module_state


def median_s(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of fn() with the device idle before and done after each call."""
    return statistics.median(times_s(fn, repeats, warmup=3, sync=torch.cuda.synchronize))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", default="bench/results/gpu_micro.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_micro: needs a CUDA device")
    torch.manual_seed(0)
    model = build_model(args.model, (3, 32, 32), 10).cuda()
    named = module_state(model)
    layout = StateLayout(named)
    tensors = [t for _, t in named]
    staging = Staging(layout, tensors)
    nbytes = layout.nbytes
    pinned = torch.empty(layout.numel).pin_memory()
    pageable = torch.empty(layout.numel)
    flat = torch.empty(layout.numel, device="cuda")
    enqueue: list[float] = []

    def node_snapshot() -> None:
        started = time.perf_counter()
        wait = staging.snapshot(pinned)
        enqueue.append(time.perf_counter() - started)
        wait()

    snapshot = {
        "per_tensor_cpu": median_s(lambda: [t.cpu() for t in tensors], args.repeats),
        "flat_pageable": median_s(
            lambda: pageable.copy_(torch.cat([t.reshape(-1) for t in tensors], out=flat)),
            args.repeats,
        ),
        "flat_pinned": median_s(
            lambda: pinned.copy_(torch.cat([t.reshape(-1) for t in tensors], out=flat)),
            args.repeats,
        ),
        "node_staging": median_s(node_snapshot, args.repeats),
    }
    enqueue_s = statistics.median(enqueue[3:])

    x = torch.randn(layout.numel, device="cuda")
    xs = torch.randn(layout.numel, device="cuda")
    views_x, views_xs = layout.views(x), layout.views(xs)
    incoming = torch.randn(layout.numel).pin_memory()
    merge = {
        "flat_lerp": median_s(lambda: x.lerp_(xs, 0.3), args.repeats),
        "foreach_lerp": median_s(
            lambda: algorithm.merge_(views_x, 1.0, views_xs, 0.5), args.repeats
        ),
        "node_load_and_merge": median_s(
            lambda: algorithm.merge_(views_x, 1.0, layout.views(staging.load(incoming)), 0.5),
            args.repeats,
        ),
    }
    base_snap, base_merge = snapshot["per_tensor_cpu"], merge["flat_lerp"]
    gpu = torch.cuda.get_device_name()
    print(f"{args.model}: {nbytes / 1e6:.1f} MB in {len(tensors)} tensors on {gpu}")
    print(f"{'snapshot':<22} {'ms':>8} {'GB/s':>7} {'vs .cpu()':>10}")
    for name, s in snapshot.items():
        print(f"{name:<22} {s * 1e3:>8.3f} {nbytes / s / 1e9:>7.1f} {base_snap / s:>9.2f}x")
    print(f"{'  (training thread)':<22} {enqueue_s * 1e3:>8.3f}")
    print(f"{'merge':<22} {'ms':>8} {'GB/s':>7} {'vs flat':>10}")
    for name, s in merge.items():
        print(f"{name:<22} {s * 1e3:>8.3f} {3 * nbytes / s / 1e9:>7.1f} {base_merge / s:>9.2f}x")
    write_json(
        args.json,
        "gpu_micro",
        device=gpu,
        torch=torch.__version__,
        model=args.model,
        state_bytes=nbytes,
        tensors=len(tensors),
        snapshot_s=snapshot,
        snapshot_enqueue_s=enqueue_s,
        merge_s=merge,
        note="merge GB/s counts 3 state-sized passes (read x, read x_s, write x)",
    )


if __name__ == "__main__":
    main()
