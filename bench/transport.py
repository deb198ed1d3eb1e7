"""Benchmark: streaming a state between two processes on loopback, PushState against raw TCP.

    python bench/transport.py [--sizes 16,64,256] [--repeats 5] [--json PATH]

The receiver is a separate process running a real GossipNode: every push goes through the
project's whole path (PeerClient.push -> chunks -> gRPC -> validation, assembly into a receive
buffer, CRC, finite check, commit, ack). A drain thread in the receiver empties its inbox
without merging, so the number is the transport, not the model update. The baseline in the same
run: a plain TCP socket, sendall() of the same bytes into a preallocated recv_into() buffer and
a one-byte ack. Prints GB/s and the ratio to raw TCP; writes JSON.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import time
from typing import Any

import torch
from report import write_json  # bench/report.py, beside this script


class Flat(torch.nn.Module):
    """A model whose state is one float32 vector of `nbytes` bytes."""

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.x = torch.nn.Parameter(torch.zeros(nbytes // 4))


def receiver(nbytes: int, ready: Any, stop: Any) -> None:
    """Serve PushState (a GossipNode) and a raw TCP sink until `stop` is set."""
    import threading

    from gosgd_p2p import GossipNode, NodeConfig

    torch.set_num_threads(1)
    node = GossipNode(
        Flat(nbytes), NodeConfig(node_id="rx", cluster="bench", p=0.0, mdns=False, inbox_size=2)
    )

    def drain() -> None:  # release receive buffers without merging
        while not stop.is_set():
            for msg in node.inbox.drain():
                msg.release(msg.payload)
            time.sleep(0.0005)

    threading.Thread(target=drain, daemon=True).start()
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
    ready.put((node.address, sink.getsockname()[1]))
    stop.wait()
    node.close()


def measure(nbytes: int, repeats: int) -> dict[str, Any]:
    from gosgd_p2p.client import PeerClient
    from gosgd_p2p.malloc import tune_malloc
    from gosgd_p2p.state import StateLayout, module_state
    from gosgd_p2p.v1 import gossip_pb2 as pb
    from gosgd_p2p.wire import PROTOCOL_VERSION

    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=receiver, args=(nbytes, ready, stop))
    proc.start()
    try:
        address, raw_port = ready.get(timeout=120)
        payload = torch.randn(nbytes // 4)
        view = memoryview(payload.numpy()).cast("B")
        layout = StateLayout(module_state(Flat(nbytes)))

        # raw TCP: one connection, `repeats` transfers, each acked
        raw_times = []
        with socket.create_connection(("127.0.0.1", raw_port)) as conn:
            for _ in range(repeats + 1):
                started = time.perf_counter()
                conn.sendall(view)
                assert conn.recv(1) == b"k"
                raw_times.append(time.perf_counter() - started)

        # PushState: the node's own client and server (tuned as a GossipNode tunes its process)
        tune_malloc()
        client = PeerClient()
        push_times = []
        for i in range(repeats + 1):
            header = pb.StateHeader(
                sender_id="tx", message_id=i + 1, weight=0.5, fingerprint=layout.fingerprint,
                encoding=pb.ENCODING_FP32, payload_bytes=layout.nbytes, cluster="bench",
                protocol_version=PROTOCOL_VERSION,
            )  # fmt: skip
            started = time.perf_counter()
            client.push(address, header, view, timeout=120)
            push_times.append(time.perf_counter() - started)
        client.close()
    finally:
        stop.set()
        proc.join(30)
    raw_s = statistics.median(raw_times[1:])  # the first transfer warms up both ends
    push_s = statistics.median(push_times[1:])
    return {
        "bytes": nbytes,
        "raw_tcp_gbps": nbytes / raw_s / 1e9,
        "pushstate_gbps": nbytes / push_s / 1e9,
        "ratio": raw_s / push_s,
        "raw_tcp_s": raw_times[1:],
        "pushstate_s": push_times[1:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,64,256", help="MB, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="bench/results/transport.json")
    args = parser.parse_args()
    rows = [measure(int(mb) << 20, args.repeats) for mb in args.sizes.split(",")]
    print(f"{'state':>8} {'raw TCP GB/s':>13} {'PushState GB/s':>15} {'ratio':>7}")
    for r in rows:
        print(
            f"{r['bytes'] >> 20:>5} MB {r['raw_tcp_gbps']:>13.2f} {r['pushstate_gbps']:>15.2f}"
            f" {r['ratio']:>6.2f}x"
        )
    write_json(args.json, "transport", rows=rows)


if __name__ == "__main__":
    main()
