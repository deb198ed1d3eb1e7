"""Keep glibc malloc from handing every large gRPC message back to the kernel.

gRPC's Python layer turns each received 1 MiB chunk into a fresh bytes object and frees it a
moment later. glibc serves such blocks with mmap (or trims the heap top after they are freed),
so every chunk costs a page fault and a zeroed page for each of its pages on the way in and a
munmap on the way out. With the two settings below the chunks reuse the heap: plain gRPC
receives faster and for less CPU (docs/benchmarks.md, "Transport"; bench.transport measures
the project's own path).

The settings are process-wide, so they are applied once, only on glibc, and never over a
choice the user made with the MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ environment
variables. The cost is that up to TRIM_THRESHOLD of freed heap stays mapped to the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import threading

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_malloc"]

log = logging.getLogger(__name__)

#: Blocks below this come from the heap (reused), not from a fresh mmap per chunk.
MMAP_THRESHOLD = 32 << 20
#: Free heap top kept rather than returned to the kernel after each message.
TRIM_THRESHOLD = 128 << 20

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3

_lock = threading.Lock()
_applied: bool | None = None


def tune_malloc() -> bool:
    """Apply the thresholds once per process; True when they are in effect (glibc only)."""
    global _applied
    with _lock:
        if _applied is None:
            _applied = _apply()
        return _applied


def _apply() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        log.debug("malloc thresholds set by the environment; leaving them")
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    except (OSError, AttributeError):
        return False
    log.debug("malloc thresholds: mmap %d B, trim %d B (%s)", MMAP_THRESHOLD, TRIM_THRESHOLD, ok)
    return ok
