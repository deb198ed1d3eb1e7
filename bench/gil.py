"""Benchmark: what encoding a push costs a training thread that needs the GIL.

    python bench/gil.py [--state-mb 44.7] [--seconds 2] [--repeats 3] [--json PATH]

A GPU training thread spends its time dispatching small ops: Python code between calls that
release the GIL. Here such a thread runs a loop of small in-place torch ops while a sender
thread encodes push after push of a ResNet-18-sized state (split_for_streaming: CRC and chunk
assembly, no network, so only the GIL is shared; the two threads fit on two cores). Reported:
the training thread's op rate beside the sender as a fraction of its rate alone, and the
training time lost per push, for the project's chunk assembly (the copy made outside the GIL,
wire._join) against a plain b"".join (the copy made under the GIL) measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Any

import torch
from report import write_json  # bench/report.py, beside this script

from gosgd_p2p import wire
from gosgd_p2p.v1 import gossip_pb2 as pb


def op_rate(seconds: float, x: torch.Tensor) -> float:
    """Small in-place ops per second on this thread (each releases and retakes the GIL)."""
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(50):
            x.add_(1.0)
        n += 50
    return n / seconds


def measure(join: Any, payload: memoryview, seconds: float) -> dict[str, float]:
    header = pb.StateHeader(sender_id="tx", message_id=1, weight=0.5, payload_bytes=len(payload))
    x = torch.zeros(4)
    alone = op_rate(seconds, x)
    stop = threading.Event()
    pushes = [0]

    def sender() -> None:
        while not stop.is_set():
            for _ in wire.split_for_streaming(header, payload):
                pass
            pushes[0] += 1

    original, wire._join = wire._join, join
    thread = threading.Thread(target=sender, name="sender")
    try:
        thread.start()
        beside = op_rate(seconds, x)
    finally:
        stop.set()
        thread.join()
        wire._join = original
    per_push_ms = (1 - beside / alone) * seconds / max(pushes[0], 1) * 1e3
    return {
        "rate_ratio": beside / alone,
        "pushes_per_s": pushes[0] / seconds,
        "lost_ms_per_push": per_push_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-mb", type=float, default=44.7)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="bench/results/gil.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    payload = memoryview(torch.randn(int(args.state_mb * 1e6) // 4).numpy()).cast("B")
    variants = {"b''.join (copy under the GIL)": lambda parts: b"".join(parts),
                "wire._join (copy outside it)": wire._join}  # fmt: skip
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        for name, join in variants.items():
            runs[name].append(measure(join, payload, args.seconds))
    print(f"{'chunk assembly':<32} {'train rate':>11} {'pushes/s':>9} {'lost ms/push':>13}")
    summary = {}
    for name, rows in runs.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        summary[name] = med
        print(
            f"{name:<32} {med['rate_ratio']:>10.3f}x {med['pushes_per_s']:>9.1f}"
            f" {med['lost_ms_per_push']:>13.2f}"
        )
    write_json(args.json, "gil", state_bytes=len(payload), median=summary, runs=runs)


if __name__ == "__main__":
    main()
