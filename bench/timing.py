"""Timing one call, the way the CPU benchmarks do."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def times_s(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of fn(), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times
