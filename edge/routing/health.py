"""Host health: active probes and passive outlier detection, as one table-driven state machine,
and the retry budget that keeps failover from becoming a retry storm.

Theory of operation
-------------------
Every host is in one state (named in fleet.py): UP takes requests; EJECTED is out until
`host.until`, then takes exactly one half-open trial; HALF_OPEN has that trial in flight and
takes nothing else; DOWN is out until active probes succeed again; REMOVED (set by discovery
when no source names the host) is out for good, though streams already on it finish.

Evidence arrives as events and moves a host through `TABLE`; a (state, event) pair absent from
the table changes nothing (the counters still move):
- From real attempts (edge/routing/attempt.py reads each one's end), passive: OK (the attempt
  opened, or got an answer the client keeps: 2xx, 4xx), FAIL (connect error, timeout before the
  first byte, 502/503/504, malformed response), RELEASE (the attempt ended without a verdict on
  the host: cancelled, 429, 500). FAILs in a row reaching `outlier.consecutive_failures` are an
  EJECT. An attempt that starts on a host that is not UP (its ejection is over, a pin, or the
  fallback when no host of a model is routable) is a TRIAL.
- From probes, active: PROBES_DOWN once `unhealthy_threshold` probes in a row failed,
  PROBES_UP once `healthy_threshold` in a row succeeded. One failed probe never ejects.

A Retry-After (a 429 or 503 that says when to come back) is no event here: the host is busy,
not broken. It is held (`Host.held_until`, edge/routing/plan.py): `candidates` and `fallback`
skip it until then, its state and failure count stay as they are.

An ejection lasts base x 2^level, capped at max; `level` counts ejections and is forgotten once
the host has served well for max_ejection_s. A passive ejection outlives good probes (a host
can answer /health and still fail requests): only its half-open trial brings it back.

Hazards: transitions are synchronous, on the worker's loop, between two awaits, so a half-open
host is claimed by exactly one attempt. Every TRIAL must end in OK, FAIL or RELEASE, or the host
stays HALF_OPEN, out of rotation, for good: every attempt ends once (edge/routing/attempt.py),
and the proxy ends it on every path, cancellation included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from edge.config import HealthSettings, OutlierSettings
from edge.routing.fleet import (
    DOWN,
    EJECTED,
    HALF_OPEN,
    LOADABLE,
    LOADED,
    PROBE_FAILED,
    REMOVED,
    UP,
    FleetView,
    Host,
)

log = logging.getLogger("edge.health")

OK, FAIL, EJECT, TRIAL, RELEASE = "ok", "fail", "eject", "trial", "release"
PROBES_UP, PROBES_DOWN = "probes_up", "probes_down"

TABLE: dict[tuple[str, str], str] = {
    (UP, EJECT): EJECTED,
    (UP, PROBES_DOWN): DOWN,
    (EJECTED, TRIAL): HALF_OPEN,
    (EJECTED, OK): UP,
    (EJECTED, PROBES_DOWN): DOWN,
    (HALF_OPEN, OK): UP,
    (HALF_OPEN, FAIL): EJECTED,
    (HALF_OPEN, RELEASE): EJECTED,  # `until` is past: the next request may trial it again
    (HALF_OPEN, PROBES_DOWN): DOWN,
    (DOWN, TRIAL): HALF_OPEN,
    (DOWN, OK): UP,
    (DOWN, PROBES_UP): UP,
}
_OUT = frozenset({EJECTED, DOWN})  # states the fallback may trial early


class Health:
    """The state machine of every host of one worker (the hosts carry the state)."""

    def __init__(
        self,
        settings: HealthSettings,
        outlier: OutlierSettings,
        on_eject: Callable[[Host], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.outlier = outlier
        self.on_eject = on_eject  # metrics: edge_ejections_total
        self.clock = clock
        self.transitions = 0
        self.ejections = 0
        self.trials = 0
        self.restores = 0

    def reconfigure(self, settings: HealthSettings, outlier: OutlierSettings) -> None:
        self.settings, self.outlier = settings, outlier

    # --- passive: real attempts -----------------------------------------------------------

    def started(self, host: Host) -> None:
        if host.state != UP:
            self._fire(host, TRIAL)

    def succeeded(self, host: Host) -> None:
        host.fails_in_row = 0
        if host.state == UP:
            if host.level and self.clock() >= host.restored_at + self.outlier.max_ejection_s:
                host.level = 0  # served well for a while: the next ejection starts short again
            return
        self._fire(host, OK)

    def failed(self, host: Host) -> None:
        host.fails_in_row += 1
        self._fire(host, FAIL)
        if host.fails_in_row >= self.outlier.consecutive_failures:
            self._fire(host, EJECT)

    def released(self, host: Host) -> None:
        if host.state == HALF_OPEN:
            self._fire(host, RELEASE)

    # --- active: probes -------------------------------------------------------------------

    def probed(self, host: Host, ok: bool, ranks: dict[str, int] | None = None) -> None:
        """One probe round's result; `ranks` per model when the path names the model."""
        if ranks is not None:
            host.ranks = None if all(r == LOADED for r in ranks.values()) else ranks
        if ok:
            host.probe_ok, host.probe_fail = host.probe_ok + 1, 0
            if host.probe_ok >= self.settings.healthy_threshold:
                self._fire(host, PROBES_UP)
        else:
            host.probe_ok, host.probe_fail = 0, host.probe_fail + 1
            if host.probe_fail >= self.settings.unhealthy_threshold:
                self._fire(host, PROBES_DOWN)

    # --- the machine ----------------------------------------------------------------------

    def _fire(self, host: Host, event: str) -> None:
        old = host.state
        new = TABLE.get((old, event))
        if new is None:
            return
        host.state = new
        self.transitions += 1
        now = self.clock()
        if old == UP:  # leaving rotation; a failed trial only extends an absence already counted
            self.ejections += 1
            if self.on_eject is not None:
                self.on_eject(host)
        if new == EJECTED and event != RELEASE:
            self._eject(host, now, event)
        elif new == HALF_OPEN:
            self.trials += 1
        elif new == UP:
            host.fails_in_row = 0
            host.restored_at = now
            self.restores += 1
            log.info("health: %s is back (%s after %s)", host.url, event, old)
        elif new == DOWN:
            log.warning("health: %s is down (%d probes failed)", host.url, host.probe_fail)

    def _eject(self, host: Host, now: float, event: str) -> None:
        o = self.outlier
        duration = min(o.base_ejection_s * 2**host.level, o.max_ejection_s)
        host.until = now + duration
        host.level = min(host.level + 1, 32)
        host.fails_in_row = 0
        log.warning("health: %s ejected for %.1f s (%s)", host.url, duration, event)

    def __repr__(self) -> str:
        return (
            f"<Health transitions={self.transitions} ejections={self.ejections} "
            f"trials={self.trials} restores={self.restores}>"
        )


# --- what routing may pick ---------------------------------------------------------------


def candidates(model: str, hosts: Sequence[Host], tried: Collection[Host]) -> Sequence[Host]:
    """The hosts the balancer may pick for the next attempt: routable, not held (Retry-After),
    not tried yet, and of the best probe rank present (loaded before loadable-on-demand before
    a failed model probe). An expired hold is put back to 0.0 here, so that the common case
    comes back to its one compare per host."""
    if not tried and all(h.state == UP and h.ranks is None and not h.held_until for h in hosts):
        return hosts  # the common case: no list is built
    now = time.monotonic()
    best = PROBE_FAILED + 1
    pool: list[Host] = []
    for host in hosts:
        if host.held_until:
            if host.held_until > now:
                continue
            host.held_until = 0.0
        if host in tried or not host.routable_at(now):
            continue
        rank = host.rank(model)
        if rank < best:
            best, pool = rank, [host]
        elif rank == best:
            pool.append(host)
    return pool


def fallback(
    hosts: Sequence[Host], tried: Collection[Host], now: float | None = None
) -> Host | None:
    """When no host of a model is routable: the one whose ejection ends first, as an early
    half-open trial, so that a model whose every host is out gets tried rather than refused.
    Never a held host: it said when it takes requests again (Plan.wait waits for that)."""
    now = time.monotonic() if now is None else now
    spare = [h for h in hosts if h.state in _OUT and h.held_until <= now and h not in tried]
    return min(spare, key=lambda h: h.until, default=None)


def why(host: Host, now: float | None = None) -> str:
    """Why a host was not tried, for the 503 that lists every server."""
    now = time.monotonic() if now is None else now
    state = host.state
    if state == EJECTED:
        left = host.until - now
        return f"ejected for {left:.1f} s more" if left > 0 else "ejected, trial due"
    if state == HALF_OPEN:
        return "ejected, its trial request is in flight"
    if state == DOWN:
        return f"down ({host.probe_fail} health probes failed in a row)"
    if state == REMOVED:
        return "removed from discovery"
    if host.held_until > now:
        return f"busy, held for {host.held_until - now:.1f} s more (Retry-After)"
    return "not tried"


def describe(host: Host, now: float | None = None) -> dict[str, Any]:
    """A host's health for /ready."""
    now = time.monotonic() if now is None else now
    out: dict[str, Any] = {"state": host.state, "routable": host.routable_at(now)}
    if host.state in (EJECTED, HALF_OPEN):
        out["ejected_for_s"] = round(max(host.until - now, 0.0), 3)
    if host.held_until > now:  # busy (Retry-After), still routable: not a health state
        out["held_for_s"] = round(host.held_until - now, 3)
    if host.fails_in_row:
        out["failures_in_row"] = host.fails_in_row
    if host.ranks is not None:
        out["models"] = {m: _RANK_NAMES[r] for m, r in host.ranks.items()}
    return out


_RANK_NAMES = {LOADED: "loaded", LOADABLE: "loadable", PROBE_FAILED: "probe_failed"}


# --- active probes -----------------------------------------------------------------------


def probe_rank(status: int | None) -> int:
    """/health/{model}: 200 loaded, 202 loadable on demand; anything else failed."""
    if status == 202:
        return LOADABLE
    if status is not None and 200 <= status < 300:
        return LOADED
    return PROBE_FAILED


class Prober:
    """Probes every host of the fleet each `interval_s` (jittered), over the pooled session."""

    def __init__(
        self,
        settings: HealthSettings,
        health: Health,
        view: FleetView,
        session: aiohttp.ClientSession,
        guard: AbstractContextManager[object] | None = None,
    ) -> None:
        self.settings = settings
        self.health = health
        self.view = view
        self.session = session
        # Held while a result moves a host's state: the direct-host library routes in its
        # callers' threads while probes run on its own loop (edge/direct/router.py); the
        # server's one loop needs none.
        self.guard = guard or contextlib.nullcontext()
        self.rounds = 0
        self.probes = 0
        self.failed = 0

    def reconfigure(self, settings: HealthSettings) -> None:
        self.settings = settings

    async def run(self) -> None:
        """Probe rounds, the first one interval_s after start: until then every host is up and
        passive detection covers the gap (a start is not delayed by probes of a large fleet)."""
        while True:
            await asyncio.sleep(self.settings.interval_s * random.uniform(0.9, 1.1))
            if self.settings.enabled:
                await self.probe_all()

    async def probe_all(self) -> None:
        """Probe each host once (each of its models when the path names one), concurrently."""
        targets: dict[Host, list[str]] = {}
        for model, hosts in self.view.fleet.models.items():
            for host in hosts:
                targets.setdefault(host, []).append(model)
        await asyncio.gather(*(self._probe(h, models) for h, models in targets.items()))
        self.rounds += 1

    async def _probe(self, host: Host, models: list[str]) -> None:
        path = self.settings.path
        if "{model}" not in path:
            ok = probe_rank(await self._get(host.url + path)) != PROBE_FAILED
            with self.guard:
                self.health.probed(host, ok)
            return
        urls = [host.url + path.replace("{model}", quote(m, safe="/")) for m in models]
        statuses = await asyncio.gather(*(self._get(url) for url in urls))
        ranks = {m: probe_rank(s) for m, s in zip(models, statuses, strict=True)}
        with self.guard:
            self.health.probed(host, any(r != PROBE_FAILED for r in ranks.values()), ranks)

    async def _get(self, url: str) -> int | None:
        """The probe's status, or None when it got no answer in time."""
        self.probes += 1
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_s)
        try:
            async with self.session.get(
                URL(url, encoded=True), timeout=timeout, allow_redirects=False
            ) as resp:
                await resp.read()  # read to the end, so the connection goes back to the pool
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            status = None
        if probe_rank(status) == PROBE_FAILED:
            self.failed += 1
        return status

    def __repr__(self) -> str:
        return f"<Prober rounds={self.rounds} probes={self.probes} failed={self.failed}>"


# --- the retry budget --------------------------------------------------------------------


class RetryBudget:
    """Retries allowed: `ratio` x requests over the last `window_s`, plus `min_per_s` x
    `window_s` (so a quiet edge can still fail over). Counted in ten slots of window_s / 10
    that expire as time passes: no timer, no task, O(1) per request."""

    __slots__ = (
        "ratio", "floor", "clock", "_slot_s", "_index", "_req", "_ret", "_sum_req", "_sum_ret",
        "requests", "retries", "denied",
    )  # fmt: skip
    _SLOTS = 10

    def __init__(
        self,
        ratio: float,
        window_s: float,
        min_per_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self._req = [0] * self._SLOTS
        self._ret = [0] * self._SLOTS
        self._sum_req = self._sum_ret = 0
        self.requests = self.retries = self.denied = 0
        self.configure(ratio, window_s, min_per_s)

    def configure(self, ratio: float, window_s: float, min_per_s: float) -> None:
        self.ratio, self.floor = ratio, min_per_s * window_s
        self._slot_s = window_s / self._SLOTS
        self._index = int(self.clock() / self._slot_s)

    def deposit(self) -> None:
        """One request arrived."""
        slot = self._advance()
        self._req[slot] += 1
        self._sum_req += 1
        self.requests += 1

    def peek(self) -> bool:
        """Would `withdraw` allow a retry now? Counts nothing (Plan.others_left asks)."""
        self._advance()
        return self._sum_ret < self.ratio * self._sum_req + self.floor

    def withdraw(self) -> bool:
        """May one more retry go out now? Counts it when it may."""
        slot = self._advance()
        if self._sum_ret >= self.ratio * self._sum_req + self.floor:
            self.denied += 1
            return False
        self._ret[slot] += 1
        self._sum_ret += 1
        self.retries += 1
        return True

    def _advance(self) -> int:
        index = int(self.clock() / self._slot_s)
        if index <= self._index:  # the same slot as the last request: the usual case
            return self._index % self._SLOTS
        for i in range(self._index + 1, min(index, self._index + self._SLOTS) + 1):
            slot = i % self._SLOTS  # a slot that fell out of the window
            self._sum_req -= self._req[slot]
            self._sum_ret -= self._ret[slot]
            self._req[slot] = self._ret[slot] = 0
        self._index = max(index, self._index)
        return self._index % self._SLOTS

    def __repr__(self) -> str:
        return (
            f"<RetryBudget requests={self.requests} retries={self.retries} "
            f"denied={self.denied} window_requests={self._sum_req} window_retries={self._sum_ret}>"
        )
