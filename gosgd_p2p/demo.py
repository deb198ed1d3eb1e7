"""gosgd-demo: N local gosgd-node processes on loopback, live progress, a summary and a plot.

Node 0 starts on a free port; the others get its address as their only seed and find each
other by peer exchange. Every node logs JSON lines and saves its final state, from which the
demo computes the consensus model sum(a_i x_i) / sum(a_i) and evaluates it. Finished nodes
linger until every node has finished, so the demo checks the total weight from outside with
gosgd-status's survey before it stops them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import grpc

from gosgd_p2p.client import PeerClient
from gosgd_p2p.plotting import plot_nodes, read_log
from gosgd_p2p.status import survey

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gosgd-demo",
        description="Run a local GoSGD cluster of gosgd-node processes and report on it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--nodes", type=int, default=4, help="number of nodes")
    p.add_argument("--model", default="cnn")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--steps", type=int, default=600, help="local steps per node")
    p.add_argument("--p", type=float, default=0.1, help="push probability per step")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--shard", action="store_true", help="give each node a disjoint data shard")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="output folder (default runs/demo-TIMESTAMP)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before giving up")
    return p


def _node_command(args: argparse.Namespace, i: int, out: Path, seed: str | None) -> list[str]:
    threads = max(1, (os.cpu_count() or 1) // args.nodes)
    cmd = [
        sys.executable, "-m", "gosgd_p2p.cli",
        "--node-id", f"node-{i}",
        "--listen", "127.0.0.1:0",
        "--cluster", f"demo-{out.name}",
        "--p", str(args.p),
        "--model", args.model,
        "--dataset", args.dataset,
        "--steps", str(args.steps),
        "--batch-size", str(args.batch_size),
        "--lr", str(args.lr),
        "--eval-every", str(args.eval_every),
        "--device", args.device,
        "--threads", str(threads),
        "--wait-for-peers", str(args.nodes - 1),
        "--no-mdns",  # wired by seed lists on loopback
        "--log-json", str(out / f"node-{i}.jsonl"),
        "--save-final", str(out / f"node-{i}.pt"),
        "--linger", str(args.timeout),  # until the demo has asked every node (then SIGTERM)
    ]  # fmt: skip
    if seed:
        cmd += ["--peers", seed]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if args.shard:
        cmd += ["--shard", f"{i}/{args.nodes}"]
    return cmd


def _stdout_lines(proc: subprocess.Popen[str]) -> queue.Queue[str | None]:
    """A queue fed with the process's stdout lines by a reader thread; None at EOF."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, name=f"demo-stdout-{proc.pid}", daemon=True).start()
    return lines


def _wait_for_address(lines: queue.Queue[str | None], log_path: Path, timeout: float) -> str:
    """The address a node prints once it listens; RuntimeError if it exits or times out."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        if " listening on " in line:
            return line.rsplit(" ", 1)[1].strip()
    raise RuntimeError(f"node 0 did not start; see {log_path}")


def _read_records(path: Path) -> list[dict[str, Any]]:
    return read_log(path) if path.exists() else []


def _all_finished(out: Path, n: int) -> bool:
    """Whether every node has written its final record (and lingers, answering Status)."""
    for i in range(n):
        recs = _read_records(out / f"node-{i}.jsonl")
        if not recs or not recs[-1]["final"]:
            return False
    return True


def _progress(out: Path, n: int, steps: int) -> str:
    parts = []
    for i in range(n):
        recs = _read_records(out / f"node-{i}.jsonl")
        if recs:
            r = recs[-1]
            parts.append(f"node-{i} {r['step']:>5}/{steps} acc {r['test_accuracy']:.3f}")
        else:
            parts.append(f"node-{i} starting")
    return " | ".join(parts)


def _consensus_accuracy(out: Path, args: argparse.Namespace, n: int) -> tuple[float, float]:
    """Accuracy of sum(a_i x_i)/sum(a_i) over the nodes' saved final states, and sum(a_i)."""
    import torch

    from gosgd_p2p.algorithm import consensus
    from gosgd_p2p.data import evaluate, load_dataset
    from gosgd_p2p.models import build_model
    from gosgd_p2p.state import module_state

    finals = [torch.load(out / f"node-{i}.pt", weights_only=True) for i in range(n)]
    weights = [f["weight"] for f in finals]
    avg = consensus([f["state"] for f in finals], weights)
    data = load_dataset(args.dataset, args.data_dir)
    model = build_model(args.model, data.input_shape, data.num_classes)
    with torch.no_grad():
        for (_, t), v in zip(module_state(model), avg, strict=True):
            t.copy_(v)
    _, acc = evaluate(model, data.test_x, data.test_y, torch.device("cpu"))
    return acc, math.fsum(weights)


def _short_shard_note(args: argparse.Namespace) -> str | None:
    """With --shard, the line the smallest node would log when it holds fewer examples than
    --batch-size (every step then trains on its whole shard); None otherwise, or when the data
    set cannot be read here (the nodes report that themselves)."""
    if not args.shard:
        return None
    from gosgd_p2p.data import load_dataset, short_data_note

    try:
        n = len(load_dataset(args.dataset, args.data_dir).train_y)
    except (ValueError, FileNotFoundError):
        return None
    # shard() sizes are n // nodes or one more; shard 0 is always a smallest one
    return short_data_note(n // args.nodes, args.batch_size, f"0/{args.nodes}")


def _plot(out: Path, n: int) -> Path:
    logs = {f"node-{i}": _read_records(out / f"node-{i}.jsonl") for i in range(n)}
    return plot_nodes(logs, out / "accuracy.png", title="GoSGD demo: per-node progress")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.nodes < 2:
        print("gosgd-demo: error: --nodes must be at least 2", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("node-*"):
        old.unlink()
    print(f"gosgd-demo: {args.nodes} nodes, {args.model} on {args.dataset}, p={args.p}; "
          f"output in {out}")  # fmt: skip
    note = _short_shard_note(args)
    if note:
        print(f"gosgd-demo: note: {note}")

    procs: list[subprocess.Popen[str]] = []
    logs: list[IO[str]] = []
    tty = sys.stdout.isatty()
    try:
        # start node 0, learn its address, then the others with it as their seed
        seed = None
        for i in range(args.nodes):
            err = open(out / f"node-{i}.log", "w")  # noqa: SIM115 - closed in finally
            logs.append(err)
            proc = subprocess.Popen(
                _node_command(args, i, out, seed), stdout=subprocess.PIPE, stderr=err, text=True
            )
            procs.append(proc)
            lines = _stdout_lines(proc)
            if seed is None:
                seed = _wait_for_address(lines, out / "node-0.log", timeout=120)
                print(f"gosgd-demo: watch the cluster with: gosgd-status {seed} --watch")

        # live progress until every node has finished (or exited)
        deadline = time.monotonic() + args.timeout
        last = ""
        while any(p.poll() is None for p in procs) and not _all_finished(out, args.nodes):
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes still running after {args.timeout:.0f} s")
            line = _progress(out, args.nodes, args.steps)
            if line != last:
                print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
                last = line
            time.sleep(0.5)  # a display refresh, not synchronisation
        if tty:
            print()
        if _all_finished(out, args.nodes):
            # the finished nodes linger: check the cluster's total weight from outside
            client = PeerClient()
            try:
                status = survey(client, seed or "")
                print("gosgd-status (every node asked over gRPC, after all finished):")
                print(status.table())
                (out / "status.json").write_text(json.dumps(status.to_json(), indent=2))
            except grpc.RpcError as err:
                print(f"gosgd-demo: node-0 did not answer Status: {err.code().name}")  # type: ignore[attr-defined]
            finally:
                client.close()
    except KeyboardInterrupt:
        print("\ngosgd-demo: interrupted; nodes hand over their weight and stop", file=sys.stderr)
        return 130
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs:
            f.close()

    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        for i in failed:
            print(f"node-{i} exited with {procs[i].returncode}; see {out / f'node-{i}.log'}")
        return 1

    # summary: per-node table, consensus model, plot
    finals = [_read_records(out / f"node-{i}.jsonl")[-1] for i in range(args.nodes)]
    cons_acc, total_weight = _consensus_accuracy(out, args, args.nodes)
    plot = _plot(out, args.nodes)
    header = f"{'node':<8}{'steps':>6}{'test acc':>10}{'weight':>12}{'sent':>7}{'recv':>7}"
    rows = [header + f"{'returned':>10}{'MB sent':>9}"]
    for r in finals:
        rows.append(
            f"{r['node_id']:<8}{r['step']:>6}{r['test_accuracy']:>10.4f}{r['weight']:>12.6f}"
            f"{r['messages_sent']:>7}{r['messages_received']:>7}{r['messages_returned']:>10}"
            f"{r['bytes_sent'] / 1e6:>9.2f}"
        )
    print("\n".join(rows))
    messages = sum(r["messages_sent"] for r in finals)
    print(f"consensus model (sum a_i x_i / sum a_i): test accuracy {cons_acc:.4f}")
    print(f"total weight {total_weight!r} (started with {args.nodes}); {messages} messages")
    print(f"plot: {plot}")
    summary = {
        "nodes": finals,
        "consensus_accuracy": cons_acc,
        "total_weight": total_weight,
        "messages": messages,
        "plot": str(plot),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
