"""Child processes of a benchmark: one job's result, reaping, dying with the parent, RSS, the
CPU time of a process's threads."""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import queue
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

JOIN_S = 60.0  # after a job put its result: how long its process gets to exit


def result(proc: Any, out: Any, limit_s: float) -> Any:
    """What `proc` put on `out`; fails at once if it died instead of waiting out the limit, and
    kills it when it gave nothing in `limit_s` seconds."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            return out.get(timeout=1.0)
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"{proc.name} exited with code {proc.exitcode}") from None
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"{proc.name} gave no result in {limit_s} s") from None


def run_job(target: Callable[[Any, Any], None], job: Any, limit_s: float, name: str) -> Any:
    """Run target(job, out) in a fresh (spawned) process and return what it put on `out`."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=target, args=(job, out), name=name)
    proc.start()
    got = result(proc, out, limit_s)
    proc.join(JOIN_S)
    return got


def reap(procs: list[Any], grace_s: float) -> list[str]:
    """Join every process within `grace_s` in all; kill the ones still running. Returns their
    names."""
    deadline = time.monotonic() + grace_s
    killed = []
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(10)
            killed.append(proc.name)
    return killed


try:  # loaded here, not in the forked child, where only async-signal-safe work is wise
    _PRCTL: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _PRCTL = None


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when this process dies, even by kill -9 (Linux)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def rss_mb(pid: int, field: str = "VmRSS") -> float | None:
    """VmRSS (or `field`, e.g. VmHWM: the peak) of process `pid` in MB (2**20 bytes); None when
    it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) this process's threads have used so far, summed by what they
    are: "main" (the training thread), the name of each other Python thread with its trailing
    number dropped ("gosgd-net-answer"), and "native" for threads Python did not start
    (gRPC's C core, torch's pools), including those that have ended."""
    tick = os.sysconf("SC_CLK_TCK")
    named = {t.native_id: t.name for t in threading.enumerate()}
    main = threading.main_thread().native_id
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # a thread that just ended
            continue
        name = named.get(int(tid))
        group = "main" if int(tid) == main else re.sub(r"[-_]?\d+$", "", name) if name else ""
        if group:
            out[group] = out.get(group, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    out["native"] = max(0.0, time.process_time() - sum(out.values()))
    return out
