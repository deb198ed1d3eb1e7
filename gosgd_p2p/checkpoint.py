"""Checkpoints of a training node: written atomically, verified on load, the last few kept.

File format: 32 bytes of SHA-256 over the rest, then a torch.save archive of a dict with
"step", "weight", "model" (state_dict), "optimizer" (state_dict) and "node_id". A file is
written to a temporary name, fsynced and renamed, so a crash leaves either the old or the new
checkpoint, never half of one. A file that fails its digest or does not load is reported and
the one before it is used.

What a restarted node takes from its checkpoint (see trainer.train): its step count and its
optimizer state always. Its weight and model only when it founds, i.e. when no peer is running
(the whole cluster restarts). When peers are running it rejoins through FetchState with weight
0, as any joiner: its checkpointed weight is a stale claim, because whatever it pushed after
the checkpoint is still held by the others, and taking it again would invent weight.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

__all__ = ["latest", "save"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d{10})\.pt$")
REQUIRED_KEYS = ("step", "weight", "model", "optimizer", "node_id")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(directory: str | Path, state: dict[str, Any], keep: int = 3) -> Path:
    """Write `state` (with REQUIRED_KEYS) as checkpoint `ckpt-<step>.pt`; keep the newest `keep`."""
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    body = buf.getvalue()
    final = directory / f"ckpt-{int(state['step']):010d}.pt"
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(hashlib.sha256(body).digest())
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(directory)
    for old in _checkpoints(directory)[keep:]:
        old.unlink(missing_ok=True)
    return final


def _checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in `directory`, newest (highest step) first."""
    found = [p for p in directory.iterdir() if _NAME.match(p.name)] if directory.is_dir() else []
    return sorted(found, key=lambda p: p.name, reverse=True)


def _read(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    if len(data) < 33 or hashlib.sha256(data[32:]).digest() != data[:32]:
        raise ValueError("digest mismatch (truncated or corrupt)")
    state = torch.load(io.BytesIO(data[32:]), weights_only=True)
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise ValueError("not a gosgd checkpoint")
    return state


def latest(directory: str | Path) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that verifies, and its path; None when there is none.

    Corrupt or truncated files are logged (one line each) and skipped.
    """
    for path in _checkpoints(Path(directory)):
        try:
            return _read(path), path
        except Exception as err:
            log.error("checkpoint %s is unusable (%s); trying the previous one", path, err)
    return None
