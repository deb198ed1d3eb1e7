"""Shared test helpers: waiting on conditions with deadlines, and gosgd-node processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from gosgd_p2p import NodeConfig
from gosgd_p2p.node import GossipNode

# Several nodes share two cores in these tests: one torch thread each avoids oversubscription.
torch.set_num_threads(1)

#: How test nodes serve and push, --push-mode: "default" (as NodeConfig decides: a network
#: process on Linux for a CPU model without an injected client), "threads" (all in the node's
#: process), "process" (network_process: gRPC served, calls made and mDNS run by a child
#: process without torch) or "sendproc" (send_process: only the pushes made by a child).
PUSH_MODES = ("default", "threads", "process", "sendproc")
#: The NodeConfig fields and the gosgd-node flag of each mode but the default.
MODE_SETS = {
    "threads": ({"network_process": False}, "--no-network-process"),
    "process": ({"network_process": True}, "--network-process"),
    "sendproc": ({"network_process": False, "send_process": True}, "--send-process"),
}
#: The flags that choose a mode on a gosgd-node command line.
MODE_FLAGS = ("--network-process", "--no-network-process", "--send-process")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--push-mode",
        choices=PUSH_MODES,
        default="default",
        help="threads, process or sendproc: every test node and daemon that does not choose "
        "its mode itself serves and pushes that way",
    )


@pytest.fixture(autouse=True)
def push_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The push mode of this run. In "threads", "process" and "sendproc" mode every
    GossipNode made without an injected client (which needs the node's own threads), and
    that chooses neither network_process nor send_process, takes that mode's fields. A test
    that reaches into a node's receiver in this process opts that node out with
    network_process=False. A test marked default_mode tests the default itself."""
    mode: str = request.config.getoption("--push-mode")
    if request.node.get_closest_marker("default_mode") is not None:
        return "default"
    if mode in MODE_SETS:
        real_init = GossipNode.__init__
        fields, _ = MODE_SETS[mode]

        def init(self: GossipNode, model: Any, config: Any = None, **kw: Any) -> None:
            def chosen(field: str) -> Any:
                return kw[field] if field in kw else getattr(config, field, None)

            # a node with a client of its own, or a mode of its own, keeps it
            free = chosen("network_process") is None and not chosen("send_process")
            if kw.get("client") is None and free:
                kw.update(fields)
            real_init(self, model, config, **kw)

        monkeypatch.setattr(GossipNode, "__init__", init)
    return mode


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `predicate` until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(delay)  # back-off between polls of a condition, not a synchronisation sleep
        delay = min(delay * 2, 0.1)


def node_config(node_id: str, cluster: str, **kw: Any) -> NodeConfig:
    """A NodeConfig for in-process test nodes: quick membership rounds, a bounded drain, and no
    mDNS (mDNS only inside network namespaces: test_discovery.py)."""
    kw.setdefault("hello_interval_s", 0.2)
    kw.setdefault("drain_timeout_s", 30.0)
    kw.setdefault("mdns", False)
    return NodeConfig(node_id=node_id, cluster=cluster, **kw)


class NodeProcess:
    """A `gosgd-node` daemon in a subprocess; its address is read from its first stdout line."""

    def __init__(
        self,
        tmp: Path,
        node_id: str,
        *args: str,
        prefix: tuple[str, ...] = (),
        listen: str = "127.0.0.1:0",
    ) -> None:
        self.node_id = node_id
        self.log_json = tmp / f"{node_id}.jsonl"
        self.stderr_path = tmp / f"{node_id}.err"
        self._stderr = open(self.stderr_path, "w")  # noqa: SIM115 - closed in wait()
        cmd = [
            *prefix,  # e.g. `ip netns exec NS`, which execs: the pid stays the node's
            sys.executable, "-m", "gosgd_p2p.cli",
            "--node-id", node_id,
            "--listen", listen,
            "--threads", "1",
            "--log-json", str(self.log_json),
            *args,
        ]  # fmt: skip
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env
        )
        self.stdout: list[str] = []
        self._address = threading.Event()
        self._reader = threading.Thread(target=self._read, name=f"read-{node_id}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout.append(line)
            if " listening on " in line:
                self._address.set()

    @property
    def address(self) -> str:
        if not self._address.wait(60):
            raise AssertionError(f"{self.node_id} did not start:\n{self.stderr()}")
        line = next(s for s in self.stdout if " listening on " in s)
        return line.rsplit(" ", 1)[1].strip()

    def records(self) -> list[dict[str, Any]]:
        if not self.log_json.exists():
            return []
        return [json.loads(s) for s in self.log_json.read_text().splitlines() if s.strip()]

    def final(self) -> dict[str, Any]:
        recs = [r for r in self.records() if r["final"]]
        assert len(recs) == 1, f"{self.node_id}: expected one final record\n{self.stderr()}"
        return recs[0]

    def stderr(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(5)
            self._stderr.close()
        return rc


@pytest.fixture
def node_processes(tmp_path: Path, push_mode: str):
    """Factory of NodeProcess; every process still running at teardown is killed."""
    started: list[NodeProcess] = []

    def start(node_id: str, *args: str, **kw: Any) -> NodeProcess:
        if push_mode in MODE_SETS and not any(flag in args for flag in MODE_FLAGS):
            args = (*args, MODE_SETS[push_mode][1])
        node = NodeProcess(tmp_path, node_id, *args, **kw)
        started.append(node)
        return node

    yield start
    for node in started:
        if node.proc.poll() is None:
            node.proc.kill()
            node.wait(10)


@pytest.fixture
def lab():
    """A private network lab (namespaces, a bridge); torn down after the test."""
    from netns import Lab

    lab = Lab()
    yield lab
    lab.close()
