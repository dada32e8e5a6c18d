"""CPU time and memory of a process and all its descendants, read from /proc; and starting an
edge process pinned to cores for the cost benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.procs import wait_http

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; fields after it are plain.
    return raw[raw.rindex(")") + 2 :].split()


def tree(root: int) -> list[int]:
    """`root` and every live descendant."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(root: int) -> float:
    """utime + stime of the tree (all threads), in seconds."""
    total = 0
    for pid in tree(root):
        if (fields := _stat(pid)) is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime (stat fields 14, 15)
    return total / TICKS


def rss_bytes(root: int) -> int:
    """Resident memory of the tree (a page shared by two processes counts twice)."""
    total = 0
    for pid in tree(root):
        if (fields := _stat(pid)) is not None:
            total += int(fields[21]) * PAGE  # rss in pages (stat field 24)
    return total


def core_busy_seconds(core: int) -> float:
    """Time core `core` ran processes (user, nice, system) or lost to the hypervisor (steal),
    in seconds, from /proc/stat. Interrupts are left out: loopback traffic of the proxy itself
    is handled there, and it would be counted as someone else's work."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            user, nice, system, _idle, _iowait, _irq, _softirq, steal = map(int, line.split()[1:9])
            return (user + nice + system + steal) / TICKS
    raise ValueError(f"no cpu{core} in /proc/stat")


def cpu_ns(pid: int) -> int:
    """On-CPU time of every thread of `pid`, in nanoseconds (/proc schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError):
            continue  # a thread that ended between the listing and the read
    return total


def split_cores() -> tuple[set[int], set[int]]:
    """(cores for the edges, cores for the load) of this machine: the first core alone for the
    edges, the rest for the load, which this process is moved to. With one core, ({}, {})."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return set(), set()
    edge_cores, load_cores = {cpus[0]}, set(cpus[1:])
    os.sched_setaffinity(0, load_cores)
    return edge_cores, load_cores


def start_edge(args: list[str], url: str, cores: set[int]) -> subprocess.Popen[bytes]:
    """`python -m edge ARGS` pinned to `cores`, once `url` answers."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    if cores:
        os.sched_setaffinity(proc.pid, cores)
    try:
        wait_http(url, 20, proc)
    except (RuntimeError, TimeoutError):
        proc.kill()
        raise
    return proc
