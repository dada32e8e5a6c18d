"""F5 on a machine with too few cores: each edge worker held to a fraction of its own core by a
CPU quota (a cgroup per worker), so that two workers, wrk and the upstream all fit on 2 cores
and what is measured is the edge's scaling, not the machine's shortage of cores.

`--workers 1` gets one such share, `--workers 2` two, each worker pinned to a core of its own:
with nothing shared between workers, two shares answer twice the requests of one. The quota
makes every worker's CPU the same fixed budget, so the ratio no longer depends on how much of a
core the load left over. cgroup v1's `cpu` controller or v2's `cpu.max`; root is needed.
"""

from __future__ import annotations

import os
from pathlib import Path

PERIOD_US = 10_000  # short periods: a throttled worker waits at most the rest of 10 ms
_V1 = Path("/sys/fs/cgroup/cpu")
_V2 = Path("/sys/fs/cgroup")


def _root() -> tuple[Path, int] | None:
    """(where new groups go, cgroup version) or None."""
    if (_V1 / "cpu.cfs_quota_us").exists():
        return _V1, 1
    controllers = _V2 / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        return _V2, 2
    return None


def unavailable() -> str | None:
    """Why quotas cannot be set here, or None when they can."""
    found = _root()
    if found is None:
        return "no cgroup cpu controller is mounted"
    if not os.access(found[0], os.W_OK):
        return f"{found[0]} is not writable (the benchmark needs root for CPU quotas)"
    return None


def workers(supervisor: int) -> list[int]:
    """The worker processes of an `edge serve --workers N` (multiprocessing's spawned
    children, not its resource tracker), in the order they were started."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return [
        int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


class Quota:
    """Per-worker cgroups with a CPU quota; `close` removes them (their processes gone)."""

    def __init__(self, name: str) -> None:
        found = _root()
        if found is None:
            raise RuntimeError("no cgroup cpu controller is mounted")
        self.root, self.version = found
        self.name = name
        self.groups: list[Path] = []

    def hold(self, pid: int, share: float, core: int) -> None:
        """Every thread of `pid` on `core`, in a new group allowed `share` of a CPU."""
        group = self.root / f"edge-bench-{self.name}-{len(self.groups)}"
        group.mkdir(exist_ok=True)
        self.groups.append(group)
        quota, tasks = int(PERIOD_US * share), group / "tasks"
        if self.version == 1:
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
            (group / "cgroup.procs").write_text(str(pid))
        for task in Path(f"/proc/{pid}/task").iterdir():
            tid = int(task.name)
            if self.version == 1:
                tasks.write_text(str(tid))  # v1 groups threads one by one
            os.sched_setaffinity(tid, {core})

    def throttled(self) -> int:
        """Periods in which some worker ran out of its quota (0 means the quota never bound)."""
        total = 0
        for group in self.groups:
            for line in (group / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "nr_throttled":
                    total += int(value)
        return total

    def close(self) -> None:
        for group in self.groups:
            try:
                group.rmdir()
            except OSError:
                pass  # still holds a process; the next run's mkdir reuses it
        self.groups.clear()
