"""The package stays lint-, format- and type-clean (STYLE.md habit 10).

ruff and mypy come with the dev extra (scripts/bootstrap.sh installs it).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.timeout(240)


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=220)


def test_ruff_lint_and_format() -> None:
    lint = run(str(BIN / "ruff"), "check", "gosgd_p2p", "tests", "bench")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = run(str(BIN / "ruff"), "format", "--check", "gosgd_p2p", "tests", "bench")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


@pytest.mark.slow  # a cold mypy run takes most of the fast tier's budget
def test_mypy_on_the_package() -> None:
    result = run(sys.executable, "-m", "mypy", "gosgd_p2p")
    assert result.returncode == 0, result.stdout + result.stderr
