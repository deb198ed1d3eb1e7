"""Benchmark: what one push of the time-to-accuracy benchmark's wide_mlp state costs the CPU,
stage by stage, in each wire encoding, in one process on one thread (no network).

- snapshot: the sender's training thread copies the state into a send buffer, encoded
  (Staging.snapshot, as LocalState.split_into calls it);
- decode: the receiver turns the payload back into float32 (codec.decode; fp32 is a copy);
- finite: the receiver's check that every element is finite (state.all_finite);
- merge: the receiver's training thread measures the distance to its own state and merges
  (LocalState.merge: the difference, its norm, then algorithm.merge_).

Prints the median milliseconds of each stage per encoding and writes JSON. The bytes on the
wire, gRPC and the kernel are not in it. Usage: python -m bench.push_cost [--repeats 20]
[--json bench/results/push_cost.json]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench.report import write_json
from bench.time_to_accuracy.wide import bench_model
from bench.timing import times_s
from gosgd_p2p import algorithm
from gosgd_p2p.codec import buffer_numel, decode
from gosgd_p2p.staging import Staging
from gosgd_p2p.state import StateLayout, all_finite, module_state
from gosgd_p2p.wire import ENCODINGS, payload_bytes


def stage_ms(
    encoding: int,
    layout: StateLayout,
    tensors: list[torch.Tensor],
    other: torch.nn.Module,
    repeats: int,
) -> dict[str, float]:
    """Median milliseconds of each stage of one push in `encoding`: `other`'s state is
    snapshot and sent, and merged into `tensors` (a state of `layout`)."""
    staging = Staging(layout, [t for _, t in module_state(other)], encoding)
    send = torch.empty(buffer_numel(encoding, layout.numel), dtype=torch.float32)
    wire = send.view(torch.uint8)[: payload_bytes(encoding, layout.numel)]
    received = torch.empty(layout.numel, dtype=torch.float32)
    weight = [1.0]

    def merge() -> None:
        incoming = layout.views(received)
        diffs = torch._foreach_sub(incoming, tensors)
        torch.linalg.vector_norm(torch.stack(torch._foreach_norm(diffs)))
        weight[0] = algorithm.merge_(tensors, weight[0], incoming, 0.5) / 2  # stays > 0

    stages = {
        "snapshot": lambda: staging.snapshot(send)(),
        "decode": lambda: decode(encoding, wire, received),
        "finite": lambda: all_finite(received),
        "merge": merge,
    }
    return {k: 1e3 * statistics.median(times_s(fn, repeats)) for k, fn in stages.items()}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.push_cost", description=__doc__)
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per stage (20)")
    parser.add_argument("--json", default="bench/results/push_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the benchmark's workers run

    torch.manual_seed(0)
    mine, theirs = (bench_model("wide_mlp", (1, 8, 8), 10) for _ in range(2))
    named = module_state(mine)
    layout = StateLayout(named)
    tensors = [t for _, t in named]
    results = {}
    print(f"wide_mlp: {layout.numel} elements; median ms over {args.repeats} calls, 1 thread")
    print(f"{'encoding':<9} {'MB':>6} {'snapshot':>9} {'decode':>7} {'finite':>7} {'merge':>7}")
    for name, encoding in ENCODINGS.items():
        ms = stage_ms(encoding, layout, tensors, theirs, args.repeats)
        nbytes = payload_bytes(encoding, layout.numel)
        results[name] = {"payload_bytes": nbytes, "ms": ms, "ms_total": sum(ms.values())}
        print(
            f"{name:<9} {nbytes / 1e6:>6.2f} {ms['snapshot']:>9.2f} {ms['decode']:>7.2f} "
            f"{ms['finite']:>7.2f} {ms['merge']:>7.2f}   total {sum(ms.values()):.2f} ms"
        )
    write_json(args.json, "push_cost", numel=layout.numel, repeats=args.repeats, results=results)


if __name__ == "__main__":
    main()
