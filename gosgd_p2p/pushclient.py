"""How a node's pushes leave: the client they go through and the send buffers they are taken
from, in the node's own threads, a send process (send_process) or a network process
(network_process). The node builds them once and hands them to its parts.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from gosgd_p2p.client import PeerClient
from gosgd_p2p.codec import buffer_numel
from gosgd_p2p.config import NodeConfig
from gosgd_p2p.netproc import NetworkProcess
from gosgd_p2p.security import Credentials
from gosgd_p2p.sendproc import SendProcessClient
from gosgd_p2p.state import BufferPool, StateLayout
from gosgd_p2p.wire import ENCODINGS, receive_numel

__all__ = ["make_client", "network_process_wanted", "network_spec"]

log = logging.getLogger(__name__)


def make_client(
    cfg: NodeConfig,
    credentials: Credentials,
    layout: StateLayout,
    client: PeerClient | None,
    *,
    pin: bool,
    by_default: bool = False,
) -> tuple[PeerClient, BufferPool]:
    """The client a node's pushes go through and the send buffers they are taken from.

    With cfg.send_process the buffers are shared with the child process that makes the
    pushes (page-locked when `pin`, for CUDA); `client` (fault injection) is then refused.
    Each buffer holds a snapshot in float32 or in cfg.encoding, whichever is larger.
    `by_default`: cfg.network_process was chosen by default, so a network process that
    cannot start leaves the node in its own threads (with a warning) instead of failing.
    """
    numel = buffer_numel(ENCODINGS[cfg.encoding], layout.numel)
    if not (cfg.send_process or cfg.network_process):
        pool = BufferPool(numel, cfg.send_buffers, pin=pin)
        return client or PeerClient(credentials), pool
    if client is not None:
        mode = "network_process" if cfg.network_process else "send_process"
        raise ValueError(f"{mode} makes its own client: do not pass client=")
    child: SendProcessClient
    if cfg.network_process:
        try:
            child = NetworkProcess(
                credentials, 4 * numel, cfg.send_buffers,
                slot_numel=receive_numel(layout.numel), slots=cfg.inbox_size,
                server=network_spec(cfg, layout), tune_malloc=cfg.tune_malloc,
            )  # fmt: skip
        except (OSError, RuntimeError) as err:
            if not by_default:
                raise
            log.warning("no network process (%s): serving and pushing from this process", err)
            return PeerClient(credentials), BufferPool(numel, cfg.send_buffers, pin=pin)
        if pin:
            child.pin_buffers(child.slots, "receive")
    else:
        child = SendProcessClient(
            credentials, 4 * numel, cfg.send_buffers, tune_malloc=cfg.tune_malloc
        )
    if pin:
        child.pin_buffers()
    return child, BufferPool(numel, cfg.send_buffers, buffers=child.buffers)


def network_process_wanted(cfg: NodeConfig, client: PeerClient | None, cuda: bool) -> bool:
    """Whether a node runs a network process: cfg.network_process when set; by default
    (None) on Linux for a model on the CPU, unless the caller gives the client or asks for a
    send process. A model on a GPU keeps its threads until the mode is measured there."""
    if cfg.network_process is not None:
        return cfg.network_process
    return hasattr(os, "memfd_create") and not cuda and client is None and not cfg.send_process


def network_spec(cfg: NodeConfig, layout: StateLayout) -> dict[str, Any]:
    """What a network process needs to serve for this node (JSON)."""
    return {
        "listen": cfg.listen,
        "workers": cfg.server_workers,
        "receive_timeout_s": cfg.receive_timeout_s,
        "insecure": cfg.insecure,
        "chunk_bytes": cfg.chunk_bytes,
        "inbox_size": cfg.inbox_size,
        "cluster": cfg.cluster,
        "fingerprint": layout.fingerprint.hex(),
        "numel": layout.numel,
        "max_weight": cfg.max_weight,
    }
