"""The peer table (gosgd_p2p.peers), the inbox (gosgd_p2p.inbox) and the wait for peers
(gosgd_p2p.membership), without a network."""

from __future__ import annotations

import logging
import random
import threading
from collections import Counter

import pytest
import torch

from gosgd_p2p.config import NodeConfig
from gosgd_p2p.fates import ABORTED_PER_SENDER, COMMITTED_PER_SENDER, Fate, FateMemory
from gosgd_p2p.identity import Identity
from gosgd_p2p.inbox import Inbox, Message
from gosgd_p2p.membership import TOGETHER_PER_ROUND, Membership
from gosgd_p2p.metrics import Counters, LogOnce
from gosgd_p2p.peers import PeerTable
from gosgd_p2p.reject import Reject
from gosgd_p2p.state import StateLayout
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import PROTOCOL_VERSION

SELF_ID, SELF_ADDR = "me", "10.0.0.1:5000"


def _table(**kwargs) -> PeerTable:
    return PeerTable(SELF_ID, SELF_ADDR, **kwargs)


# --- PeerTable --------------------------------------------------------------------------------


def test_seeds_start_live_without_an_id() -> None:
    table = _table()
    table.add_seed("10.0.0.2:5000")
    (peer,) = table.all()
    assert (peer.address, peer.node_id, peer.status, peer.failures) == (
        "10.0.0.2:5000",
        None,
        "live",
        0,
    )
    assert peer.last_seen > 0.0  # when it was first heard of: prune() counts from there
    assert table.live() == [peer]


def test_observe_learns_the_node_id_of_a_seed() -> None:
    table = _table()
    table.add_seed("b:1")
    table.observe("b:1", "node-b")
    peer = table.get("b:1")
    assert peer is not None
    assert peer.node_id == "node-b"
    assert peer.last_seen > 0.0
    table.observe("b:1", None)  # a source that does not know the id keeps the known one
    assert table.get("b:1").node_id == "node-b"


def test_hearsay_of_an_alias_does_not_displace_a_known_node() -> None:
    """Peer exchange may name a node by its seed host name while we know it by the address it
    advertises: one row, under the known address; only a first-hand sighting moves it."""
    table = _table()
    table.observe("10.0.0.3:7070", "node-c", confirmed=True)
    table.observe("node-c:7070", "node-c", seen=False)  # a peer's Hello lists the alias
    (peer,) = table.all()
    assert (peer.address, peer.confirmed) == ("10.0.0.3:7070", True)
    table.observe("10.0.0.9:7070", "node-c")  # a claim that it moved: a row with no id yet
    assert {p.address: p.node_id for p in table.all()} == {
        "10.0.0.3:7070": "node-c",
        "10.0.0.9:7070": None,
    }
    table.observe("10.0.0.9:7070", "node-c", confirmed=True)  # it answered there as node-c
    (peer,) = table.all()
    assert peer.address == "10.0.0.9:7070"


def test_self_is_never_a_peer() -> None:
    table = _table()
    table.add_seed(SELF_ADDR)
    table.observe(SELF_ADDR, "someone")
    table.observe("elsewhere:1", SELF_ID)  # ourselves under another address
    assert table.all() == []
    assert table.choose(random.Random(0)) is None


def test_failures_suspend_and_choose_skips_suspended_and_left() -> None:
    table = _table(max_failures=3)
    for addr, node in [("a:1", "a"), ("b:1", "b"), ("c:1", "c"), ("d:1", "d")]:
        table.observe(addr, node, confirmed=True)
    assert [table.record_failure("a:1") for _ in range(3)] == [False, False, True]
    assert table.record_failure("a:1") is False  # suspended once, not again
    assert table.get("a:1").status == "suspended"
    assert table.get("a:1").failures == 4
    table.mark_left("b:1")
    assert table.get("b:1").status == "left"
    assert table.record_failure("unknown:1") is False

    rng = random.Random(0)
    chosen = {table.choose(rng).address for _ in range(200)}
    assert chosen == {"c:1", "d:1"}  # uniform over the live ones: both come up in 200 draws
    assert {p.address for p in table.live()} == {"c:1", "d:1"}


def test_success_resets_the_failure_count() -> None:
    table = _table(max_failures=2)
    table.observe("a:1", "a")
    table.record_failure("a:1")
    table.record_success("a:1")
    assert table.get("a:1").failures == 0
    assert table.record_failure("a:1") is False
    assert table.get("a:1").status == "live"


@pytest.mark.parametrize("how", ["suspend", "leave"])
def test_seeing_a_peer_again_brings_it_back(how: str) -> None:
    table = _table(max_failures=1)
    table.observe("a:1", "a", confirmed=True)
    if how == "suspend":
        assert table.record_failure("a:1")
    else:
        table.mark_left("a:1")
    assert table.live() == []
    table.add_seed("a:1")  # configured again, but no sign of life: still out
    assert table.live() == []
    table.observe("a:1", "a")
    peer = table.get("a:1")
    assert (peer.status, peer.failures) == ("live", 0)
    assert table.choose(random.Random(0)).address == "a:1"


def test_a_node_that_moves_leaves_its_old_row_behind() -> None:
    table = _table()
    table.observe("old:1", "n")
    table.observe("other:1", "o")
    table.observe("new:1", "n", confirmed=True)  # our own call there answered as n
    assert {(p.address, p.node_id) for p in table.all()} == {("new:1", "n"), ("other:1", "o")}


def test_the_table_is_bounded() -> None:
    table = _table(max_peers=3)
    for i in range(5):
        table.observe(f"p{i}:1", f"n{i}")
    assert [p.address for p in table.all()] == ["p0:1", "p1:1", "p2:1"]
    table.observe("p0:2", "n0", confirmed=True)  # a known node moving is not a new peer
    assert {p.address for p in table.all()} == {"p0:2", "p1:1", "p2:1"}
    table.remove("p1:1")
    table.observe("p9:1", "n9")
    assert len(table.all()) == 3
    assert table.get("p9:1") is not None


def test_pushes_go_only_to_confirmed_peers_and_unreached_ones_expire() -> None:
    table = _table()
    table.add_seed("seed:1")
    table.observe("heard:1", "h")  # a caller's Hello named it: not called by us yet
    table.observe("met:1", "m", confirmed=True)
    assert [p.address for p in table.pushable()] == ["met:1"]
    assert {table.choose(random.Random(i)).address for i in range(20)} == {"met:1"}
    assert table.expire("heard:1") and table.get("heard:1") is None  # our call there failed
    assert not table.expire("seed:1") and not table.expire("met:1")  # kept: seed, confirmed


def test_wait_live_times_out_without_enough_confirmed_peers() -> None:
    table = _table()
    table.add_seed("a:1")  # live but never answered: does not count
    table.observe("c:1", "c")  # heard of (mDNS, a call from it), not called yet: neither
    table.observe("b:1", "b", confirmed=True)
    assert table.wait_live(1, timeout=0.05) is True
    assert table.wait_live(2, timeout=0.05) is False


def test_wait_live_wakes_when_peers_appear() -> None:
    table = _table()
    ready = threading.Event()

    def discover() -> None:
        ready.wait(timeout=10)
        table.observe("a:1", "a", confirmed=True)
        table.add_seed("c:1")
        table.record_success("b:1")  # unknown address: ignored
        table.observe("b:1", "b")
        table.record_success("b:1")  # a call to it succeeded: confirmed

    thread = threading.Thread(target=discover, name="discover")
    thread.start()
    try:
        assert table.wait_live(1, timeout=0.0) is False
        ready.set()
        assert table.wait_live(2, timeout=10.0) is True
    finally:
        ready.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert len(table.live()) == 3


# --- Inbox ------------------------------------------------------------------------------------


def _msg(sender: str = "s", message_id: int = 0, *, returned: bool = False) -> Message:
    return Message(
        sender_id=sender,
        message_id=message_id,
        weight=0.5,
        payload=torch.zeros(2),
        sender_step=0,
        returned=returned,
        release=lambda _buf: None,
    )


def test_a_closed_inbox_refuses_received_messages() -> None:
    inbox = Inbox()
    assert not inbox.accepting
    with pytest.raises(Reject) as err:
        inbox.commit(_msg())
    assert err.value.kind == "precondition"
    assert len(inbox) == 0
    assert inbox.fate("s", 0) is None  # a refused message can be delivered later
    inbox.open()
    assert inbox.commit(_msg())
    inbox.close()
    assert not inbox.accepting
    with pytest.raises(Reject):
        inbox.commit(_msg("s", 1))
    assert [m.message_id for m in inbox.drain()] == [0]  # committed ones stay


def test_a_duplicate_is_committed_once() -> None:
    inbox = Inbox()
    inbox.open()
    assert inbox.commit(_msg("a", 1)) is True
    assert inbox.commit(_msg("a", 1)) is False
    assert inbox.commit(_msg("b", 1)) is True  # another sender, same id
    assert inbox.commit(_msg("a", 2)) is True
    assert inbox.fate("a", 1) == "committed" and inbox.fate("a", 3) is None
    assert [(m.sender_id, m.message_id) for m in inbox.drain()] == [("a", 1), ("b", 1), ("a", 2)]
    assert inbox.commit(_msg("a", 1)) is False  # remembered after the drain too


def test_returned_messages_are_always_accepted() -> None:
    inbox = Inbox()
    inbox.put_returned(_msg("me", 1, returned=True))
    inbox.put_returned(_msg("me", 1, returned=True))  # no dedup for our own weight
    assert len(inbox) == 2
    assert all(m.returned for m in inbox.drain())


def test_drain_returns_in_order_and_empties() -> None:
    inbox = Inbox()
    inbox.open()
    inbox.commit(_msg("a", 1))
    inbox.put_returned(_msg("me", 7, returned=True))
    inbox.commit(_msg("b", 2))
    assert [(m.sender_id, m.message_id) for m in inbox.drain()] == [
        ("a", 1),
        ("me", 7),
        ("b", 2),
    ]
    assert len(inbox) == 0
    assert inbox.drain() == []


def test_concurrent_redelivery_commits_each_message_once() -> None:
    inbox = Inbox()
    inbox.open()
    results: list[bool] = []
    lock = threading.Lock()

    def deliver() -> None:
        mine = [inbox.commit(_msg("a", i)) for i in range(200)]
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=deliver, name=f"deliver-{i}") for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
        assert not t.is_alive()
    assert results.count(True) == 200
    assert sorted(m.message_id for m in inbox.drain()) == list(range(200))


def test_resolve_aborts_an_unknown_message_for_good() -> None:
    inbox = Inbox()
    inbox.open()
    assert inbox.resolve("a", 5) == "aborted"
    with pytest.raises(Reject) as info:
        inbox.commit(_msg("a", 5))  # a late stream of the aborted push
    assert info.value.counter == "aborted"
    assert len(inbox) == 0
    assert inbox.resolve("a", 5) == "aborted"  # asking again gives the same answer


def test_resolve_reports_a_committed_message() -> None:
    inbox = Inbox()
    inbox.open()
    assert inbox.commit(_msg("a", 6))
    assert inbox.resolve("a", 6) == "committed"
    assert not inbox.commit(_msg("a", 6))  # and redelivery stays a duplicate


def test_prune_forgets_long_dead_peers_but_keeps_seeds() -> None:
    table = PeerTable("self", "self:1", max_failures=1)
    table.add_seed("seed:1")
    table.observe("dead:1", "d")
    table.observe("live:1", "l")
    table.record_failure("seed:1")
    table.record_failure("dead:1")
    assert table.prune(3600.0) == []  # seen recently: kept
    assert table.prune(-1.0) == ["dead:1"]  # a cutoff in the future: every dead non-seed
    assert {p.address for p in table.all()} == {"seed:1", "live:1"}


def test_the_client_keeps_a_bounded_number_of_channels() -> None:
    from gosgd_p2p.client import PeerClient

    client = PeerClient(max_channels=3)
    for port in range(1, 6):
        client._channel(f"127.0.0.1:{port}")
    assert list(client._channels) == ["127.0.0.1:3", "127.0.0.1:4", "127.0.0.1:5"]
    client._channel("127.0.0.1:3")  # used again: now the most recent
    client._channel("127.0.0.1:6")
    assert list(client._channels) == ["127.0.0.1:5", "127.0.0.1:3", "127.0.0.1:6"]
    client.close()


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_no_flood_of_questions_makes_a_committed_message_aborted() -> None:
    memory = FateMemory(hold_s=10.0, idle_s=100.0, max_senders=8, clock=_Clock())
    assert memory.commit("a", 5)
    for i in range(10_000):  # fresh senders, and fresh ids under a's own name
        memory.resolve(f"stranger-{i}", i)
        memory.resolve("a", 1_000_000 + i)
    assert memory.resolve("a", 5) is Fate.COMMITTED
    assert len(memory) <= 16  # 8 members, 8 strangers at most


def test_an_abort_is_promised_only_while_it_can_be_remembered() -> None:
    clock = _Clock()
    memory = FateMemory(hold_s=10.0, idle_s=100.0, clock=clock)
    aborted = [i for i in range(ABORTED_PER_SENDER) if memory.resolve("a", i) is Fate.ABORTED]
    assert len(aborted) == ABORTED_PER_SENDER
    assert memory.resolve("a", 10_000) is Fate.UNKNOWN  # no room: cannot promise ABORTED
    with pytest.raises(Reject):
        memory.commit("a", 0)  # a late stream of an aborted message never commits
    clock.now = 10.0  # no stream of those can commit any more: they may be forgotten
    assert memory.resolve("a", 10_000) is Fate.ABORTED


def test_a_forgotten_commit_is_answered_unknown_never_aborted() -> None:
    memory = FateMemory(hold_s=10.0, idle_s=100.0, clock=_Clock())
    for i in range(COMMITTED_PER_SENDER + 1):
        assert memory.commit("a", i)
    assert memory.resolve("a", 0) is Fate.UNKNOWN  # the oldest commit was forgotten
    assert memory.resolve("a", COMMITTED_PER_SENDER) is Fate.COMMITTED
    assert memory.resolve("a", COMMITTED_PER_SENDER + 1) is Fate.ABORTED  # above: never came


def test_senders_are_forgotten_only_when_safe() -> None:
    clock = _Clock()
    memory = FateMemory(hold_s=10.0, idle_s=100.0, max_senders=2, clock=clock)
    assert memory.commit("a", 1) and memory.commit("b", 1)
    with pytest.raises(Reject) as info:
        memory.commit("c", 1)  # a and b may still ask: c's push goes back to c
    assert info.value.counter == "senders"
    assert memory.resolve("x", 1) is Fate.ABORTED and memory.resolve("y", 1) is Fate.ABORTED
    assert memory.resolve("z", 1) is Fate.UNKNOWN  # x's and y's aborts are still held
    clock.now = 100.0
    assert memory.commit("c", 1)  # a has been idle long enough to be forgotten
    assert memory.resolve("z", 1) is Fate.ABORTED
    assert memory.resolve("b", 1) is Fate.COMMITTED


# --- Membership.wait_together -----------------------------------------------------------------


class FortyPeers:
    """A client for 40 peers that are not training yet; each lists all the others from the
    second Hello it answers on, as if it had met them by then. Records whom each round asks."""

    def __init__(self) -> None:
        self.peers = [pb.PeerInfo(node_id=f"p{i}", address=f"10.0.1.{i}:7070") for i in range(40)]
        self.asked: Counter[str] = Counter()
        self.rounds: list[set[str]] = []

    def hello(self, address: str, request: pb.HelloRequest, timeout: float) -> pb.HelloReply:
        self.asked[address] += 1
        me = next(p for p in self.peers if p.address == address)
        met = [p for p in self.peers if p is not me] if self.asked[address] > 1 else []
        return pb.HelloReply(
            self=me, cluster="unit", protocol_version=PROTOCOL_VERSION, peers=met, step=0,
            accepting=True,
        )  # fmt: skip


def test_a_node_waiting_among_many_asks_a_few_a_round_and_each_until_ready() -> None:
    client = FortyPeers()
    cfg = NodeConfig(
        node_id="me", cluster="unit", peers=[p.address for p in client.peers], mdns=False
    )
    identity = Identity("me", "unit", StateLayout([("w", torch.zeros(4))]))
    identity.address = SELF_ADDR
    membership = Membership(
        cfg, identity, client, Counters(), LogOnce(logging.getLogger("test")),  # type: ignore[arg-type]
        step=lambda: 0, accepting=lambda: True, seed=0,
    )  # fmt: skip
    real_round = membership._hello_round

    def recorded(addresses: list[str]):
        client.rounds.append(set(addresses))
        return real_round(addresses)

    membership._hello_round = recorded  # type: ignore[method-assign]
    membership.open("127.0.0.1")
    try:
        assert membership.wait_together(39, timeout_s=30) is True
    finally:
        membership.close()
    assert all(len(r) <= TOGETHER_PER_ROUND for r in client.rounds), client.rounds
    # unmet the first time, ready the second; never asked again once ready
    assert set(client.asked.values()) == {2}, client.asked
    assert len(membership.peers.pushable()) == 40
