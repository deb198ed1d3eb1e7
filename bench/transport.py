"""Benchmark: streaming a state between two processes on loopback, PushState against raw TCP.

    python -m bench.transport [--sizes 16,64,256] [--chunks-kib 1024,4096] [--repeats 5]
                              [--json PATH]

The receiver is a separate process running a real GossipNode: every push goes through the
project's whole path (PeerClient.push -> chunks -> gRPC -> validation, assembly into a receive
buffer, CRC, finite check, commit, ack), once per sender chunk size. A drain thread in the
receiver empties its inbox without merging, so the number is the transport, not the model
update. Two baselines in the same run: raw TCP (sendall() of the same bytes into a preallocated
recv_into() buffer and a one-byte ack), and bare gRPC (the same bytes as prebuilt 1 MiB raw
messages of one stream-unary call to a handler that copies them into a preallocated buffer:
what any Python gRPC path can hope for). Prints GB/s and the ratios to raw TCP; writes JSON.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
from typing import Any

import torch

from bench.report import write_json
from bench.sink import sink_node
from bench.timing import times_s


class Flat(torch.nn.Module):
    """A model whose state is one float32 vector of `nbytes` bytes."""

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.x = torch.nn.Parameter(torch.zeros(nbytes // 4))


def receiver(nbytes: int, ready: Any, stop: Any) -> None:
    """Serve PushState (a GossipNode), a bare gRPC sink and a raw TCP sink until `stop`."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from gosgd_p2p.wire import grpc_options

    torch.set_num_threads(1)
    node = sink_node(Flat(nbytes), "bench", stop, every_s=0.0005, node_id="rx", inbox_size=2)
    sink = socket.create_server(("127.0.0.1", 0))
    buf = bytearray(nbytes)

    def raw() -> None:
        while not stop.is_set():
            conn, _ = sink.accept()
            with conn:
                view = memoryview(buf)
                while True:
                    got = 0
                    while got < nbytes:
                        n = conn.recv_into(view[got:], nbytes - got)
                        if n == 0:
                            break
                        got += n
                    if got < nbytes:
                        break
                    conn.sendall(b"k")

    threading.Thread(target=raw, daemon=True).start()

    def bare(messages: Any, context: Any) -> bytes:
        got = 0
        for m in messages:
            buf[got : got + len(m)] = m
            got += len(m)
        return b"k"

    bare_server = grpc.server(ThreadPoolExecutor(4), options=grpc_options())
    bare_server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(
            "bench", {"Sink": grpc.stream_unary_rpc_method_handler(bare)})]
    )  # fmt: skip
    bare_port = bare_server.add_insecure_port("127.0.0.1:0")
    bare_server.start()
    ready.put((node.address, sink.getsockname()[1], bare_port))
    stop.wait()
    bare_server.stop(1)
    node.close()


def measure(nbytes: int, chunk_sizes: list[int], repeats: int) -> dict[str, Any]:
    import grpc

    from gosgd_p2p.client import PeerClient
    from gosgd_p2p.malloc import tune_malloc
    from gosgd_p2p.state import StateLayout, module_state
    from gosgd_p2p.v1 import gossip_pb2 as pb
    from gosgd_p2p.wire import PROTOCOL_VERSION, grpc_options

    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=receiver, args=(nbytes, ready, stop))
    proc.start()
    try:
        address, raw_port, bare_port = ready.get(timeout=120)
        payload = torch.randn(nbytes // 4)
        view = memoryview(payload.numpy()).cast("B")
        layout = StateLayout(module_state(Flat(nbytes)))
        tune_malloc()  # as a GossipNode tunes its process

        with socket.create_connection(("127.0.0.1", raw_port)) as conn:

            def raw() -> None:
                conn.sendall(view)
                assert conn.recv(1) == b"k"

            raw_s = times_s(raw, repeats)

        channel = grpc.insecure_channel(f"127.0.0.1:{bare_port}", options=grpc_options())
        sink = channel.stream_unary("/bench/Sink")
        messages = [bytes(view[i : i + (1 << 20)]) for i in range(0, nbytes, 1 << 20)]
        bare_s = times_s(lambda: sink(iter(messages), timeout=120), repeats)
        channel.close()

        client = PeerClient()
        ids = iter(range(1, 1 << 30))

        def push(chunk_bytes: int) -> None:
            header = pb.StateHeader(
                sender_id="tx", message_id=next(ids), weight=0.5,
                fingerprint=layout.fingerprint, encoding=pb.ENCODING_FP32,
                payload_bytes=layout.nbytes, cluster="bench", protocol_version=PROTOCOL_VERSION,
            )  # fmt: skip
            client.push(address, header, view, timeout=120, chunk_bytes=chunk_bytes)

        push_s = {c: times_s(lambda c=c: push(c), repeats) for c in chunk_sizes}
        client.close()
    finally:
        stop.set()
        proc.join(30)
    raw_med = statistics.median(raw_s)
    bare_med = statistics.median(bare_s)
    row: dict[str, Any] = {
        "bytes": nbytes,
        "raw_tcp_gbps": nbytes / raw_med / 1e9,
        "bare_grpc_gbps": nbytes / bare_med / 1e9,
        "bare_grpc_ratio": raw_med / bare_med,
        "raw_tcp_s": raw_s,
        "bare_grpc_s": bare_s,
        "pushstate": [],
    }
    for c, times in push_s.items():
        med = statistics.median(times)
        row["pushstate"].append(
            {"chunk_bytes": c, "gbps": nbytes / med / 1e9, "ratio": raw_med / med,
             "vs_bare_grpc": bare_med / med, "s": times}
        )  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,64,256", help="MB, comma-separated")
    parser.add_argument("--chunks-kib", default="1024,4096", help="sender chunk sizes, KiB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="bench/results/transport.json")
    args = parser.parse_args()
    chunk_sizes = [int(k) << 10 for k in args.chunks_kib.split(",")]
    rows = [measure(int(mb) << 20, chunk_sizes, args.repeats) for mb in args.sizes.split(",")]
    print(f"{'state':>8} {'raw TCP GB/s':>13} {'bare gRPC':>15} {'chunk':>8} {'PushState':>15}"
          f" {'vs bare gRPC':>13}")  # fmt: skip
    for r in rows:
        for i, p in enumerate(r["pushstate"]):
            lead = (
                f"{r['bytes'] >> 20:>5} MB {r['raw_tcp_gbps']:>13.2f}"
                f" {r['bare_grpc_gbps']:>7.2f} ({r['bare_grpc_ratio']:.2f}x)"
                if i == 0 else " " * 37
            )  # fmt: skip
            print(f"{lead} {p['chunk_bytes'] >> 10:>5} KiB {p['gbps']:>6.2f} ({p['ratio']:.2f}x)"
                  f" {p['vs_bare_grpc']:>12.2f}x")  # fmt: skip
    write_json(args.json, "transport", rows=rows)


if __name__ == "__main__":
    main()
