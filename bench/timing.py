"""Timing repeated calls, the way the benchmarks do."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def _no_sync() -> None:
    pass


def times_s(
    fn: Callable[[], Any],
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], Any] = _no_sync,
) -> list[float]:
    """Wall seconds of `repeats` calls of fn(), after `warmup` calls. `sync` runs before the
    clock starts and before it stops (torch.cuda.synchronize: the device idle before and done
    after each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return times
