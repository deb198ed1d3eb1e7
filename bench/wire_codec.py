"""Benchmark: the cost of turning a state into chunks and back, in one process.

Compares, in the same run:
- chunk codec: protobuf StateChunk messages (build, serialize, parse, copy out) against the
  hand-written codec of gosgd_p2p.wire (join, memoryview parse, copy out);
- snapshot into a preallocated flat buffer, for a ResNet-18 state: one `copy_` per tensor into
  its slice against one `torch.cat(..., out=flat)` (what StateLayout.flatten_into does).

Prints a table with ratios and writes JSON. Usage: python -m bench.wire_codec [--json PATH]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from bench.report import write_json
from bench.timing import times_s
from gosgd_p2p.models import build_model
from gosgd_p2p.state import StateLayout, module_state
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import CHUNK_BYTES, Chunk, decode_chunk, encode_chunk


def best_of(fn: Callable[[], None], repeats: int) -> float:
    """Fastest of `repeats` timed calls, in seconds (after one warm-up call)."""
    return min(times_s(fn, repeats))


def codec_round_trip(size: int, repeats: int) -> dict[str, float]:
    payload = memoryview(torch.randn(size // 4).numpy()).cast("B")
    out = memoryview(bytearray(size))

    def protobuf() -> None:
        for start in range(0, size, CHUNK_BYTES):
            piece = payload[start : start + CHUNK_BYTES]
            raw = pb.StateChunk(offset=start, data=bytes(piece)).SerializeToString()
            chunk = pb.StateChunk.FromString(raw)
            out[chunk.offset : chunk.offset + len(chunk.data)] = chunk.data

    def handwritten() -> None:
        for start in range(0, size, CHUNK_BYTES):
            raw = encode_chunk(Chunk(offset=start, data=payload[start : start + CHUNK_BYTES]))
            chunk = decode_chunk(raw)
            out[chunk.offset : chunk.offset + len(chunk.data)] = chunk.data

    t_pb = best_of(protobuf, repeats)
    t_hand = best_of(handwritten, repeats)
    return {
        "bytes": size,
        "protobuf_gbps": size / t_pb / 1e9,
        "wire_gbps": size / t_hand / 1e9,
        "speedup": t_pb / t_hand,
    }


def snapshot(repeats: int) -> dict[str, float]:
    model = build_model("resnet18", (3, 32, 32), 10)
    named = module_state(model)
    layout = StateLayout(named)
    tensors = [t for _, t in named]
    flat = torch.empty(layout.numel)

    views = layout.views(flat)

    def per_tensor() -> None:
        for view, t in zip(views, tensors, strict=True):
            view.copy_(t)

    def one_flat_copy() -> None:
        layout.flatten_into(tensors, flat)

    t_each = best_of(per_tensor, repeats)
    t_flat = best_of(one_flat_copy, repeats)
    return {
        "bytes": layout.nbytes,
        "tensors": len(tensors),
        "per_tensor_gbps": layout.nbytes / t_each / 1e9,
        "flat_gbps": layout.nbytes / t_flat / 1e9,
        "speedup": t_each / t_flat,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="bench/results/wire_codec.json")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    codec = [codec_round_trip(mb << 20, args.repeats) for mb in (16, 64)]
    snap = snapshot(args.repeats)

    print(f"{'payload':>10} {'protobuf GB/s':>14} {'wire GB/s':>10} {'ratio':>7}")
    for row in codec:
        print(
            f"{row['bytes'] >> 20:>7} MB {row['protobuf_gbps']:>14.2f} "
            f"{row['wire_gbps']:>10.2f} {row['speedup']:>6.2f}x"
        )
    print(
        f"resnet18 snapshot ({snap['tensors']} tensors, {snap['bytes'] / 1e6:.1f} MB): "
        f"per-tensor copy_ {snap['per_tensor_gbps']:.2f} GB/s, one cat {snap['flat_gbps']:.2f} "
        f"GB/s, {snap['speedup']:.2f}x"
    )
    write_json(args.json, "wire_codec", torch=torch.__version__, codec=codec, snapshot=snap)


if __name__ == "__main__":
    main()
