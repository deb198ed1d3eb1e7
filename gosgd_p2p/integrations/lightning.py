"""Gossip for a PyTorch Lightning Trainer: `Trainer(callbacks=[GossipCallback(...)])`.

A callback, not a strategy: a Lightning strategy owns how processes are launched, how the
model is wrapped and how gradients are reduced, and GoSGD needs none of that. Each gossip node
is an independent Trainer on its own data with its own optimizer; gossip only acts between
optimizer steps, on the module's own tensors. So it composes with whatever strategy and
accelerator the Trainer already uses (one device per node), and is one argument to add.

What the callback does at each hook (all on the training thread):
- on_fit_start: found or join around the LightningModule (already on its device). A fit
  resumed from a checkpoint (`ckpt_path=`) rejoins with weight 0 and never founds, as
  gosgd-node --checkpoint-dir does: the checkpoint's weight is a stale claim.
- on_train_batch_end: after each optimizer step (not each micro-batch when accumulating
  gradients), gossip once: maybe push, merge what arrived; the loss is kept for gosgd-status.
- validation runs on the node's own model: nothing merges outside a training step.
- state_dict (saved in every checkpoint): node id, step and weight at the save.
- on_train_end: finish (settle every message); teardown: close; on_exception: hand the
  whole weight to a live peer (leave), then close.

Needs the optional extra: `pip install gosgd-p2p[lightning]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from gosgd_p2p.config import NodeConfig
from gosgd_p2p.integrations.session import GossipSession
from gosgd_p2p.node import GossipNode

__all__ = ["GossipCallback"]


class GossipCallback(pl.Callback):
    """Adds GoSGD gossip to a Lightning Trainer. `config` (and `overrides` of its fields) as
    for GossipNode; `wait_for_peers`: founders wait for that many live peers first (nodes
    started together then all found)."""

    def __init__(
        self,
        config: NodeConfig | None = None,
        *,
        wait_for_peers: int = 0,
        wait_timeout_s: float = 60.0,
        **overrides: Any,
    ) -> None:
        self.session = GossipSession(
            config, wait_for_peers=wait_for_peers, wait_timeout_s=wait_timeout_s, **overrides
        )
        self._resumed: dict[str, Any] | None = None
        self._optimizer_steps = 0

    @property
    def node(self) -> GossipNode | None:
        """The gossip node, once fit has started."""
        return self.session.node

    @property
    def final_weight(self) -> float | None:
        """This node's weight once training ended and its messages settled."""
        return self.session.final_weight

    @property
    def state_key(self) -> str:
        return "GossipCallback"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        resumed = None if self._resumed is None else int(self._resumed.get("step", 0))
        self.session.start(pl_module, resumed_step=resumed)
        self._optimizer_steps = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step == self._optimizer_steps:
            return  # accumulating gradients: no optimizer step yet
        self._optimizer_steps = trainer.global_step
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        self.session.after_optimizer_step(loss if isinstance(loss, torch.Tensor) else None)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.session.finish()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.session.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.session.abort()

    def state_dict(self) -> dict[str, Any]:
        return self.session.checkpoint_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._resumed = dict(state_dict)
