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

#: Buffers whose views LocalState keeps: an inbox's, a send pool's and the device's copy by default.
VIEW_CACHE = 8


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
        self._view_cache: dict[tuple[int, bool], list[torch.Tensor]] = {}

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
            loaded = self.staging.load(host)
            had_weight = self.weight > 0.0
            # the loaded buffer is ours until released: the merge leaves x_s - x in it
            views = self._views(loaded, keep=loaded is not host or release is not _keep)
            self.weight = algorithm.merge_(
                self.tensors, self.weight, views, msg.weight, scratch=True
            )
            if msg.returned:
                self._counters.add(Count.MERGED_RETURNED)
            else:
                if had_weight:
                    # kept as a tensor: a float() here would wait for the GPU at every merge
                    self._last_distance = torch.linalg.vector_norm(loaded)
                self._counters.add(Count.MERGED_RECEIVED)
            self.staging.release_after(release, host)
        self._counters.observe(Count.MERGE, time.perf_counter() - started)

    def _views(self, flat: torch.Tensor, keep: bool) -> list[torch.Tensor]:
        """layout.views(flat); with `keep`, kept for the next merge from the same buffer (a
        receive slot, a send buffer, the device's copy): making the views costs about as much
        as the merge of a small model. A kept entry holds its buffer's memory, so no other
        buffer can take that address while it is kept."""
        if not keep:
            return self.layout.views(flat)
        key = (flat.data_ptr(), flat.is_cuda)
        views = self._view_cache.pop(key, None)
        if views is None:
            views = self.layout.views(flat)
        self._view_cache[key] = views  # the most recently used last
        while len(self._view_cache) > VIEW_CACHE:
            del self._view_cache[next(iter(self._view_cache))]
        return views

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
