"""Per-host routing statistics, fed by each ended attempt (edge/routing/attempt.py), and the
in-flight counts that the workers of one edge share.

Only what the balancer reads lives here; Prometheus keeps its own histograms.

Theory of operation (Peak-EWMA, as linkerd2-proxy and Finagle score endpoints):
- Time to first byte (the first body byte, an SSE stream's first event) is averaged with weights
  that depend on the time between samples, not on their count, so a busy host and a quiet one
  forget at the same pace (`SAMPLE_DECAY_S`).
- A sample above the average replaces it at once (peak sensitivity): a host that starts to stall
  loses traffic on its first slow answer, and only earns it back gradually.
- A failed attempt is a sample of `FAILURE_PENALTY_S`: a host answering 5xx or 429 in 1 ms must not
  look like the fastest host in the fleet.
- When read, a score drifts back toward a neutral value as it ages (`score`), so a host that was
  penalised and then left alone is tried again once the others' scores beat what is left of its
  penalty.
- The same samples give each attempt its first-byte deadline (`first_byte_deadline`): a host
  that takes far longer than it usually does to start answering is cut short while another
  host could still take the request.
- A sample only exists once an answer started, so a host that stalls would look fine for as long
  as it stalls. The attempts still waiting for a first byte are therefore tracked too: the oldest
  one's wait is a lower bound of the host's current TTFB (`waited`), and the balancer scores a
  host by the larger of the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import math
import mmap
import os
import tempfile
from collections.abc import Callable, Iterable
from typing import Final, Protocol

log = logging.getLogger("edge.stats")

# A failed attempt counts as this much latency.
FAILURE_PENALTY_S = 5.0
# How fast new samples move an average: a sample taken this long after the previous one has
# weight 1 - 1/e.
SAMPLE_DECAY_S: Final = 10.0
# A decode rate needs this much streaming after the first byte and this many tokens; anything
# shorter is a non-streamed body arriving in one piece, not a measure of decode speed.
_MIN_DECODE_S = 0.05
_MIN_TOKENS: Final = 4
# Hedging needs this many recent samples before a host's p95 means anything.
_P95_WINDOW: Final = 32
_P95_MIN_SAMPLES = 5
# A host with no TTFB sample yet (new, or the edge just started) gets this many floors as its
# first-byte deadline: nothing says what is slow for it, and its first answers may pay for a cold
# start (a model loaded on demand, an empty prefix cache) that later ones will not, so it gets
# more than a measured host's minimum; still seconds (10 s by default), not the full
# first_byte_timeout_s, when another host is there to take over.
UNSAMPLED_FLOORS: Final = 2.0


class HostStats:
    """Time to first byte (Peak-EWMA), decode rate, recent failures and external load of a host."""

    __slots__ = (
        "ttfb_ewma", "updated", "samples", "failed_at", "rate_ewma", "rate_updated",
        "rate_samples", "_recent", "_p95", "remote_inflight", "engine_queue", "engine_running",
        "engine_kv", "engine_until", "_waiting", "_tokens",
    )  # fmt: skip

    def __init__(self) -> None:
        self.ttfb_ewma = 0.0
        self.updated = 0.0
        self.samples = 0
        # When the last attempt failed (any failure, blamed or not); -inf once one succeeded.
        # Health counts the failures in a row (Host.fails_in_row); this is only their recency.
        self.failed_at = -math.inf
        self.rate_ewma = 0.0  # completion tokens per second after the first byte
        self.rate_updated = 0.0
        self.rate_samples = 0
        self._recent: list[float] = []  # the last _P95_WINDOW good TTFBs, oldest first
        self._p95: float | None = None
        # Written by SharedLoad: in-flight attempts on this host in the other workers.
        self.remote_inflight = 0
        # Written by engines.Scraper: the server's own view of its queue, valid until engine_until.
        self.engine_queue = 0.0
        self.engine_running = 0.0
        self.engine_kv = 0.0
        self.engine_until = 0.0
        # Attempts sent and not answered yet: token -> when they were sent (see `waiting`).
        self._waiting: dict[int, float] = {}
        self._tokens = 0

    def waiting(self, now: float) -> int:
        """An attempt was sent to this host; returns the token `answered` takes."""
        self._tokens += 1
        self._waiting[self._tokens] = now
        return self._tokens

    def answered(self, token: int) -> None:
        """The attempt sent a first byte, failed or was cancelled."""
        self._waiting.pop(token, None)

    def waited(self, now: float) -> float:
        """How long the oldest attempt still waiting for a first byte has waited (0 if none)."""
        waiting = self._waiting
        if not waiting:
            return 0.0
        return now - next(iter(waiting.values()))  # insertion order: the first is the oldest

    def record(
        self,
        ttfb_s: float | None,
        failed: bool,
        now: float,
        completion_tokens: int | None = None,
        duration_s: float | None = None,
    ) -> None:
        """One ended attempt (edge/routing/attempt.py). `duration_s` (attempt start to last
        byte) with `completion_tokens` gives the decode rate: tokens over the time after the
        first byte."""
        if failed:
            self.failed_at = now
            self._sample(FAILURE_PENALTY_S, now)
            return
        if ttfb_s is None:
            return
        self.failed_at = -math.inf
        self._sample(ttfb_s, now)
        self._remember(ttfb_s)
        if completion_tokens is not None and duration_s is not None:
            self._rate(completion_tokens, duration_s - ttfb_s, now)

    def _sample(self, value: float, now: float) -> None:
        if self.samples == 0 or value > self.ttfb_ewma:
            self.ttfb_ewma = value  # peak: believe bad news at once
        else:
            keep = math.exp(-max(now - self.updated, 0.0) / SAMPLE_DECAY_S)
            self.ttfb_ewma = self.ttfb_ewma * keep + value * (1.0 - keep)
        self.samples += 1
        self.updated = now

    def _rate(self, tokens: int, decode_s: float, now: float) -> None:
        if tokens < _MIN_TOKENS or decode_s < _MIN_DECODE_S:
            return
        rate = tokens / decode_s
        if self.rate_samples == 0:
            self.rate_ewma = rate
        else:
            keep = math.exp(-max(now - self.rate_updated, 0.0) / SAMPLE_DECAY_S)
            self.rate_ewma = self.rate_ewma * keep + rate * (1.0 - keep)
        self.rate_samples += 1
        self.rate_updated = now

    def _remember(self, ttfb_s: float) -> None:
        recent = self._recent
        if len(recent) >= _P95_WINDOW:
            del recent[0]
        recent.append(ttfb_s)
        self._p95 = None

    def score(self, now: float, neutral: float, decay_s: float) -> float:
        """Peak-EWMA TTFB, drifting back toward `neutral` as it ages; `neutral` if unsampled."""
        if self.samples == 0:
            return neutral
        keep = math.exp(-max(now - self.updated, 0.0) / decay_s)
        return neutral + (self.ttfb_ewma - neutral) * keep

    def rate(self, now: float, neutral: float, decay_s: float) -> float:
        if self.rate_samples == 0:
            return neutral
        keep = math.exp(-max(now - self.rate_updated, 0.0) / decay_s)
        return neutral + (self.rate_ewma - neutral) * keep

    @property
    def recent(self) -> list[float]:
        """The last good TTFBs (answered attempts only), oldest first."""
        return self._recent

    def p95(self) -> float | None:
        """The 95th percentile of recent good TTFBs, capped at 4x their median, or None before
        there are enough. The cap keeps a host that stalls now and then from hiding its stalls
        in its own tail: hedging waits for what is unusual for the host, not for its worst."""
        if self._p95 is None and len(self._recent) >= _P95_MIN_SAMPLES:
            ordered = sorted(self._recent)
            p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
            self._p95 = min(p95, 4 * ordered[len(ordered) // 2])
        return self._p95

    def failing(self, now: float, window_s: float) -> bool:
        """The last attempt failed, within `window_s`: not a host to hold a session on."""
        return now - self.failed_at < window_s

    def queue(self, now: float) -> float:
        """Requests waiting in the engine's own queue, when a recent scrape said so."""
        return self.engine_queue if now < self.engine_until else 0.0

    def __repr__(self) -> str:
        return (
            f"<HostStats ttfb_ewma={self.ttfb_ewma:.4f} samples={self.samples} "
            f"rate={self.rate_ewma:.1f}/{self.rate_samples} "
            f"remote={self.remote_inflight} queue={self.engine_queue:g}>"
        )


def first_byte_deadline(stats: HostStats, factor: float, floor: float, ceiling: float) -> float:
    """How long an attempt on this host waits for its first byte before the request moves on
    (upstream.first_token_factor, first_token_floor_s, first_byte_timeout_s): `factor` x the
    host's recent p95 TTFB when it has enough samples, else x the slowest of its few good ones,
    kept between `floor` and `ceiling`; a host never sampled gets UNSAMPLED_FLOORS x `floor`
    (failures are no samples). Never above
    `ceiling`, even when a model's ceiling is below the floor."""
    # Good samples only: the EWMA holds failure penalties, and a host that just timed out
    # would get factor x FAILURE_PENALTY_S (20 s) for its next first token.
    p95 = stats.p95()
    if p95 is not None:
        deadline = factor * p95
    elif stats.recent:
        deadline = factor * max(stats.recent)
    else:
        deadline = UNSAMPLED_FLOORS * floor
    return min(max(deadline, floor), ceiling)


class _HostLike(Protocol):
    url: str
    inflight: int
    stats: HostStats


class SharedLoad:
    """In-flight counts per host shared by the workers of one edge, through a memory-mapped file.

    Each worker owns one row of int32 cells (one cell per hash slot of a server URL) and is its
    only writer, so no update is ever lost to a race; a reader sums the other rows. Every
    `publish` copies this worker's counts in and reads the others' back into
    `HostStats.remote_inflight`, so picking a host costs nothing extra: counts are as stale as the
    publish period (tens of ms), which is what "approximate" means here.

    Live counts ([admission] with several workers, wired by edge/app.py): capacity must not be
    judged on a 50 ms old copy, or every worker takes a server's last slot in the same window.
    Then each attempt's start and end writes this worker's cell at once (`add`: the row is still
    this worker's alone, so the periodic `publish` rewrites the same totals), and a capacity
    check sums the other rows' cells as they are now (`others`: a read per row). What is left is
    the time between one worker's read and its write (its decision and its attempt's start, the
    same synchronous run): two workers deciding within those microseconds may still both take
    the last slot. The policies keep reading `remote_inflight` (publish), which costs nothing.

    A worker claims its row by a POSIX record lock on the row's byte of the file, which the kernel
    drops when the process dies, even by SIGKILL; `reap` zeroes rows whose lock is free, so a dead
    worker's counts do not linger. Hazards: POSIX locks belong to the process and closing any
    descriptor of the file drops them all, so one process opens the file once; two URLs hashing
    to one slot share a cell (an over-estimate, never an under-estimate).
    """

    SLOTS = 4096

    def __init__(self, path: str, rows: int, row: int | None = None) -> None:
        self.path = path
        self.rows = rows
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            size = rows * self.SLOTS * 4
            if os.fstat(self._fd).st_size < size:
                os.ftruncate(self._fd, size)
            self.row = self._claim() if row is None else row
            self._map = mmap.mmap(self._fd, size)
        except BaseException:
            os.close(self._fd)
            raise
        self._cells = memoryview(self._map).cast("i")
        self._slots: dict[str, int] = {}
        self._written: set[int] = set()
        self.publishes = 0
        self._clear(self.row)

    @classmethod
    def for_workers(cls, port: int, workers: int) -> SharedLoad | None:
        """The file the workers of the edge supervised by our parent share; None if unusable."""
        path = table_path(os.getppid(), port)
        sweep(os.path.dirname(path))
        try:
            # Twice the workers: a restarted worker finds a free row while a reaper holds one.
            return cls(path, rows=2 * workers)
        except OSError as exc:
            log.warning("shared in-flight counts unavailable (%s); balancing on local counts", exc)
            return None

    def _claim(self) -> int:
        for row in range(self.rows):
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, row)
            except OSError:
                continue
            return row
        raise OSError("every row of the shared in-flight table is taken")

    def slot(self, url: str) -> int:
        slot = self._slots.get(url)
        if slot is None:
            digest = hashlib.blake2b(url.encode(), digest_size=4).digest()
            slot = self._slots[url] = int.from_bytes(digest, "big") % self.SLOTS
        return slot

    def add(self, url: str, delta: int) -> None:
        """An attempt on `url` started (+1) or ended (-1) in this worker: its cell, at once.
        Never below 0: a host that left the fleet had its cell zeroed by `publish`."""
        i = self.row * self.SLOTS + self.slot(url)
        cells = self._cells
        value = cells[i] + delta
        cells[i] = value if value > 0 else 0

    def others(self, url: str) -> int:
        """The other workers' in-flight attempts on `url`, as their cells say now."""
        slot, slots, mine = self.slot(url), self.SLOTS, self.row
        cells = self._cells
        total = 0
        for row in range(self.rows):
            if row != mine:
                total += cells[row * slots + slot]
        return total

    def publish(self, hosts: Iterable[_HostLike]) -> None:
        """Write this worker's counts; read the other workers' into each host's stats."""
        cells, mine = self._cells, self.row * self.SLOTS
        totals: dict[int, int] = {}
        unique = {id(h): h for h in hosts}.values()
        for host in unique:
            slot = self.slot(host.url)
            totals[slot] = totals.get(slot, 0) + host.inflight
        for slot in self._written - totals.keys():
            cells[mine + slot] = 0
        for slot, count in totals.items():
            cells[mine + slot] = count
        self._written = set(totals)
        for host in unique:
            slot = self.slot(host.url)
            total = sum(cells[r * self.SLOTS + slot] for r in range(self.rows))
            host.stats.remote_inflight = max(0, total - cells[mine + slot])
        self.publishes += 1
        if len(self._slots) > 4 * self.SLOTS:
            self._slots.clear()  # bounded: URLs that left the fleet are forgotten

    def reap(self) -> int:
        """Zero the rows of workers that died; returns how many rows were zeroed."""
        reaped = 0
        for row in range(self.rows):
            if row == self.row:
                continue
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, row)
            except OSError:
                continue  # a live worker holds it
            try:
                if any(self._cells[row * self.SLOTS : (row + 1) * self.SLOTS]):
                    self._clear(row)
                    reaped += 1
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, row)
        return reaped

    def _clear(self, row: int) -> None:
        start = row * self.SLOTS
        self._cells[start : start + self.SLOTS] = memoryview(bytes(self.SLOTS * 4)).cast("i")

    async def run(self, hosts: Callable[[], Iterable[_HostLike]], period_s: float = 0.05) -> None:
        while True:
            await asyncio.sleep(period_s)
            self.publish(hosts())
            if self.publishes % 20 == 0:
                self.reap()

    def close(self) -> None:
        """Zero this worker's row, unmap, and remove the file if no other worker holds a row."""
        self._clear(self.row)
        last = self._alone()
        self._cells.release()
        self._map.close()
        os.close(self._fd)  # drops this process's locks
        if last:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def _alone(self) -> bool:
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, self.rows, 0)
        except OSError:
            return False
        return True

    def __repr__(self) -> str:
        return f"<SharedLoad row={self.row}/{self.rows} hosts={len(self._slots)}>"


def table_path(supervisor_pid: int, port: int) -> str:
    """The shared in-flight table of the workers one supervisor runs on one port."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(base, f"edge-load-{supervisor_pid}-{port}")


def sweep(base: str) -> int:
    """Remove the tables of edges whose supervisor is gone (killed before it could clean up);
    returns how many. A reused pid only means a file stays until the next sweep."""
    removed = 0
    for name in os.listdir(base):
        parts = name.split("-")
        if len(parts) != 4 or parts[:2] != ["edge", "load"] or not parts[2].isdigit():
            continue
        try:
            os.kill(int(parts[2]), 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(base, name))
                removed += 1
        except PermissionError:
            pass  # alive, another user's
    return removed
