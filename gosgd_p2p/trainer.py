"""The built-in trainer behind gosgd-node: a plain PyTorch loop plus the GossipNode API.

It does nothing a user's own loop could not: build the model from the cluster seed, take local
SGD steps on this node's data, call node.step(), evaluate now and then, and settle the weight
at the end (finish) or hand it over on a stop request (leave).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from gosgd_p2p import checkpoint
from gosgd_p2p.config import NodeConfig, TrainConfig, cluster_seed, text_seed
from gosgd_p2p.data import (
    BatchSampler,
    evaluate,
    load_dataset,
    parse_shard,
    shard,
    short_data_note,
)
from gosgd_p2p.metrics import MetricsServer
from gosgd_p2p.models import build_model
from gosgd_p2p.node import GossipNode

__all__ = ["resolve_device", "train"]

log = logging.getLogger(__name__)


def resolve_device(spec: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; "cpu", "cuda", "cuda:K" checked to exist."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"--device {spec!r}: use auto, cpu, cuda or cuda:K") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: CUDA is not available here (use cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) here")
    elif device.type != "cpu":
        raise ValueError(f"--device {spec!r}: use auto, cpu, cuda or cuda:K")
    return device


def train(
    node_cfg: NodeConfig,
    cfg: TrainConfig,
    stop: threading.Event | None = None,
    on_ready: Callable[[GossipNode], None] | None = None,
) -> dict[str, Any]:
    """Train one node until cfg.steps or `stop`; returns the final log record.

    On `stop` the node leaves gracefully (hands its whole weight to a live peer); after
    cfg.steps it finishes (settles every in-flight message). `on_ready` is called once the
    node is listening and has a state, before the first step.
    """
    stop = stop or threading.Event()
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    # data: the whole training set, or this node's disjoint shard of it
    data = load_dataset(cfg.dataset, cfg.data_dir)
    if cfg.shard:
        data = shard(data, *parse_shard(cfg.shard))
    data_seed = cfg.seed if cfg.seed is not None else text_seed(f"data:{node_cfg.node_id}")
    # full batches only (BatchSampler's rule): a short one would skew BatchNorm
    batches = BatchSampler(data.train_x, data.train_y, cfg.batch_size, seed=data_seed)
    note = short_data_note(len(data.train_y), cfg.batch_size, cfg.shard)
    if note:
        log.warning("%s", note)
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)

    # model: every founder builds the same initial state from the cluster seed
    torch.manual_seed(cluster_seed(node_cfg.cluster))
    model = build_model(cfg.model, data.input_shape, data.num_classes).to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )

    # resume: step and optimizer state; a node that resumes was a member, so it rejoins (the
    # state and weight come from a running peer) and never founds anew: its checkpointed weight
    # may still be held by others, and founding would add a founder's weight to the cluster
    resume = checkpoint.latest(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if resume is not None:
        saved, path = resume
        if saved["node_id"] != node_cfg.node_id:
            log.warning("checkpoint %s belongs to node %s", path, saved["node_id"])
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])

    with contextlib.ExitStack() as stack:
        node = GossipNode(model, node_cfg, member=resume is not None)
        stack.callback(node.close)
        if resume is not None:
            node.step_count = int(resume[0]["step"])
            log.info(
                "resumed from %s at step %d (rejoined the cluster), weight %.6g",
                resume[1],
                node.step_count,
                node.weight,
            )
        metrics = None
        if cfg.metrics_port:
            metrics = MetricsServer(node, cfg.metrics_port)
            stack.callback(metrics.close)
            log.info("metrics on http://0.0.0.0:%d/metrics", metrics.port)
        log_file = (
            stack.enter_context(open(cfg.log_json, "a", buffering=1)) if cfg.log_json else None
        )
        progress = Progress(node, cfg.steps, enabled=cfg.progress)

        def save_checkpoint() -> None:
            assert cfg.checkpoint_dir is not None
            checkpoint.save(
                cfg.checkpoint_dir,
                {
                    "step": node.step_count,
                    "weight": node.weight,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "node_id": node_cfg.node_id,
                },
            )

        if on_ready is not None:
            on_ready(node)
        if cfg.wait_for_peers:
            waited = time.monotonic()
            if node.wait_for_peers(cfg.wait_for_peers, cfg.wait_timeout_s):
                log.info(
                    "%d peers ready after %.1f s", cfg.wait_for_peers, time.monotonic() - waited
                )
            else:
                log.warning(
                    "only %d of %d peers ready after %.0f s: starting anyway",
                    len(node.peers.pushable()),
                    cfg.wait_for_peers,
                    cfg.wait_timeout_s,
                )
        start = time.monotonic()
        # losses stay on the device until a report: .item() every step would sync the GPU
        loss_sum = torch.zeros((), device=device)
        loss_count = 0

        def record(final: bool) -> dict[str, Any]:
            nonlocal loss_sum, loss_count
            test_loss, test_acc = evaluate(model, test_x, test_y, device)
            stats = node.stats()
            rec = {
                "node_id": node_cfg.node_id,
                "step": node.step_count,
                "time": round(time.monotonic() - start, 3),
                "loss": float(loss_sum) / loss_count if loss_count else None,
                "test_loss": test_loss,
                "test_accuracy": test_acc,
                "weight": node.weight,
                "messages_sent": stats.get("pushes_acked", 0),
                "messages_received": stats.get("pushes_received", 0),
                "messages_returned": stats.get("pushes_returned", 0),
                "bytes_sent": stats.get("bytes_sent", 0),
                "bytes_received": stats.get("bytes_received", 0),
                "live_peers": stats["live_peers"],
                "distance": stats["last_distance"],
                "partners": stats["partners"],
                "final": final,
            }
            loss_sum, loss_count = torch.zeros((), device=device), 0
            if log_file is not None:
                log_file.write(json.dumps(rec) + "\n")
            if metrics is not None:
                metrics.loss, metrics.accuracy = rec["loss"], test_acc
            progress.clear()
            log.info(
                "step %d  loss %s  test acc %.4f  weight %.4g  sent %d  recv %d  returned %d",
                rec["step"],
                "-" if rec["loss"] is None else f"{rec['loss']:.4f}",
                test_acc,
                node.weight,
                rec["messages_sent"],
                rec["messages_received"],
                rec["messages_returned"],
            )
            progress.last_accuracy = test_acc
            return rec

        if cfg.eval_every:
            record(final=False)  # step 0: the state we start from (a joiner's is its donor's)

        # training loop: local step, then gossip (push when the schedule says, merge the inbox)
        model.train()
        while node.step_count < cfg.steps and not stop.is_set():
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            node.step()
            node.note_loss(loss)  # for gosgd-status: kept on the device until asked
            loss_sum += loss.detach()
            loss_count += 1
            progress.update()
            step = node.step_count
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                record(final=False)
            if cfg.checkpoint_dir and step % cfg.checkpoint_every == 0:
                save_checkpoint()

        # finish: settle every message (or hand everything over), then report
        progress.clear()
        if stop.is_set():
            handed = node.leave()
            log.info("stop requested at step %d: handed over weight %.6g", node.step_count, handed)
        else:
            node.finish()
        final = record(final=True)
        if cfg.checkpoint_dir:
            save_checkpoint()
        if cfg.save_final:
            torch.save(
                {
                    "node_id": node_cfg.node_id,
                    "weight": node.weight,
                    "state": [t.detach().cpu() for t in node.state],
                    "model": cfg.model,
                    "dataset": cfg.dataset,
                },
                cfg.save_final,
            )
        if cfg.linger_s and not stop.is_set():
            # finished, still answering Status (gosgd-status reads the final weights)
            log.info("finished: lingering up to %g s (SIGTERM ends it)", cfg.linger_s)
            stop.wait(cfg.linger_s)
        return final


class Progress:
    """A live one-line status on stderr when it is a terminal (or `enabled`), refreshed at most
    every 0.5 s; nothing otherwise (logs carry the same facts then)."""

    def __init__(self, node: GossipNode, steps: int, enabled: bool | None = None) -> None:
        self._node = node
        self._steps = steps
        self._on = sys.stderr.isatty() if enabled is None else enabled
        self._last = 0.0
        self._shown = False
        self.last_accuracy: float | None = None

    def update(self) -> None:
        now = time.monotonic()
        if not self._on or now - self._last < 0.5:
            return
        self._last = now
        node, counts = self._node, self._node.counters.snapshot()
        acc = "-" if self.last_accuracy is None else f"{self.last_accuracy:.3f}"
        line = (
            f"{node.config.node_id}  step {node.step_count}/{self._steps}  acc {acc}  "
            f"weight {node.weight:.4g}  peers {len(node.peers.pushable())}  "
            f"sent {counts.get('pushes_acked', 0)}  recv {counts.get('pushes_received', 0)}"
        )
        sys.stderr.write("\r\x1b[2K" + line)
        sys.stderr.flush()
        self._shown = True

    def clear(self) -> None:
        """Erase the status line (before a log line is printed)."""
        if self._shown:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()
            self._shown = False
