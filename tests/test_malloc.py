"""gosgd_p2p.malloc: received chunks stop costing page faults once a process is tuned."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning is glibc-only"),
]

# What gRPC does with each received 1 MiB chunk: allocate a bytes object, fill it, free it.
PROBE = """
import resource, sys
from gosgd_p2p.malloc import tune_malloc
tuned = [tune_malloc(), tune_malloc()] if sys.argv[1] == "tune" else []
for _ in range(5):
    bytes(bytearray(1 << 20))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    chunk = bytes(bytearray(1 << 20))
    del chunk
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=50,
    ).stdout.split()
    return " ".join(out[:-1]), int(out[-1])


def test_tuned_process_reuses_chunk_memory() -> None:
    _, untuned_faults = _probe("plain")
    applied, tuned_faults = _probe("tune")
    assert applied == "[True, True]"  # applied once, idempotent
    # 200 MiB of chunks: untuned, glibc maps and zeroes them afresh (~256 faults per chunk)
    assert untuned_faults > 200 * 100
    assert tuned_faults < 200


def test_users_environment_choice_wins() -> None:
    applied, faults = _probe("tune", MALLOC_TRIM_THRESHOLD_="4096")
    assert applied == "[False, False]"
    assert faults > 200 * 100  # the user's (tiny) trim threshold is still in force
