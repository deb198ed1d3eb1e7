"""`python -m bench.push_cost` runs every encoding's stages once and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gosgd_p2p.wire import ENCODINGS

ROOT = Path(__file__).resolve().parents[1]  # where `python -m bench.<name>` runs


@pytest.mark.timeout(120)
def test_every_encoding_is_timed_stage_by_stage(tmp_path: Path) -> None:
    out = tmp_path / "push_cost.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.push_cost", "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=110, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert set(report["results"]) == set(ENCODINGS)
    for entry in report["results"].values():
        assert set(entry["ms"]) == {"snapshot", "decode", "finite", "merge"}
        assert entry["ms_total"] == pytest.approx(sum(entry["ms"].values()))
    sizes = {name: entry["payload_bytes"] for name, entry in report["results"].items()}
    assert sizes["fp32"] == 4 * report["numel"]
    assert sizes["bf16"] == sizes["fp16"] == 2 * report["numel"]
    assert report["numel"] < sizes["int8"] < 1.01 * report["numel"]  # a byte, plus scales
    assert "int8" in result.stdout
