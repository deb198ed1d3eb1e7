"""A model's gossiped state as one flat float32 buffer: which tensors, in which order, where.

The state is every floating-point tensor of the model: parameters and float buffers such as
BatchNorm statistics (integer buffers like `num_batches_tracked` stay local). It travels as one
contiguous buffer, never one message per tensor: a single copy out of the device and a single
stream on the wire.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["BufferPool", "StateLayout", "TensorSpec", "all_finite", "byte_view", "module_state"]

#: Dtype of the flat buffer and of ENCODING_FP32 on the wire.
WIRE_DTYPE = torch.float32
WIRE_ITEMSIZE = 4


def module_state(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The float parameters and buffers of `module`, as (name, tensor) in a fixed order.

    Tensors shared under two names (tied weights) appear once, so a merge applies once. The
    tensors are detached aliases of the module's own storage: writing them writes the model.
    """
    named: list[tuple[str, torch.Tensor]] = []
    named += [(n, p.detach()) for n, p in module.named_parameters()]
    named += [(n, b.detach()) for n, b in module.named_buffers()]
    return [(n, t) for n, t in named if t.is_floating_point()]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor's place in the flat buffer (offset and numel in elements)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    numel: int


class StateLayout:
    """The names, shapes and dtypes of a state, and their offsets in its flat buffer.

    Two nodes may exchange states only when their fingerprints match.
    """

    def __init__(self, named: Sequence[tuple[str, torch.Tensor]]) -> None:
        if not named:
            raise ValueError("the model has no floating-point parameters or buffers to gossip")
        specs = []
        offset = 0
        for name, t in named:
            specs.append(TensorSpec(name, tuple(t.shape), t.dtype, offset, t.numel()))
            offset += t.numel()
        self.specs: tuple[TensorSpec, ...] = tuple(specs)
        self.numel: int = offset
        self.nbytes: int = offset * WIRE_ITEMSIZE
        digest = hashlib.sha256()
        for s in self.specs:
            digest.update(f"{s.name}|{list(s.shape)}|{s.dtype}\n".encode())
        #: 16 bytes: SHA-256 of names, shapes and dtypes in payload order.
        self.fingerprint: bytes = digest.digest()[:16]

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Tensors shaped like the state that alias `flat` (numel elements, any device)."""
        if flat.numel() != self.numel or flat.dim() != 1:
            raise ValueError(f"flat buffer has {flat.numel()} elements, layout needs {self.numel}")
        return [flat[s.offset : s.offset + s.numel].view(s.shape) for s in self.specs]

    @torch.no_grad()
    def flatten_into(self, tensors: Sequence[torch.Tensor], out: torch.Tensor) -> None:
        """Copy `tensors` (this layout's, on one device) into the 1-D float32 tensor `out`."""
        parts = [t.reshape(-1) for t in tensors]
        if all(p.dtype == out.dtype for p in parts) and out.device == parts[0].device:
            torch.cat(parts, out=out)  # one kernel for the whole state
        else:
            for view, t in zip(self.views(out), tensors, strict=True):
                view.copy_(t)


def all_finite(flat: torch.Tensor) -> bool:
    """True when no element of `flat` is NaN or infinite.

    One min/max pass: NaN propagates into both and an infinity becomes an extreme. It is much
    faster than torch.isfinite(flat).all(), which materialises a bool tensor (docs/benchmarks.md).
    """
    if flat.numel() == 0:
        return True
    lo, hi = torch.aminmax(flat)
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


class BufferPool:
    """At most `capacity` flat float32 buffers of `numel` elements, allocated on first use.

    Bounds the memory a node spends on messages: a caller that finds the pool empty drops or
    refuses the work instead of allocating. Buffers are pinned when `pin` (for fast copies to
    and from a CUDA device). Thread-safe.
    """

    def __init__(
        self,
        numel: int,
        capacity: int,
        *,
        pin: bool = False,
        buffers: list[torch.Tensor] | None = None,
        lent: int = 0,
    ) -> None:
        if capacity < 1:
            raise ValueError("a buffer pool needs a capacity of at least 1")
        self.numel = numel
        self.capacity = capacity
        self._pin = pin
        # `buffers`: the pool's memory, allocated by the caller (shared memory, see sendproc);
        # `lent` more of it is in use already, and will be released into the pool
        self._free: list[torch.Tensor] = list(buffers or [])
        if any(b.numel() != numel for b in self._free) or len(self._free) + lent > capacity:
            raise ValueError(f"give at most {capacity} buffers of {numel} elements")
        self._allocated = len(self._free) + lent
        self._lock = threading.Lock()
        self._released = threading.Condition(self._lock)

    def acquire(self, wait_s: float = 0.0) -> torch.Tensor | None:
        """A free buffer (contents undefined), or None when all `capacity` are in use (after
        waiting up to `wait_s` seconds for one to be released)."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            while not self._free and self._allocated >= self.capacity:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._released.wait(left)
            if self._free:
                return self._free.pop()
            self._allocated += 1
        return torch.empty(self.numel, dtype=WIRE_DTYPE, pin_memory=self._pin)

    def release(self, buf: torch.Tensor) -> None:
        """Give back a buffer obtained from acquire()."""
        with self._lock:
            self._free.append(buf)
            self._released.notify()

    @property
    def in_use(self) -> int:
        """Buffers handed out and not yet released."""
        with self._lock:
            return self._allocated - len(self._free)


def byte_view(buf: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (no copy), e.g. a pool's buffer."""
    array: Any = buf.numpy()
    return memoryview(array).cast("B")
