"""The inbox: complete, validated messages waiting for the training thread to merge them.

Two kinds of message enter: received ones (from the server, only while the node accepts, and
applied at most once per (sender, message id)), and returned ones (our own pushes that could not
be delivered; always accepted, since their weight has nowhere else to go). Only the training
thread drains it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

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


class Inbox:
    """Thread-safe inbox with a bounded memory of delivered message ids."""

    def __init__(self, dedup_window: int = 4096) -> None:
        self._messages: deque[Message] = deque()
        self._seen: OrderedDict[tuple[str, int], None] = OrderedDict()
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

    def seen(self, sender_id: str, message_id: int) -> bool:
        """True if (sender_id, message_id) was already committed (within the window)."""
        with self._lock:
            return (sender_id, message_id) in self._seen

    def commit(self, msg: Message) -> bool:
        """Commit a received message; returns False if it is a duplicate (nothing committed).

        Raises Reject("precondition") when the inbox is closed. The caller keeps ownership of
        the payload when this returns False or raises.
        """
        key = (msg.sender_id, msg.message_id)
        with self._lock:
            if not self._accepting:
                raise Reject("precondition", "draining", "node is not accepting pushes")
            if key in self._seen:
                return False
            self._seen[key] = None
            if len(self._seen) > self._dedup_window:
                self._seen.popitem(last=False)
            self._messages.append(msg)
            return True

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
