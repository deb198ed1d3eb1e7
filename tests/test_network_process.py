"""network_process: gRPC served and pushes made by a child process without torch, and what
happens to the weight when that process is killed during a push, a receive or a donation."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from children import HeldReceive, gone, train, train_both
from conftest import node_config, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from netns import needs_netns

from gosgd_p2p import GossipNode, JoinError, cluster_seed, pushclient
from gosgd_p2p.client import PeerClient
from gosgd_p2p.models import build_model
from gosgd_p2p.netproc import NetworkProcess
from gosgd_p2p.pushclient import network_process_wanted
from gosgd_p2p.v1 import gossip_pb2 as pb

pytestmark = [pytest.mark.nodes, pytest.mark.timeout(180)]

CLUSTER = "netproc"


def model() -> torch.nn.Module:
    torch.manual_seed(cluster_seed(CLUSTER))
    return build_model("mlp", (1, 8, 8), 10)


def maps_torch(pid: int) -> bool:
    """Whether the process has torch's libraries mapped (it imported torch)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def exact(weights: list[float], total: float) -> bool:
    return math.isclose(math.fsum(weights), total, rel_tol=0, abs_tol=1e-12)


def tcp_sockets_on(pid: int, ports: set[int]) -> list[str]:
    """The TCP sockets of process `pid` with a local or remote port in `ports` (a connection
    to one of those servers, or the server itself), from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode in inodes and {int(e.rsplit(":", 1)[1], 16) for e in (local, remote)} & ports:
                found.append(f"{local} -> {remote}")
    return found


@pytest.mark.parametrize("encoding", ["fp32", "int8"])
def test_the_network_process_serves_and_pushes_without_torch(encoding: str) -> None:
    b = GossipNode(model(), node_config("b", CLUSTER, p=0.5, network_process=True))
    a = GossipNode(
        model(),
        node_config(
            "a", CLUSTER, p=0.5, peers=[b.address], network_process=True, encoding=encoding
        ),
    )
    with a, b:
        children = [a.network_process_pid, b.network_process_pid]
        assert all(pid is not None and pid != os.getpid() for pid in children)
        assert maps_torch(os.getpid())
        assert not any(maps_torch(pid) for pid in children if pid is not None)
        wait_until(
            lambda: (
                train_both(a, b),
                a.counters.get("pushes_acked") >= 20 and b.counters.get("pushes_acked") >= 20,
            )[1],
            60,
            "20 pushes each way",
        )
        # the training process itself speaks no gRPC: Hello and pushes went through the child
        assert a.membership.peers.get(b.address) is not None
        ports = {int(n.address.rsplit(":", 1)[1]) for n in (a, b)}
        assert tcp_sockets_on(os.getpid(), ports) == []
        # Status, Hello and health answered by b's network process, from b's training process
        client = PeerClient()
        try:
            reply = client.status(b.address, 10)
            assert reply.node_id == "b" and reply.state == pb.NODE_STATE_TRAINING
            with grpc.insecure_channel(b.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                check = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                assert check.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            client.close()
        assert b.counters.get("pushes_received") >= 20 and a.counters.get("pushes_received") >= 1
        weights = [a.finish(), b.finish()]
        assert exact(weights, 2.0)
        assert a.counters.get("pushes_returned") == 0
    assert all(gone(pid) for pid in children if pid is not None)  # close() stopped them


def test_a_message_merged_before_its_commit_is_answered(caplog) -> None:
    """The training thread may merge a committed message, and release its slot, as soon as it
    is in the inbox: before the commit's answer. The slot goes back once, and is not left
    marked as held (which a later death of the child would take for a slot in use)."""
    b = GossipNode(model(), node_config("b", CLUSTER, p=0.0, network_process=True))
    real_commit = b.receiver.commit_unsettled
    # x and a have one owner: two commits answered at once (a has two send buffers) must not
    # merge at once, or one merge's weight overwrites the other's
    merging = threading.Lock()

    def merge_at_once(*args: Any, **kw: Any) -> Any:
        committed = real_commit(*args, **kw)
        with merging:  # b's test thread never steps: this is its only merge
            b.local.merge(b.inbox.drain())
        return committed

    b.receiver.commit_unsettled = merge_at_once  # type: ignore[method-assign]
    a = GossipNode(model(), node_config("a", CLUSTER, p=1.0, peers=[b.address]))
    with a, b:
        wait_until(lambda: (train(a), b.counters.get("pushes_received") >= 10)[1], 60, "10 pushes")
        weights = [a.finish(), b.finish()]
        assert exact(weights, 2.0)
        assert a.counters.get("pushes_acked") == b.counters.get("pushes_received")
        client = b.sender.client
        assert isinstance(client, NetworkProcess)
        assert not client._held  # every slot went back to the network process
    assert "request failed" not in caplog.text


def test_the_training_thread_takes_the_commits_while_it_steps() -> None:
    """While b steps, the commits its network process asks for are answered by b's training
    thread at its next step (no other thread of b wakes for them); while b does not step, by
    an answer thread. Either way every message counts and the weight stays exact."""
    b = GossipNode(model(), node_config("b", CLUSTER, p=0.0, network_process=True))
    threads: list[str] = []
    real_commit = b.receiver.commit_unsettled

    def recording(*args: Any, **kw: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real_commit(*args, **kw)

    b.receiver.commit_unsettled = recording  # type: ignore[method-assign]
    a = GossipNode(model(), node_config("a", CLUSTER, p=1.0, peers=[b.address]))
    with a, b:
        deadline = time.monotonic() + 60
        while len(threads) < 20 and time.monotonic() < deadline:  # b steps without pause
            train_both(a, b)
        stepping = list(threads)
        threads.clear()
        # as many as its inbox holds (4): b merges none of them yet
        wait_until(lambda: (train(a), len(threads) >= 3)[1], 60, "3 commits while b idles")
        idle = list(threads)
        weights = [a.finish(), b.finish()]
        assert a.counters.get("pushes_acked") == b.counters.get("pushes_received")
    assert exact(weights, 2.0)
    ours = threading.current_thread().name
    assert len(stepping) >= 20 and ours in stepping, stepping
    assert ours not in idle and all(n.startswith("gosgd-net-answer-") for n in idle), idle


def test_kill_9_of_the_network_process_during_a_push(caplog) -> None:
    # b's receiver is held in this process (threads mode, whatever --push-mode says)
    b = GossipNode(model(), node_config("b", CLUSTER, p=0.0), network_process=False)
    hold = HeldReceive(b)
    a = GossipNode(
        model(),
        node_config("a", CLUSTER, p=1.0, peers=[b.address], network_process=True, send_buffers=1),
    )
    with a, b:
        child = a.network_process_pid
        assert child is not None
        received = b.counters.get
        wait_until(lambda: (train_both(a, b), received("pushes_received") >= 3)[1], 60, "3 pushes")
        hold.holding.set()  # the next push reaches b and waits there, its call open
        wait_until(lambda: (train_both(a, b), hold.held.is_set())[1], 60, "a push held at b")
        hold.holding.clear()
        os.kill(child, signal.SIGKILL)  # the call dies with a's network process
        hold.resume.set()
        settled = a.counters.get
        wait_until(
            lambda: (train_both(a, b), settled("pushes_resolved_aborted") == 1)[1],
            60,
            "the held push to settle",
        )
        assert a.network_process_pid is None
        assert settled("pushes_returned") == 1 and settled("pushes_lost_with_peer") == 0
        # training goes on: a pushes from its threads, and serves on the same port
        before = received("pushes_received")
        wait_until(
            lambda: (train_both(a, b), received("pushes_received") >= before + 3)[1],
            60,
            "3 pushes sent without the network process",
        )
        b.step(push_to=a.address)
        wait_until(lambda: (train(a), a.counters.get("pushes_received") >= 1)[1], 60, "a push in")
        weights = [a.finish(), b.finish()]
        assert exact(weights, 2.0)
    assert "network process" in caplog.text and "is gone" in caplog.text
    assert "served from this process" in caplog.text


def test_kill_9_of_the_network_process_during_a_receive() -> None:
    """b's network process has received a message and asked b to commit it; it dies before it
    acks. b commits it anyway (the payload is in shared memory), and a learns so from
    ResolvePush, answered by b's own threads on the same port."""
    b = GossipNode(model(), node_config("b", CLUSTER, p=0.0, network_process=True))
    holding, held, resume = threading.Event(), threading.Event(), threading.Event()
    real_commit = b.receiver.commit_unsettled

    def held_commit(*args: Any, **kw: Any) -> Any:
        committed = real_commit(*args, **kw)
        if holding.is_set() and committed[1] is not None:  # committed, not yet acked
            holding.clear()
            held.set()
            resume.wait(60)
        return committed

    b.receiver.commit_unsettled = held_commit  # type: ignore[method-assign]
    a = GossipNode(model(), node_config("a", CLUSTER, p=1.0, peers=[b.address], send_buffers=1))
    with a, b:
        child = b.network_process_pid
        assert child is not None
        received = b.counters.get
        wait_until(lambda: (train_both(a, b), received("pushes_received") >= 3)[1], 60, "3 pushes")
        holding.set()  # b stops stepping: its commit is held on a thread that is not ours
        wait_until(lambda: (train(a), held.is_set())[1], 60, "a commit held at b")
        os.kill(child, signal.SIGKILL)
        wait_until(lambda: gone(child), 30, "b's network process to die")
        resume.set()  # the ack dies with the child; b merges the message from shared memory
        settled = a.counters.get
        wait_until(
            lambda: (train_both(a, b), settled("pushes_resolved_committed") == 1)[1],
            60,
            "the push to settle as committed",
        )
        assert b.network_process_pid is None
        before = received("pushes_received")
        wait_until(
            lambda: (train_both(a, b), received("pushes_received") >= before + 3)[1],
            60,
            "3 pushes received by b's own threads",
        )
        weights = [a.finish(), b.finish()]
        assert settled("pushes_returned") == 0 and settled("pushes_lost_with_peer") == 0
        assert exact(weights, 2.0)


def keep_looking(client: NetworkProcess) -> threading.Event:
    """Mark the board as b's training thread does at each step, so that b's network process
    posts every commit for it, until the returned event is set."""
    looking = threading.Event()

    def look() -> None:
        while not looking.is_set():
            client._board.polled[0] = time.monotonic()
            looking.wait(0.001)

    threading.Thread(target=look, daemon=True).start()
    return looking


class HeldUntilMissed:
    """The commits lock, where the first holder lets go only once a take has found it held."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.held = threading.Event()
        self.missed = threading.Event()

    def acquire(self, blocking: bool = True) -> bool:
        got = self._lock.acquire(blocking)
        if got:
            self.held.set()
        else:
            self.missed.set()
        return got

    def release(self) -> None:
        self.missed.wait(60)
        self._lock.release()


def test_a_commit_posted_as_its_taker_lets_go_is_taken_though_nobody_steps() -> None:
    """A thread taking commits has read the last one and not yet let go of the lock; a commit
    posted then finds the lock held when its "take" comes. The holder looks again as it lets
    go and takes it: b never steps again, and the commit must not wait for its next step."""
    b = GossipNode(model(), node_config("b", CLUSTER, p=0.0, network_process=True))
    client = b.sender.client
    assert isinstance(client, NetworkProcess)
    lock = HeldUntilMissed()
    client._commits_lock = lock  # type: ignore[assignment]
    a = GossipNode(model(), node_config("a", CLUSTER, p=1.0, peers=[b.address], send_buffers=1))

    with a, b:
        holder = threading.Thread(target=client._take_commits, kwargs={"wait": True})
        holder.start()  # takes the lock, finds nothing posted, and holds on as it lets go
        assert lock.held.wait(30)
        looking = keep_looking(client)
        wait_until(lambda: (train(a), client._board.posted[0] >= 1)[1], 60, "a commit posted for b")
        looking.set()
        wait_until(lock.missed.is_set, 30, "the child's take to find the lock held")
        holder.join(60)
        wait_until(lambda: b.counters.get("pushes_received") == 1, 30, "the posted commit taken")
        weights = [a.finish(), b.finish()]
        assert a.counters.get("pushes_acked") == b.counters.get("pushes_received") == 1
    assert exact(weights, 2.0)


def test_kill_9_of_the_network_process_with_a_commit_posted() -> None:
    """b's network process posted a commit for b's training thread and died before anyone
    took it. The message is complete in its slot and was asked for while its call was alive:
    b commits it before it adopts the slots (were it taken later, its slot could also take a
    message received by b's own threads), and a learns so from ResolvePush."""
    b = GossipNode(model(), node_config("b", CLUSTER, p=0.0, network_process=True))
    client = b.sender.client
    assert isinstance(client, NetworkProcess)
    real_take = client._take_commits

    def only_when_the_child_is_gone(wait: bool = False) -> None:
        if wait:  # the watch thread's; the answer threads' "take" is ignored here
            real_take(wait=True)

    client._take_commits = only_when_the_child_is_gone  # type: ignore[method-assign]
    a = GossipNode(model(), node_config("a", CLUSTER, p=1.0, peers=[b.address], send_buffers=1))

    with a, b:
        child = b.network_process_pid
        assert child is not None
        looking = keep_looking(client)
        wait_until(
            lambda: (train(a), client._board.posted[0] >= 1)[1],
            60,
            "a commit posted for b's training thread",
        )
        assert b.counters.get("pushes_received") == 0  # nobody took it
        os.kill(child, signal.SIGKILL)
        wait_until(lambda: gone(child), 30, "b's network process to die")
        looking.set()
        settled = a.counters.get
        wait_until(
            lambda: (train_both(a, b), settled("pushes_resolved_committed") == 1)[1],
            60,
            "the push to settle as committed",
        )
        before = b.counters.get("pushes_received")
        assert before >= 1
        wait_until(
            lambda: (train_both(a, b), b.counters.get("pushes_received") >= before + 3)[1],
            60,
            "3 pushes received by b's own threads, into the slots it adopted",
        )
        weights = [a.finish(), b.finish()]
        assert settled("pushes_returned") == 0 and settled("pushes_lost_with_peer") == 0
        assert exact(weights, 2.0)


def test_kill_9_of_the_network_process_during_a_donation() -> None:
    """a has split half its weight into a donation that its network process was to stream to
    a joiner; the process dies. The donation comes back, the joiner fails, and a later joiner
    joins from a's own threads: the weight stays exact."""
    a = GossipNode(model(), node_config("a", CLUSTER, p=0.0, network_process=True))
    holding, held, resume = threading.Event(), threading.Event(), threading.Event()
    real_header = a.receiver.donation_header

    def held_header(msg: Any) -> pb.StateHeader:
        if holding.is_set():
            holding.clear()
            held.set()
            resume.wait(60)
        return real_header(msg)

    a.receiver.donation_header = held_header  # type: ignore[method-assign]
    with a:
        for _ in range(3):
            train(a)  # past step 0: a newcomer joins
        child = a.network_process_pid
        assert child is not None
        outcome: list[Any] = []

        def join(node_id: str) -> None:
            try:
                config = node_config(node_id, CLUSTER, peers=[a.address])
                outcome.append(GossipNode(model(), config))
            except JoinError as err:
                outcome.append(err)

        holding.set()
        joiner = threading.Thread(target=join, args=("b",), daemon=True)
        joiner.start()
        wait_until(lambda: (train(a), held.is_set())[1], 60, "a donation split off")
        assert a.weight == 0.5
        os.kill(child, signal.SIGKILL)
        wait_until(lambda: gone(child), 30, "a's network process to die")
        resume.set()
        joiner.join(60)
        assert len(outcome) == 1 and isinstance(outcome[0], JoinError)
        wait_until(lambda: (train(a), a.weight == 1.0)[1], 30, "the donation back in a")
        assert a.counters.get("donations_returned") == 1
        # training goes on: a newcomer joins from a's own threads
        joiner = threading.Thread(target=join, args=("c",), daemon=True)
        joiner.start()
        wait_until(lambda: (train(a), len(outcome) == 2)[1], 60, "c to join")
        joiner.join(10)
        c = outcome[1]
        assert isinstance(c, GossipNode) and c.joined
        with c:
            for _ in range(5):
                train_both(a, c)
            weights = [a.finish(), c.finish()]
        assert exact(weights, 1.0)


@needs_netns
def test_mdns_runs_in_the_network_process_and_here_after_it(lab, node_processes) -> None:
    """Daemons in a private namespace, found by mDNS alone: zeroconf runs in the network
    process (its log lines say gosgd-net), and after a kill -9 of that process in the node's
    own process, where a node started later still finds it."""
    ns = lab.loopback_host()
    args = ("--model", "mlp", "--dataset", "digits", "--cluster", CLUSTER, "--p", "0.5",
            "--steps", "300", "--eval-every", "0", "--network-process", "--wait-for-peers", "1",
            "--wait-timeout", "90")  # fmt: skip
    first = node_processes("m0", *args, prefix=tuple(lab.exec_prefix(ns)))

    def advertised(node: Any) -> list[str]:
        return [line for line in node.stderr().splitlines() if "mDNS: advertising" in line]

    wait_until(lambda: bool(advertised(first)), 60, "m0 to advertise")
    assert "gosgd-net[" in advertised(first)[0], first.stderr()
    children = [p for p in _children(first.proc.pid) if b"netproc" in _cmdline(p)]
    assert len(children) == 1, first.stderr()
    os.kill(children[0], signal.SIGKILL)
    wait_until(lambda: len(advertised(first)) == 2, 60, "m0 to advertise from its own process")
    assert "gosgd-net[" not in advertised(first)[1], first.stderr()
    assert "mDNS now runs in this process" in first.stderr()
    second = node_processes("m1", *args, prefix=tuple(lab.exec_prefix(ns)))
    for node in (first, second):
        assert node.wait(120) == 0, node.stderr()
    assert "gosgd-net[" in advertised(second)[0], second.stderr()
    assert first.final()["partners"] == ["m1"] and second.final()["partners"] == ["m0"]
    assert exact([first.final()["weight"], second.final()["weight"]], 2.0)


def test_the_default_mode() -> None:
    cpu = node_config("d", CLUSTER)
    assert cpu.network_process is None
    assert network_process_wanted(cpu, None, cuda=False) is True  # Linux, a CPU model
    assert network_process_wanted(cpu, PeerClient(), cuda=False) is False  # its own client
    assert network_process_wanted(cpu, None, cuda=True) is False  # not yet measured on a GPU
    sendproc = node_config("d", CLUSTER, send_process=True)
    assert network_process_wanted(sendproc, None, cuda=False) is False
    for chosen in (True, False):
        forced = node_config("d", CLUSTER, network_process=chosen)
        assert network_process_wanted(forced, None, cuda=True) is chosen


@pytest.mark.default_mode
def test_a_node_by_default_serves_from_a_network_process() -> None:
    node = GossipNode(model(), node_config("d", CLUSTER))
    with node:
        assert node.config.network_process is True
        assert node.network_process_pid is not None
        node.finish()


@pytest.mark.default_mode
def test_by_default_a_network_process_that_cannot_start_leaves_the_threads(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def cannot_start(*args: Any, **kw: Any) -> NetworkProcess:
        raise RuntimeError("the network process did not start (exit code 1)")

    monkeypatch.setattr(pushclient, "NetworkProcess", cannot_start)
    b = GossipNode(model(), node_config("b", CLUSTER, p=0.0))
    a = GossipNode(model(), node_config("a", CLUSTER, p=1.0, peers=[b.address]))
    with a, b:
        assert "no network process (the network process did not start" in caplog.text
        assert a.config.network_process is False and a.network_process_pid is None
        wait_until(lambda: (train_both(a, b), b.counters.get("pushes_received") >= 3)[1], 60,
                   "3 pushes between nodes in their own threads")  # fmt: skip
        assert exact([a.finish(), b.finish()], 2.0)
    with pytest.raises(RuntimeError, match="did not start"):  # asked for: it fails
        GossipNode(model(), node_config("c", CLUSTER, network_process=True))


def test_network_process_makes_its_own_client() -> None:
    with pytest.raises(ValueError, match="do not pass client="):
        GossipNode(model(), node_config("c", CLUSTER, network_process=True), client=PeerClient())


@pytest.mark.slow
def test_the_network_process_exits_when_its_node_is_killed(node_processes) -> None:
    receiver = GossipNode(model(), node_config("r", CLUSTER, p=0.0))
    with receiver:
        sender = node_processes(
            "s", "--model", "mlp", "--dataset", "digits", "--cluster", CLUSTER, "--no-mdns",
            "--p", "1.0", "--steps", "1000000", "--eval-every", "0", "--network-process",
            "--peers", receiver.address,
        )  # fmt: skip
        wait_until(lambda: receiver.counters.get("pushes_received") >= 3, 120, "3 pushes")
        children = [pid for pid in _children(sender.proc.pid) if b"netproc" in _cmdline(pid)]
        assert len(children) == 1, sender.stderr()
        assert not maps_torch(children[0])
        sender.kill()
        sender.wait(30)
        wait_until(lambda: gone(children[0]), 30, "the network process to exit after its node")
        receiver.finish()


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == pid:
            out.append(int(entry.name))
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
