"""A benchmark sink: a GossipNode that takes every push and drops it unmerged."""

from __future__ import annotations

import threading
import time
from typing import Any


def release_unmerged(node: Any, stop: Any, every_s: float) -> threading.Thread:
    """Start a thread that gives every received message's buffer back without merging it,
    each `every_s` seconds, until `stop` (an Event) is set: the sink's CPU goes to receiving,
    not to merges, and its inbox never fills."""

    def drain() -> None:
        while not stop.is_set():
            for msg in node.inbox.drain():
                msg.release(msg.payload)
            time.sleep(every_s)

    thread = threading.Thread(target=drain, name="bench-sink", daemon=True)
    thread.start()
    return thread
