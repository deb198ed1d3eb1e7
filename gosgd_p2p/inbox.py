"""The inbox: complete, validated messages waiting for the training thread to merge them.

Two kinds of message enter: received ones (from the server, only while the node accepts, and
applied at most once per (sender, message id)), and returned ones (our own pushes that could not
be delivered; always accepted, since their weight has nowhere else to go). Only the training
thread drains it.

The inbox also remembers, for a bounded window, the fate of recent (sender, message id) pairs:
COMMITTED, or ABORTED by a sender's ResolvePush. That memory is what makes redelivery
idempotent and an unknown push outcome decidable (see GossipNode.resolve_push).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gosgd_p2p.staging import no_wait
from gosgd_p2p.wire import Reject

__all__ = ["Inbox", "Message"]


@dataclass
class Message:
    """A state (x_s as a flat float32 CPU buffer) and the weight a_s it carries."""

    sender_id: str
    message_id: int
    weight: float
    payload: torch.Tensor
    sender_step: int
    returned: bool  # True: our own push coming back
    release: Callable[[torch.Tensor], None]  # hands `payload` back to its pool after the merge
    ready: Callable[[], None] = no_wait  # waits until `payload` is written (a GPU snapshot)


class Inbox:
    """Thread-safe inbox with a bounded memory of delivered message ids."""

    def __init__(self, dedup_window: int = 4096) -> None:
        self._messages: deque[Message] = deque()
        self._fate: OrderedDict[tuple[str, int], str] = OrderedDict()  # "committed"/"aborted"
        self._dedup_window = dedup_window
        self._accepting = False
        self._lock = threading.Lock()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def open(self) -> None:
        """Start accepting received messages (the node has a state to merge them into)."""
        with self._lock:
            self._accepting = True

    def close(self) -> None:
        """Stop accepting received messages; those already committed stay to be merged.

        After close() returns, no received message can enter, so a final drain() is complete.
        """
        with self._lock:
            self._accepting = False

    def fate(self, sender_id: str, message_id: int) -> str | None:
        """ "committed", "aborted", or None if (sender_id, message_id) is not remembered."""
        with self._lock:
            return self._fate.get((sender_id, message_id))

    def _remember(self, key: tuple[str, int], fate: str) -> None:
        self._fate[key] = fate
        if len(self._fate) > self._dedup_window:
            self._fate.popitem(last=False)

    def commit(self, msg: Message) -> bool:
        """Commit a received message; returns False if it is a duplicate (nothing committed).

        Raises Reject("precondition") when the inbox is closed or the sender has aborted this
        message (ResolvePush). The caller keeps the payload when this returns False or raises.
        """
        key = (msg.sender_id, msg.message_id)
        with self._lock:
            if not self._accepting:
                raise Reject("precondition", "draining", "node is not accepting pushes")
            fate = self._fate.get(key)
            if fate == "committed":
                return False
            if fate == "aborted":
                raise Reject("precondition", "aborted", "the sender took this message back")
            self._remember(key, "committed")
            self._messages.append(msg)
            return True

    def retract(self, msg: Message) -> bool:
        """Take a just-committed message back out, if it is still waiting; True if it was.

        Its fate becomes "aborted", so it is refused if sent again under the same id.
        """
        key = (msg.sender_id, msg.message_id)
        with self._lock:
            for i, waiting in enumerate(self._messages):
                if waiting is msg:
                    del self._messages[i]
                    self._fate[key] = "aborted"
                    return True
            return False

    def resolve(self, sender_id: str, message_id: int) -> str:
        """Final fate of a push: "committed", or "aborted" (and then it can never commit)."""
        key = (sender_id, message_id)
        with self._lock:
            fate = self._fate.get(key)
            if fate is None:
                fate = "aborted"
                self._remember(key, fate)
            return fate

    def put_returned(self, msg: Message) -> None:
        """Give an undelivered push back to its sender (always accepted)."""
        with self._lock:
            self._messages.append(msg)

    def drain(self) -> list[Message]:
        """Take every waiting message, oldest first (training thread only)."""
        with self._lock:
            out = list(self._messages)
            self._messages.clear()
            return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._messages)
