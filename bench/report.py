"""What every benchmark writes: its results as JSON, with the date and the machine, and the
cells of its printed tables."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any


def write_json(path: str, benchmark: str, **results: Any) -> None:
    """Write `results` to `path` (creating its folder) under the benchmark's name, date and
    machine, and say so on stdout."""
    record = {
        "benchmark": benchmark,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        **results,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


def fmt(value: Any, spec: str, suffix: str = "") -> str:
    """A table cell: `value` formatted by `spec` (then `suffix`), or "-" when it is None."""
    return "-" if value is None else format(value, spec) + suffix
