"""The inbox: complete, validated messages waiting for the training thread to merge them.

Two kinds of message enter: received ones (from the server, only while the node accepts, and
applied at most once per (sender, message id)), and returned ones (our own pushes that could not
be delivered; always accepted, since their weight has nowhere else to go). Only the training
thread drains it.

The inbox also holds the fate memory (fates.py): per sender, the message ids it committed and
those a sender's ResolvePush aborted, under the same lock as the commit. That memory is what
makes redelivery idempotent and an unknown push outcome decidable (see Receiver.resolve_push).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gosgd_p2p.fates import Fate, FateMemory
from gosgd_p2p.reject import Reject, Status, Why
from gosgd_p2p.staging import no_wait
from gosgd_p2p.v1 import gossip_pb2 as pb

__all__ = ["Fate", "Inbox", "Message"]


@dataclass
class Message:
    """A state (x_s as a flat CPU buffer, see `encoding`) and the weight a_s it carries."""

    sender_id: str
    message_id: int
    weight: float
    payload: torch.Tensor
    sender_step: int
    returned: bool  # True: our own push coming back
    release: Callable[[torch.Tensor], None]  # hands `payload` back to its pool after the merge
    ready: Callable[[], None] = no_wait  # waits until `payload` is written (a GPU snapshot)
    #: ENCODING_FP32: `payload` is the float32 state. Otherwise (our own push, returned) its
    #: first bytes are the state in that encoding (a proto Encoding value), decoded to merge.
    encoding: int = pb.ENCODING_FP32


class Inbox:
    """Thread-safe inbox with a bounded per-sender memory of message fates.

    `hold_s`: how long an abort is remembered (longer than any stream of that message can
    still be received); `idle_s`: how long a sender that committed here may still ask about
    its pushes (see FateMemory).
    """

    def __init__(self, hold_s: float = 120.0, idle_s: float = 1200.0) -> None:
        self._messages: deque[Message] = deque()
        self._fates = FateMemory(hold_s, idle_s)
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

    def fate(self, sender_id: str, message_id: int) -> Fate | None:
        """COMMITTED or ABORTED when (sender_id, message_id) is remembered, else None."""
        with self._lock:
            return self._fates.fate(sender_id, message_id)

    def commit(self, msg: Message) -> bool:
        """Commit a received message; returns False if it is a duplicate (nothing committed).

        Raises Reject when the inbox is closed, the sender has aborted this message
        (ResolvePush), or there is no room to remember a new sender (RESOURCE_EXHAUSTED).
        The caller keeps the payload when this returns False or raises.
        """
        with self._lock:
            if not self._accepting:
                raise Reject(Status.PRECONDITION, Why.DRAINING, "node is not accepting pushes")
            if not self._fates.commit(msg.sender_id, msg.message_id):
                return False
            self._messages.append(msg)
            return True

    def retract(self, msg: Message) -> bool:
        """Take a just-committed message back out, if it is still waiting; True if it was.

        Its fate becomes ABORTED, so it is refused if sent again under the same id. When the
        abort cannot be remembered, the message stays committed (and this returns False).
        """
        with self._lock:
            for i, waiting in enumerate(self._messages):
                if waiting is msg:
                    if not self._fates.abort(msg.sender_id, msg.message_id):
                        return False
                    del self._messages[i]
                    return True
            return False

    def resolve(self, sender_id: str, message_id: int) -> Fate:
        """Final fate of a push: COMMITTED, ABORTED (and then it can never commit) or UNKNOWN
        (forgotten, or no room to promise ABORTED: the sender writes the weight off)."""
        with self._lock:
            return self._fates.resolve(sender_id, message_id)

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

    def weight(self) -> float:
        """The weight of the waiting messages, summed: this node's until it merges them."""
        with self._lock:
            return math.fsum(msg.weight for msg in self._messages)

    def __len__(self) -> int:
        with self._lock:
            return len(self._messages)
