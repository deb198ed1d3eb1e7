"""The peer table: who is out there, and who is alive enough to gossip with.

Keyed by address (a seed's node id is unknown until it answers). Sources (seed list, Hello,
peer exchange, mDNS) call `observe`; calls record success or failure. A peer that fails
`max_failures` times in a row is suspended, one that says it is draining is marked left, and
either comes back when any source sees it again. Thread-safe; bounded by `max_peers`.

What a caller says is not proof: pushes go only to peers we have called ourselves
(confirmed), a node id moves to a new address only when that address answered our call as
that id, and an address we heard of but could not call is forgotten at once (`expire`).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, replace

__all__ = ["Peer", "PeerTable"]


@dataclass(frozen=True)
class Peer:
    """A snapshot of one row of the peer table."""

    address: str
    node_id: str | None  # None until a source tells it
    status: str  # "live" | "suspended" | "left"
    last_seen: float  # time.monotonic() of the last sign of life, or when first heard of
    failures: int  # consecutive failed calls
    confirmed: bool = False  # we have called it successfully at least once


class PeerTable:
    """Thread-safe table of peers, excluding this node itself."""

    def __init__(
        self, self_id: str, self_address: str, max_failures: int = 3, max_peers: int = 1024
    ) -> None:
        self.self_id = self_id
        self.self_address = self_address
        self.max_failures = max_failures
        self.max_peers = max_peers
        self._rows: dict[str, Peer] = {}
        self._seeds: set[str] = set()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def add_seed(self, address: str) -> None:
        """Add a configured address, live until proven otherwise; prune() never drops it."""
        self._seeds.add(address)
        self.observe(address, None, seen=False)

    def prune(self, older_than_s: float) -> list[str]:
        """Forget peers, seeds excepted, that are not live and were last seen longer ago than
        `older_than_s` (a node restarted on a new port leaves its old address behind)."""
        cutoff = time.monotonic() - older_than_s
        with self._changed:
            gone = [
                a
                for a, row in self._rows.items()
                if row.status != "live" and row.last_seen < cutoff and a not in self._seeds
            ]
            for address in gone:
                del self._rows[address]
            if gone:
                self._changed.notify_all()
            return gone

    def observe(
        self,
        address: str,
        node_id: str | None,
        *,
        seen: bool = True,
        confirmed: bool = False,
        draining: bool = False,
    ) -> None:
        """A source reports `address` (and its node id when known): add it or bring it back.

        `seen`: the source saw the peer alive just now (a call from it, mDNS, our own Hello),
        which revives a suspended or left peer; peer-exchange hearsay passes False and only adds
        unknown addresses. `confirmed`: our own call to it succeeded. `draining`: the peer is
        alive but takes no pushes (finished, or not yet started): recorded as left, in the same
        step, so that no push can choose it in between.
        """
        status = "left" if draining else "live"
        if address == self.self_address or (node_id is not None and node_id == self.self_id):
            return
        with self._changed:
            if node_id is not None:
                rows = self._rows.items()
                elsewhere = [a for a, r in rows if r.node_id == node_id and a != address]
                if elsewhere and not seen:
                    return  # hearsay of a node we know under another address (an alias)
                if elsewhere and not confirmed:
                    # a claim that a known node moved: the new address gets its own row, with
                    # no id until our own call there answers as that node
                    node_id = None
                else:
                    # A node confirmed at a new address leaves its old row behind.
                    for addr in elsewhere:
                        del self._rows[addr]
            existing = self._rows.get(address)
            now = time.monotonic()
            if existing is None:
                if len(self._rows) >= self.max_peers:
                    return
                self._rows[address] = Peer(address, node_id, status, now, 0, confirmed)
            elif seen:
                self._rows[address] = replace(
                    existing,
                    node_id=node_id or existing.node_id,
                    status=status,
                    last_seen=now,
                    failures=0,
                    confirmed=existing.confirmed or confirmed,
                )
            self._changed.notify_all()

    def record_success(self, address: str) -> None:
        """A call to `address` succeeded."""
        with self._changed:
            row = self._rows.get(address)
            if row is not None:
                self._rows[address] = replace(
                    row, status="live", failures=0, last_seen=time.monotonic(), confirmed=True
                )
                self._changed.notify_all()

    def record_failure(self, address: str) -> bool:
        """A call to `address` failed; returns True when this failure suspended the peer."""
        with self._changed:
            row = self._rows.get(address)
            if row is None:
                return False
            failures = row.failures + 1
            suspend = row.status == "live" and failures >= self.max_failures
            status = "suspended" if suspend else row.status
            self._rows[address] = replace(row, failures=failures, status=status)
            self._changed.notify_all()
            return suspend

    def mark_left(self, address: str) -> None:
        """The peer said it is draining or leaving: stop choosing it."""
        with self._changed:
            row = self._rows.get(address)
            if row is not None and row.status != "left":
                self._rows[address] = replace(row, status="left")
                self._changed.notify_all()

    def remove(self, address: str) -> None:
        """Forget `address` entirely."""
        with self._changed:
            self._rows.pop(address, None)
            self._changed.notify_all()

    def get(self, address: str) -> Peer | None:
        with self._lock:
            return self._rows.get(address)

    def all(self) -> list[Peer]:
        with self._lock:
            return list(self._rows.values())

    def live(self) -> list[Peer]:
        """Peers neither suspended nor left, heard of or confirmed (pushes use `pushable`)."""
        with self._lock:
            return [p for p in self._rows.values() if p.status == "live"]

    def pushable(self) -> list[Peer]:
        """Live peers that answered a call of ours: the only ones a push or a leave goes to."""
        with self._lock:
            return [p for p in self._rows.values() if p.status == "live" and p.confirmed]

    def choose(self, rng: random.Random) -> Peer | None:
        """A pushable peer drawn uniformly at random, or None when there is none."""
        peers = self.pushable()
        return rng.choice(peers) if peers else None

    def expire(self, address: str) -> bool:
        """Forget `address` if we heard of it but never reached it (not a seed): a failed first
        call. Returns True when it was forgotten."""
        with self._changed:
            row = self._rows.get(address)
            if row is None or row.confirmed or address in self._seeds:
                return False
            del self._rows[address]
            self._changed.notify_all()
            return True

    def wait_live(self, count: int, timeout: float) -> bool:
        """Block until at least `count` live, confirmed peers exist; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                known = sum(1 for p in self._rows.values() if p.status == "live" and p.confirmed)
                if known >= count:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
