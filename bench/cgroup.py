"""CPU caps for benchmark and test processes: cgroup v1 `cpu` groups with a CFS quota.

    with CpuCaps() as caps:
        caps.cap(pid, 0.5)     # this process (all its threads, and children it starts
                               # later) gets at most half a core

Each capped process gets a group of its own under /sys/fs/cgroup/cpu, named after this process
and a counter; closing moves whatever is still in them back to the root group and removes them,
also after a failure. Needs root and the cgroup v1 cpu controller; `unavailable()` says why not.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import TracebackType

CPU_ROOT = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000  # CFS period; a cap of c cores is a quota of c * PERIOD_US per period


def unavailable() -> str | None:
    """None when processes can be capped here, else one line saying why not."""
    if not (CPU_ROOT / "cpu.cfs_quota_us").exists():
        return f"no cgroup v1 cpu controller at {CPU_ROOT}"
    if not os.access(CPU_ROOT, os.W_OK):
        return f"{CPU_ROOT} is not writable (needs root)"
    return None


class CpuCaps:
    """The cpu groups this object made; close() (or leaving `with`) removes every one."""

    def __init__(self) -> None:
        self._groups: list[Path] = []

    def cap(self, pid: int, cores: float) -> Path:
        """Limit process `pid` to `cores` CPUs (a fraction is fine: 1/3 of a core is a quota of
        a third of each period) from now on; returns its group."""
        if not cores > 0:
            raise ValueError(f"a cap must be > 0 cores, got {cores}")
        group = CPU_ROOT / f"gosgd-bench-{os.getpid()}-{len(self._groups)}"
        group.mkdir()
        self._groups.append(group)
        (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text(str(max(1000, round(cores * PERIOD_US))))
        (group / "cgroup.procs").write_text(str(pid))
        return group

    def close(self) -> None:
        """Move the processes still in our groups back to the root group; remove the groups."""
        while self._groups:
            group = self._groups.pop()
            with contextlib.suppress(OSError):
                for pid in (group / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):  # it exited meanwhile
                        (CPU_ROOT / "cgroup.procs").write_text(pid)
            with contextlib.suppress(OSError):
                group.rmdir()

    def __enter__(self) -> CpuCaps:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
