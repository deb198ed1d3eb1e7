"""A node's own state x and weight a: what the training thread alone reads and writes.

Every change of a goes through gosgd_p2p.algorithm: split for a push or a donation (halve,
when can_split allows it), merge of an incoming or returned message (merge_), and the join.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from gosgd_p2p import algorithm
from gosgd_p2p.codec import decode
from gosgd_p2p.inbox import Message
from gosgd_p2p.metrics import Count, Counters
from gosgd_p2p.staging import Staging
from gosgd_p2p.state import StateLayout
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import payload_bytes

__all__ = ["LocalState"]


def _keep(buf: torch.Tensor) -> None:
    """The release of a buffer no pool owns: nothing to give back."""


class LocalState:
    """x (the model's float tensors, aliased) and a (float64) of one node; training thread only.

    Snapshots are copied out through `staging` (asynchronously on CUDA), merges run on the
    model's device with fused ops.
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        layout: StateLayout,
        counters: Counters,
        encoding: int = pb.ENCODING_FP32,
    ) -> None:
        self.tensors = list(tensors)
        self.layout = layout
        self.device = self.tensors[0].device
        if any(t.device != self.device for t in self.tensors):
            raise ValueError("all of the model's float tensors must be on one device")
        #: The GoSGD weight a.
        self.weight = 0.0
        self.staging = Staging(layout, self.tensors, encoding)  # snapshots in `encoding`
        self._counters = counters
        self._last_distance: torch.Tensor | None = None

    @property
    def last_distance(self) -> float | None:
        """||x_s - x|| of the most recent received message, before it was merged."""
        distance = self._last_distance
        return None if distance is None else float(distance)

    def snapshot(self, buf: torch.Tensor) -> Callable[[], None]:
        """Start copying x into the host buffer `buf`; returns the wait for that copy.

        On the CPU the copy is done on return; on CUDA it runs on a side stream (the training
        thread's time here, the "snapshot" timer, is only the enqueueing).
        """
        started = time.perf_counter()
        wait = self.staging.snapshot(buf)
        self._counters.observe(Count.SNAPSHOT, time.perf_counter() - started)
        return wait

    def split_into(
        self, buf: torch.Tensor, fraction: float = 0.5
    ) -> tuple[float, Callable[[], None]] | None:
        """A push's or a donation's share: snapshot x into `buf` and split off `fraction` of a
        (half for a donation). Returns (weight sent, wait for the snapshot), or None,
        untouched, when a may not be split."""
        if not algorithm.can_split(self.weight):
            return None
        ready = self.snapshot(buf)
        self.weight, sent = algorithm.split(self.weight, fraction)
        return sent, ready

    def merge(self, messages: list[Message]) -> None:
        """Merge messages (received or our own returned) into (x, a), oldest first."""
        if not messages:
            return
        started = time.perf_counter()
        for msg in messages:
            msg.ready()  # returned snapshots were awaited by their sender; this makes it local
            host, release = self._decoded(msg)
            incoming = self.layout.views(self.staging.load(host))
            if msg.returned:
                self._counters.add(Count.MERGED_RETURNED)
            else:
                diffs = torch._foreach_sub(incoming, self.tensors)
                # kept as a tensor: a float() here would wait for the GPU at every merge
                self._last_distance = torch.linalg.vector_norm(
                    torch.stack(torch._foreach_norm(diffs))
                )
                self._counters.add(Count.MERGED_RECEIVED)
            self.weight = algorithm.merge_(self.tensors, self.weight, incoming, msg.weight)
            self.staging.release_after(release, host)
        self._counters.observe(Count.MERGE, time.perf_counter() - started)

    def _decoded(self, msg: Message) -> tuple[torch.Tensor, Callable[[torch.Tensor], None]]:
        """The float32 state of `msg` on the host, and what releases it once merged.

        Received messages were decoded by the receiver; our own returned push still holds its
        encoded payload, decoded here into a buffer of its own (rare: a push that failed).
        """
        if msg.encoding == pb.ENCODING_FP32:
            return msg.payload, msg.release
        wire = msg.payload.view(torch.uint8)[: payload_bytes(msg.encoding, self.layout.numel)]
        host = torch.empty(self.layout.numel, dtype=torch.float32)
        decode(msg.encoding, wire, host)
        msg.release(msg.payload)
        return host, _keep

    def take(self, buf: torch.Tensor, weight: float) -> None:
        """Join: take the state in the host buffer `buf` and its `weight` (a was 0)."""
        incoming = self.layout.views(buf.to(self.device))
        self.weight = algorithm.merge_(self.tensors, 0.0, incoming, weight)
