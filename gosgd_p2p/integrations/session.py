"""The part both integrations share: one GossipNode around a framework's model, driven by the
framework's hooks (start, after each optimizer step, finish, close, abort)."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch

from gosgd_p2p.config import NodeConfig
from gosgd_p2p.node import GossipNode

__all__ = ["GossipSession"]

log = logging.getLogger(__name__)


class GossipSession:
    """Owns one GossipNode for one training run; every method runs on the training thread.

    `wait_for_peers`: a founder waits (up to `wait_timeout_s`) until it knows that many live
    peers, each knowing as many, before its first step, so nodes started together all found
    (weight 1 each) instead of the later ones joining the first, and start training together
    (as gosgd-node --wait-for-peers).
    """

    def __init__(
        self,
        config: NodeConfig | None = None,
        *,
        wait_for_peers: int = 0,
        wait_timeout_s: float = 60.0,
        **overrides: Any,
    ) -> None:
        self.config = replace(config or NodeConfig(), **overrides)
        self.wait_for_peers = wait_for_peers
        self.wait_timeout_s = wait_timeout_s
        #: The node, from start() on (kept after close() for its stats and weight).
        self.node: GossipNode | None = None
        #: The weight finish() settled on; None until then.
        self.final_weight: float | None = None
        self._closed = False

    def start(self, model: torch.nn.Module, resumed_step: int | None = None) -> GossipNode:
        """Found or join around `model` (on its device already). A run resumed from a
        checkpoint (`resumed_step`) rejoins with weight 0 and never founds: its checkpointed
        weight is a stale claim, still held by the peers it pushed to since."""
        node = GossipNode(model, self.config, member=resumed_step is not None)
        self.node = node
        if resumed_step is not None:
            node.step_count = resumed_step
        if self.wait_for_peers and not node.wait_for_peers(
            self.wait_for_peers, self.wait_timeout_s
        ):
            log.warning(
                "only %d of %d peers ready after %.0f s: training anyway",
                len(node.peers.pushable()), self.wait_for_peers, self.wait_timeout_s,
            )  # fmt: skip
        return node

    def after_optimizer_step(self, loss: float | torch.Tensor | None = None) -> None:
        """Gossip once: maybe push, merge what arrived; `loss` is kept for gosgd-status."""
        assert self.node is not None, "start() first"
        self.node.step()
        if loss is not None:
            self.node.note_loss(loss)

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint records of gossip: the node, its step and weight when saved.
        (A resumed run does not take this weight back: see start().)"""
        if self.node is None:
            return {}
        node = self.node
        return {"node_id": node.config.node_id, "step": node.step_count, "weight": node.weight}

    def finish(self) -> float:
        """Settle every message of this node; returns its final weight (idempotent)."""
        if self.final_weight is None and self.node is not None:
            self.final_weight = self.node.finish()
        return self.final_weight or 0.0

    def close(self) -> None:
        """Stop the node's server and threads (finish() first keeps the weight)."""
        if self.node is not None and not self._closed:
            self._closed = True
            self.node.close()

    def abort(self) -> None:
        """Training failed: hand the whole weight to a live peer (graceful leave), then close."""
        if self.node is None or self._closed:
            return
        try:
            self.node.leave()
        finally:
            self.close()
