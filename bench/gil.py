"""Benchmark: what encoding and assembling messages cost a training thread that needs the GIL.

    python -m bench.gil [--state-mb 44.7] [--seconds 2] [--repeats 3] [--json PATH]

A GPU training thread spends its time dispatching small ops: Python code between calls that
release the GIL. Here such a thread runs a loop of small in-place torch ops while another
thread handles message after message of a ResNet-18-sized state, with no network, so only the
GIL is shared (the two threads fit on two cores): a sender encoding pushes
(split_for_streaming: CRC and chunk assembly) or a server thread assembling received chunks
into a receive buffer (assemble: copy and CRC). Reported: the training thread's op rate beside
it as a fraction of its rate alone, and the training time lost per message, for the project's
copies (made outside the GIL: wire._join, wire._copy_into) against the same copies made under
the GIL (b"".join, memoryview slice assignment), measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from bench.report import write_json
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


def _locked_join(parts: list[bytes | memoryview]) -> bytes:
    return b"".join(parts)


def _locked_copy_into(out: memoryview, at: int, data: bytes | memoryview) -> None:
    out[at : at + len(data)] = data


def measure(side: str, locked: bool, payload: memoryview, seconds: float) -> dict[str, float]:
    header = pb.StateHeader(sender_id="tx", message_id=1, weight=0.5, payload_bytes=len(payload))
    chunks = [wire.decode_chunk(raw) for raw in wire.split_for_streaming(header, payload)][1:]
    out = memoryview(bytearray(len(payload)))
    x = torch.zeros(4)
    alone = op_rate(seconds, x)
    stop = threading.Event()
    messages = [0]

    def handle() -> None:
        while not stop.is_set():
            if side == "send":
                for _ in wire.split_for_streaming(header, payload):
                    pass
            else:
                wire.assemble(header, chunks, out)
            messages[0] += 1

    saved = wire._join, wire._copy_into
    if locked:
        wire._join, wire._copy_into = _locked_join, _locked_copy_into
    thread = threading.Thread(target=handle, name=side)
    try:
        thread.start()
        beside = op_rate(seconds, x)
    finally:
        stop.set()
        thread.join()
        wire._join, wire._copy_into = saved
    return {
        "rate_ratio": beside / alone,
        "messages_per_s": messages[0] / seconds,
        "lost_ms_per_message": (1 - beside / alone) * seconds / max(messages[0], 1) * 1e3,
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
    variants = [(side, locked) for side in ("send", "receive") for locked in (True, False)]
    runs: dict[str, list[dict[str, float]]] = {}
    for _ in range(args.repeats):  # interleaved, so drift hits every variant alike
        for side, locked in variants:
            name = f"{side}, copies {'under' if locked else 'outside'} the GIL"
            runs.setdefault(name, []).append(measure(side, locked, payload, args.seconds))
    print(f"{'message handling':<34} {'train rate':>11} {'msgs/s':>7} {'lost ms/msg':>12}")
    summary = {}
    for name, rows in runs.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        summary[name] = med
        print(
            f"{name:<34} {med['rate_ratio']:>10.3f}x {med['messages_per_s']:>7.1f}"
            f" {med['lost_ms_per_message']:>12.2f}"
        )
    write_json(args.json, "gil", state_bytes=len(payload), median=summary, runs=runs)


if __name__ == "__main__":
    main()
