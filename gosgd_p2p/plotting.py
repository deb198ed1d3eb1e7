"""gosgd-plot: one PNG of loss, test accuracy and weight over time, from --log-json files.

gosgd-plot runs/demo-*/node-*.jsonl --out progress.png
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_nodes", "read_log", "main"]

PANELS = (("loss", "training loss"), ("test_accuracy", "test accuracy"), ("weight", "weight a"))


def read_log(path: Path) -> list[dict[str, Any]]:
    """The JSON records of one --log-json file (a line being written is skipped)."""
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def plot_nodes(
    logs: dict[str, list[dict[str, Any]]],
    out: Path,
    panels: Sequence[tuple[str, str]] = PANELS,
    title: str = "gosgd-p2p",
) -> Path:
    """Draw one line per node in each panel against time since training started; write `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        for node, records in logs.items():
            points = [(r["time"], r[key]) for r in records if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), label=node, marker=".", markersize=3)
        ax.set_xlabel("time since start of training (s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gosgd-plot", description="Plot loss, test accuracy and weight from --log-json files."
    )
    parser.add_argument("logs", nargs="+", type=Path, help="JSON-lines files of gosgd-node")
    parser.add_argument("--out", type=Path, default=Path("gosgd-plot.png"))
    args = parser.parse_args(argv)
    logs: dict[str, list[dict[str, Any]]] = {}
    for path in args.logs:
        if not path.is_file():
            print(f"gosgd-plot: error: no such file {path}", file=sys.stderr)
            return 2
        records = read_log(path)
        if records:
            logs[str(records[0].get("node_id", path.stem))] = records
    if not logs:
        print("gosgd-plot: error: the files hold no records", file=sys.stderr)
        return 2
    plot_nodes(logs, args.out)
    print(f"wrote {args.out} ({len(logs)} nodes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
