"""The node processes of a soak run: one gosgd-node per slot, restarted as new incarnations."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bench.procs import die_with_parent

STARTUP_TIMEOUT_S = 180.0  # longest wait for a node to print its address
EXIT_TIMEOUT_S = 300.0  # longest wait for a node to exit after a signal (drain is 120 s)
HUGE_STEPS = 10**9  # a step budget that outlasts any run: nodes never finish by themselves

NODE_FLAGS = [
    "--no-mdns",
    "--model", "cnn",
    "--dataset", "digits",
    "--p", "0.1",
    "--threads", "1",
    "--eval-every", "50",
    "--checkpoint-every", "100",
    "--steps", str(HUGE_STEPS),
    "--listen", "127.0.0.1:0",
]  # fmt: skip


@dataclass
class Incarnation:
    """One gosgd-node process of a slot; its stdout is pumped to a file by a reader thread."""

    slot: int
    number: int
    proc: subprocess.Popen[str]
    started_s: float  # run-relative start time
    log_json: Path
    stderr_path: Path
    stdout_path: Path
    _stderr: IO[str]
    address: str | None = None
    ended_s: float | None = None
    how: str = ""  # killed | left | stopped-at-end | exited-unexpectedly | startup-failed
    rc: int | None = None
    exit_wait_s: float | None = None  # from the signal to the exit
    records: list[dict[str, Any]] = field(default_factory=list)
    seen_s: list[float] = field(default_factory=list)  # run time each record was first read
    rss: list[tuple[float, float]] = field(default_factory=list)  # (run time s, MB)
    _addresses: queue.Queue[str | None] = field(default_factory=queue.Queue)
    _offset: int = 0  # bytes of log_json already parsed
    _reader: threading.Thread | None = None

    @property
    def name(self) -> str:
        return f"node-{self.slot}"

    @property
    def tag(self) -> str:
        return f"{self.name}-{self.number}"

    def pump_stdout(self) -> None:
        """Reader thread: copy stdout to a file; hand the announced address to the queue."""
        assert self.proc.stdout is not None
        with open(self.stdout_path, "w") as out:
            for line in self.proc.stdout:
                out.write(line)
                out.flush()
                if " listening on " in line:
                    self._addresses.put(line.rsplit(" ", 1)[1].strip())
        self._addresses.put(None)  # EOF: the process has exited

    def poll_address(self, timeout: float | None = None) -> str | None:
        """The address once announced; waits up to `timeout` s (None: does not wait)."""
        if self.address is None:
            try:
                got = (
                    self._addresses.get(timeout=timeout)
                    if timeout
                    else self._addresses.get_nowait()
                )
            except queue.Empty:
                return None
            if got is None:
                self._addresses.put(None)  # keep the EOF mark for later polls
            self.address = got
        return self.address

    def alive(self) -> bool:
        return self.proc.poll() is None

    def read_records(self, now_s: float) -> list[dict[str, Any]]:
        """Parse the JSON lines appended since the last call (complete lines only)."""
        if not self.log_json.exists():
            return self.records
        with open(self.log_json, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            if line.strip():
                self.records.append(json.loads(line))
                self.seen_s.append(round(now_s, 3))
        self._offset += end
        return self.records

    def wait_exit(self, timeout: float, now: Callable[[], float]) -> int | None:
        """Wait for the exit; None (after a SIGKILL) when it took longer than `timeout` s."""
        try:
            self.rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.rc = None
        self.close(now())
        return self.rc

    def close(self, now_s: float) -> None:
        if self._reader is not None:
            self._reader.join(10)
        self._stderr.close()
        self.read_records(now_s)


class Cluster:
    """The node processes of a soak run, started and stopped from the main thread only."""

    def __init__(self, out: Path, nodes: int, cluster: str, new_ids: bool) -> None:
        self.out = out
        self.new_ids = new_ids  # a restart gets node id node-<slot>.<incarnation>
        self.nodes = nodes
        self.cluster = cluster
        self.t0 = time.monotonic()
        self.current: list[Incarnation | None] = [None] * nodes
        self.history: list[Incarnation] = []

    def now(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.t0

    def start(self, slot: int, peers: list[str], extra: list[str]) -> Incarnation:
        number = sum(1 for inc in self.history if inc.slot == slot)
        tag = f"node-{slot}-{number}"
        node_id = f"node-{slot}.{number}" if self.new_ids and number else f"node-{slot}"
        cmd = [
            sys.executable, "-m", "gosgd_p2p.cli",
            "--node-id", node_id,
            "--cluster", self.cluster,
            "--checkpoint-dir", str(self.out / f"ckpt-node-{slot}"),
            "--log-json", str(self.out / f"{tag}.jsonl"),
            *NODE_FLAGS,
            *extra,
        ]  # fmt: skip
        if peers:
            cmd += ["--peers", ",".join(peers)]
        stderr_path = self.out / f"{tag}.err"
        stderr = open(stderr_path, "w")  # noqa: SIM115 - closed by Incarnation.close
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            preexec_fn=die_with_parent,
        )
        inc = Incarnation(
            slot=slot,
            number=number,
            proc=proc,
            started_s=self.now(),
            log_json=self.out / f"{tag}.jsonl",
            stderr_path=stderr_path,
            stdout_path=self.out / f"{tag}.out",
            _stderr=stderr,
        )
        inc._reader = threading.Thread(target=inc.pump_stdout, name=f"soak-{tag}", daemon=True)
        inc._reader.start()
        self.history.append(inc)
        self.current[slot] = inc
        return inc

    def live(self) -> list[Incarnation]:
        """Running incarnations that have announced their address."""
        return [
            inc for inc in self.current if inc and inc.alive() and inc.poll_address() is not None
        ]

    def stop(self, inc: Incarnation, sig: int, how: str) -> int | None:
        """Send `sig` and wait for the exit; the slot is then empty."""
        sent = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            inc.proc.send_signal(sig)
        inc.wait_exit(EXIT_TIMEOUT_S, self.now)
        inc.exit_wait_s = round(time.monotonic() - sent, 3)
        inc.ended_s = round(self.now(), 3)
        inc.how = how if inc.rc is not None else f"{how} (hung: SIGKILLed)"
        self.current[inc.slot] = None
        return inc.rc

    def kill_all(self) -> None:
        """Last resort (finally/atexit): SIGKILL every process still running."""
        for inc in self.history:
            if inc.proc.poll() is None:
                inc.proc.kill()
                inc.proc.wait()
                inc.how = inc.how or "killed-at-cleanup"
            with contextlib.suppress(Exception):
                inc.close(self.now())
