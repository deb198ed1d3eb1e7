"""Moving the flat state between the model's device and host buffers without stalling training.

On CUDA a snapshot is one gather of the state into a flat device buffer on the training stream
(a device-to-device copy, small beside the copy to the host), then one copy of that buffer into
a pinned host buffer on a side stream: the training thread only enqueues work and returns, and the
sender thread waits for the copy's event before it streams the buffer. An incoming message is
copied from its pinned host buffer into a second flat device buffer on another side stream (so
the copy engine works while the step's kernels run) and merged on the training stream once the
copy's event fires; the host buffer goes back to its pool when an event after the merge has
fired, found by polling at the next step, never by waiting. On the CPU everything is a plain
copy.

A snapshot leaves in the node's push encoding (gosgd_p2p.codec): the host buffer then holds
the encoded bytes at its start. On CUDA the encoding runs on the device before the copy to
the host, so that copy moves the smaller payload.

Only the training thread calls Staging's methods; the `wait` a snapshot returns may be called
from any thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import torch

from gosgd_p2p.codec import encode
from gosgd_p2p.state import WIRE_DTYPE, StateLayout
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import payload_bytes

__all__ = ["Staging", "no_wait"]


def no_wait() -> None:
    """The wait of a snapshot that is complete when taken (CPU)."""


class Staging:
    """The device side of snapshots and merges for one model's state (training thread only)."""

    def __init__(
        self,
        layout: StateLayout,
        tensors: Sequence[torch.Tensor],
        encoding: int = pb.ENCODING_FP32,
    ) -> None:
        self.layout = layout
        #: The encoding of snapshots (a proto Encoding value), and its payload's size in bytes.
        self.encoding = encoding
        self.nbytes = payload_bytes(encoding, layout.numel)
        self._tensors = list(tensors)
        self.device = self._tensors[0].device
        self.cuda = self.device.type == "cuda"
        self._out: torch.Tensor | None = None  # snapshots leave through this device buffer
        self._out_wire: torch.Tensor | None = None  # ... encoded into this one (not fp32)
        self._in: torch.Tensor | None = None  # messages arrive through this one
        self._out_free: torch.cuda.Event | None = None  # the last snapshot's copy-out is done
        self._in_free: torch.cuda.Event | None = None  # the last merge has read `_in`
        self._streams: dict[str, torch.cuda.Stream] = {}  # "out" and "in" copies, one each
        self._pending: deque[tuple[torch.cuda.Event, Callable[[torch.Tensor], None], torch.Tensor]]
        self._pending = deque()

    @torch.no_grad()
    def snapshot(self, host: torch.Tensor) -> Callable[[], None]:
        """Start copying the state into the host buffer `host` (float32, at least
        codec.buffer_numel elements) in the snapshot encoding; returns a wait for the copy.

        The state is captured as it is now: later steps do not change what arrives in `host`.
        Read `host` only after calling the returned wait (from any thread). In fp32 `host`'s
        first layout.numel elements are the state; otherwise its first `nbytes` bytes are the
        encoded payload.
        """
        fp32 = self.encoding == pb.ENCODING_FP32
        wire = host.view(torch.uint8)[: self.nbytes]
        if not self.cuda:
            if fp32:
                self.layout.flatten_into(self._tensors, host[: self.layout.numel])
            else:
                flat = self._device_buffer("_out")
                self.layout.flatten_into(self._tensors, flat)
                encode(self.encoding, flat, wire)
            return no_wait
        out = self._device_buffer("_out")
        training = torch.cuda.current_stream(self.device)
        if self._out_free is not None:
            training.wait_event(self._out_free)  # the previous copy-out has read `out`
        self.layout.flatten_into(self._tensors, out)
        if not fp32:  # encoded on the device: the copy to the host moves the smaller payload
            if self._out_wire is None:
                self._out_wire = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
            encode(self.encoding, out, self._out_wire)
            out = self._out_wire
        else:
            wire = host[: self.layout.numel]
        side = self._side_stream("out")
        side.wait_stream(training)
        with torch.cuda.stream(side):
            wire.copy_(out, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        self._out_free = done
        return done.synchronize

    def load(self, host: torch.Tensor) -> torch.Tensor:
        """The flat state in the host buffer `host`, on the model's device, for one merge.

        Work queued on the training stream after this sees the copy complete. Queue the merge,
        then call release_after(release, host) before the next load.
        """
        if not self.cuda:
            return host
        device_in = self._device_buffer("_in")
        side = self._side_stream("in")
        if self._in_free is not None:
            side.wait_event(self._in_free)  # the previous merge has read `_in`
        with torch.cuda.stream(side):
            device_in.copy_(host, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(side)
        torch.cuda.current_stream(self.device).wait_event(copied)
        return device_in

    def release_after(self, release: Callable[[torch.Tensor], None], host: torch.Tensor) -> None:
        """The merge of the loaded buffer is queued: call release(host) once it has run."""
        if not self.cuda:
            release(host)
            return
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        self._in_free = done
        self._pending.append((done, release, host))
        self.poll()

    def poll(self) -> None:
        """Release the host buffers whose copies have completed (never waits)."""
        while self._pending and self._pending[0][0].query():
            _, release, host = self._pending.popleft()
            release(host)

    def flush(self) -> None:
        """Wait for every queued copy and release every host buffer."""
        if self._out_free is not None:
            self._out_free.synchronize()  # the last snapshot's copy-out
        while self._pending:
            done, release, host = self._pending.popleft()
            done.synchronize()
            release(host)

    def _device_buffer(self, name: str) -> torch.Tensor:
        buf: torch.Tensor | None = getattr(self, name)
        if buf is None:
            buf = torch.empty(self.layout.numel, dtype=WIRE_DTYPE, device=self.device)
            setattr(self, name, buf)
        return buf

    def _side_stream(self, name: str) -> torch.cuda.Stream:
        if name not in self._streams:
            self._streams[name] = torch.cuda.Stream(self.device)
        return self._streams[name]
