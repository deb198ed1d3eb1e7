"""What a receiver remembers of the pushes it was sent: per sender, which it committed and
which it aborted, so that redelivery is idempotent and ResolvePush has a safe answer.

The rule it keeps: it never answers ABORTED for a message it committed, and never commits a
message it answered ABORTED for (either would count the weight twice). When it cannot keep
that promise it answers UNKNOWN, and the sender writes the weight off: lost, never invented.

Memory is per sender and bounded per sender, so no caller's traffic can evict what another
sender may still ask about:
- committed ids, at most COMMITTED_PER_SENDER a sender (a sender has a few pushes unsettled
  at a time; the oldest are forgotten first, and a question about an id at or below the
  highest forgotten one is answered UNKNOWN);
- aborted ids, at most ABORTED_PER_SENDER a sender, each kept `hold_s` (long enough that no
  stream of that message can still commit); when they are all younger, a new question is
  answered UNKNOWN instead of ABORTED;
- senders that committed something here ("members", at most MAX_SENDERS) and senders that only
  asked ("strangers", at most MAX_SENDERS apart): a ResolvePush from a sender id never seen
  cannot take a member's place. A record is dropped only when that is safe: no abort younger
  than `hold_s`, and (members) nothing committed for `idle_s`, longer than any sender keeps
  asking. With no room, a new sender's push is refused (and returned to it) and a new
  stranger's question is answered UNKNOWN.

Not thread-safe: the Inbox calls it under its lock.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from enum import Enum

from gosgd_p2p.reject import Reject, Status, Why

__all__ = ["ABORTED_PER_SENDER", "COMMITTED_PER_SENDER", "MAX_SENDERS", "Fate", "FateMemory"]

#: Committed message ids remembered per sender (the oldest are forgotten first).
COMMITTED_PER_SENDER = 512
#: Aborted message ids remembered per sender.
ABORTED_PER_SENDER = 64
#: Sender records of each kind (members that committed, strangers that only asked).
MAX_SENDERS = 1024


class Fate(str, Enum):
    """What a receiver knows of a (sender, message id)."""

    COMMITTED = "committed"  # in the inbox or merged: the weight is the receiver's
    ABORTED = "aborted"  # never committed, and never will be: the sender may take it back
    UNKNOWN = "unknown"  # forgotten, or no room to promise ABORTED: the sender writes it off


class _Record:
    """One sender's memory."""

    def __init__(self, now: float) -> None:
        self.committed: OrderedDict[int, None] = OrderedDict()  # in commit order
        self.forgotten_max: int | None = None  # highest committed id forgotten
        self.aborted: OrderedDict[int, float] = OrderedDict()  # id -> when, oldest first
        self.last_commit = now

    def young_abort(self, now: float, hold_s: float) -> bool:
        """Whether some abort is younger than `hold_s` (a stream of it might still commit)."""
        return any(now - when < hold_s for when in self.aborted.values())

    def forget_old_aborts(self, now: float, hold_s: float) -> None:
        while self.aborted and now - next(iter(self.aborted.values())) >= hold_s:
            self.aborted.popitem(last=False)


class FateMemory:
    """Per-sender fates of pushes (see the module docstring)."""

    def __init__(
        self,
        hold_s: float,
        idle_s: float,
        *,
        max_senders: int = MAX_SENDERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._hold_s = hold_s
        self._idle_s = idle_s
        self._max = max_senders
        self._clock = clock
        self._members: OrderedDict[str, _Record] = OrderedDict()  # least recently used first
        self._strangers: OrderedDict[str, _Record] = OrderedDict()

    def __len__(self) -> int:
        """Sender records held (members and strangers)."""
        return len(self._members) + len(self._strangers)

    def fate(self, sender_id: str, message_id: int) -> Fate | None:
        """COMMITTED or ABORTED when remembered, else None (nothing is recorded)."""
        rec = self._members.get(sender_id) or self._strangers.get(sender_id)
        if rec is None:
            return None
        if message_id in rec.committed:
            return Fate.COMMITTED
        if message_id in rec.aborted:
            return Fate.ABORTED
        return None

    def commit(self, sender_id: str, message_id: int) -> bool:
        """Record a commit; False for a duplicate. Raises Reject when the message was aborted
        or no record can be made for a new sender (nothing is committed then)."""
        fate = self.fate(sender_id, message_id)
        if fate is Fate.COMMITTED:
            return False
        if fate is Fate.ABORTED:
            raise Reject(Status.PRECONDITION, Why.ABORTED, "the sender took this message back")
        now = self._clock()
        rec = self._member(sender_id, now)
        rec.committed[message_id] = None
        rec.last_commit = now
        if len(rec.committed) > COMMITTED_PER_SENDER:
            gone, _ = rec.committed.popitem(last=False)
            rec.forgotten_max = max(gone, rec.forgotten_max or 0)
        return True

    def abort(self, sender_id: str, message_id: int) -> bool:
        """Turn a just-made commit into an abort; False (and it stays committed) when there is
        no room to remember the abort."""
        rec = self._members.get(sender_id)
        if rec is None or message_id not in rec.committed:
            return False
        now = self._clock()
        if not self._room_for_abort(rec, now):
            return False
        del rec.committed[message_id]
        rec.aborted[message_id] = now
        return True

    def resolve(self, sender_id: str, message_id: int) -> Fate:
        """The final answer to a sender's ResolvePush: COMMITTED, ABORTED (recorded: the message
        can never commit from now on) or UNKNOWN (nothing recorded)."""
        fate = self.fate(sender_id, message_id)
        if fate is not None:
            return fate
        now = self._clock()
        rec = self._members.get(sender_id) or self._stranger(sender_id, now)
        if rec is None:
            return Fate.UNKNOWN  # no room to promise anything for a new sender
        if rec.forgotten_max is not None and message_id <= rec.forgotten_max:
            return Fate.UNKNOWN  # it may be one of the committed ids forgotten
        if not self._room_for_abort(rec, now):
            return Fate.UNKNOWN
        rec.aborted[message_id] = now
        return Fate.ABORTED

    # --- records -------------------------------------------------------------------------------

    def _room_for_abort(self, rec: _Record, now: float) -> bool:
        rec.forget_old_aborts(now, self._hold_s)
        return len(rec.aborted) < ABORTED_PER_SENDER

    def _member(self, sender_id: str, now: float) -> _Record:
        rec = self._members.get(sender_id)
        if rec is not None:
            self._members.move_to_end(sender_id)
            return rec
        rec = self._strangers.pop(sender_id, None)  # a stranger that now commits
        if len(self._members) >= self._max and not self._evict(self._members, now, members=True):
            if rec is not None:
                self._strangers[sender_id] = rec
            raise Reject(Status.EXHAUSTED, Why.SENDERS, "too many senders; try another peer")
        if rec is None:
            rec = _Record(now)
        self._members[sender_id] = rec
        return rec

    def _stranger(self, sender_id: str, now: float) -> _Record | None:
        rec = self._strangers.get(sender_id)
        if rec is not None:
            self._strangers.move_to_end(sender_id)
            return rec
        if len(self._strangers) >= self._max and not self._evict(self._strangers, now):
            return None
        rec = self._strangers[sender_id] = _Record(now)
        return rec

    def _evict(self, records: OrderedDict[str, _Record], now: float, members: bool = False) -> bool:
        """Drop the least recently used record it is safe to drop; False when there is none."""
        for sender_id, rec in records.items():
            if rec.young_abort(now, self._hold_s):
                continue
            if members and now - rec.last_commit < self._idle_s:
                continue
            del records[sender_id]
            return True
        return False
