"""Gossip for a Hugging Face transformers Trainer: `Trainer(..., callbacks=[GossipCallback()])`.

What the callback does at each event (all on the training thread):
- on_train_begin: found or join around the Trainer's model (already on its device). A run
  resumed from a checkpoint (`train(resume_from_checkpoint=...)`, so global_step > 0 here)
  rejoins with weight 0 and never founds, as gosgd-node --checkpoint-dir does: the
  checkpoint's weight is a stale claim.
- on_optimizer_step: after each optimizer step (not each micro-batch when accumulating
  gradients), gossip once: maybe push, merge what arrived.
- on_log: the training loss the Trainer logs is kept for gosgd-status.
- evaluation runs on the node's own model: nothing merges outside a training step.
- on_save: the checkpoint folder gets gossip.json (node id, step and weight at the save).
- on_train_end: finish (settle every message), then close.

An exception out of `trainer.train()` skips on_train_end: call `callback.abort()` then (it
hands the weight to a live peer and closes), or `finish()`/`close()` yourself.

Needs the optional extra: `pip install gosgd-p2p[hf]`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from gosgd_p2p.config import NodeConfig
from gosgd_p2p.integrations.session import GossipSession
from gosgd_p2p.node import GossipNode

__all__ = ["CHECKPOINT_FILE", "GossipCallback"]

#: The file on_save writes into each checkpoint folder.
CHECKPOINT_FILE = "gossip.json"


class GossipCallback(TrainerCallback):
    """Adds GoSGD gossip to a transformers Trainer. `config` (and `overrides` of its fields)
    as for GossipNode; `wait_for_peers`: founders wait for that many live peers first (nodes
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

    @property
    def node(self) -> GossipNode | None:
        """The gossip node, once training has begun."""
        return self.session.node

    @property
    def final_weight(self) -> float | None:
        """This node's weight once training ended and its messages settled."""
        return self.session.final_weight

    def abort(self) -> None:
        """Training failed: hand the whole weight to a live peer, then close."""
        self.session.abort()

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("GossipCallback needs the Trainer's model (transformers passes it)")
        resumed = state.global_step if state.global_step > 0 else None
        self.session.start(model, resumed_step=resumed)

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.session.after_optimizer_step()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        node = self.session.node
        if node is not None and logs and "loss" in logs:
            node.note_loss(logs["loss"])

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if args.output_dir is None or self.session.node is None:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            with open(os.path.join(folder, CHECKPOINT_FILE), "w") as f:
                json.dump(self.session.checkpoint_state(), f)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.session.finish()
        self.session.close()
