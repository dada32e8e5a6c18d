"""One attempt on one host, from its start to its outcome, reported once.

Theory of operation
-------------------
An attempt starts when a host was picked for it (`Attempts.start`): the host's in-flight count
rises, health hears of a trial when the host was out of rotation, and the wait for a first byte
is tracked (the balancer reads that wait while it lasts, so a host that stalls is avoided while
it stalls). From there, exactly one of:

- `answered`, then `finish`: the first body byte came (the host's verdict: health's OK, the
  failure streak ends, so a half-open host is back in rotation without waiting for the end of a
  long stream), and later the body ended, whole ("ok") or broken mid-stream ("stream_error");
- `fail`: the attempt failed before its first byte, with or without blame on the host;
- `cancel`: it was abandoned with no verdict (the client left, a hedge lost the race).

Each end happens once. `Attempts` then reads the attempt into the host's routing state: health's
state machine and its one failure count (`Host.fails_in_row`), the statistics (a latency sample,
or the failure penalty; the decode rate) and whoever listens (metrics: one sample per ended
attempt, by outcome). Nothing else on the request path writes to a Host, so the four places that
used to count failures are one, and what a dashboard shows is what routing saw.

Hazards: an attempt that is never ended leaks an in-flight count and, on a host out of rotation,
holds its half-open trial for good. The proxy ends every attempt on every path (`Forwarder.done`
cancels whatever the relay did not finish); `cancel` after another end is a no-op for that reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from edge.routing.fleet import Host
from edge.routing.health import Health
from edge.routing.stats import SharedLoad

# Outcomes of an ended attempt, the label of edge_upstream_attempts_total.
OK: Final = "ok"  # the body ended whole (any status the client keeps: 2xx, 4xx)
CONNECT_ERROR: Final = "connect_error"  # refused, reset, DNS, TLS: nothing came back
TIMEOUT: Final = "timeout"  # connect or first byte too slow
HTTP_5XX: Final = "http_5xx"  # a 5xx before any body byte
HTTP_429: Final = "http_429"  # the host is busy
MALFORMED: Final = "malformed"  # not HTTP/1.1 the client could be given
POOL_FULL: Final = "pool_full"  # no connection to the host free in time: nothing was sent
STREAM_ERROR: Final = "stream_error"  # the body broke after its first byte
CANCELLED: Final = "cancelled"  # abandoned without a verdict; not reported to listeners


class Attempt:
    """One attempt's progress and, once ended, its outcome (read by `Attempts`)."""

    __slots__ = (
        "host", "model", "started", "ttfb_s", "outcome", "blame", "completion_tokens",
        "ended_at", "_token", "_attempts",
    )  # fmt: skip

    def __init__(self, attempts: Attempts, host: Host, model: str, started: float) -> None:
        self._attempts = attempts
        self.host = host
        self.model = model
        self.started = started
        self.ttfb_s: float | None = None  # set by `answered`
        self.outcome = ""  # set once, by the end
        self.blame = False  # a failure that counts against the host's health
        self.completion_tokens: int | None = None  # from the answer's usage, for the decode rate
        self.ended_at = 0.0
        self._token = host.stats.waiting(started)

    def answered(self, now: float) -> None:
        """The first body byte arrived: the host answered this attempt."""
        self.ttfb_s = now - self.started
        self.host.stats.answered(self._token)
        self._attempts.health.succeeded(self.host)

    def finish(self, outcome: str, now: float, completion_tokens: int | None = None) -> None:
        """The body ended, after `answered`: OK, or STREAM_ERROR when it broke."""
        if not self.outcome:
            self.completion_tokens = completion_tokens
            self._end(outcome, now)

    def fail(self, outcome: str, now: float, blame: bool) -> None:
        """No first byte: the attempt failed. `blame`: it says the host is broken (502/503/504,
        connect error, timeout, malformed), not busy (429) or unlucky with this request (500)."""
        if not self.outcome:
            self.blame = blame
            self.host.stats.answered(self._token)
            self._end(outcome, now)

    def cancel(self) -> None:
        """Abandoned with no verdict on the host; a no-op once ended."""
        if not self.outcome:
            if self.ttfb_s is None:
                self.host.stats.answered(self._token)
            self._end(CANCELLED, self._attempts.clock())

    def _end(self, outcome: str, now: float) -> None:
        self.outcome = outcome
        self.ended_at = now
        self.host.inflight -= 1
        self._attempts.ended(self)

    def __repr__(self) -> str:
        return f"<Attempt {self.host.url} {self.outcome or 'open'} ttfb={self.ttfb_s}>"


class Attempts:
    """Starts attempts and reads each ended one into the host, health, statistics and the
    listeners (one per worker)."""

    __slots__ = ("health", "listener", "started", "clock", "released", "shared")

    def __init__(
        self,
        health: Health,
        listener: Callable[[Attempt], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.health = health
        self.listener = listener  # metrics: edge_upstream_attempts_total
        self.clock = clock
        self.started = 0
        # Admission's hook (edge/proxy/queueing.py): every end, cancelled ones too, frees a slot
        # on the host for a queued request. None unless [admission] sets a capacity.
        self.released: Callable[[Attempt], None] | None = None
        # [admission] with --workers N: each start and end written to the workers' shared table
        # at once, where the others' capacity checks read it (SharedLoad.add; set by edge/app.py).
        self.shared: SharedLoad | None = None

    def start(self, host: Host, model: str) -> Attempt:
        """An attempt on `host` begins now (a trial when the host is out of rotation)."""
        self.started += 1
        host.inflight += 1
        host.requests += 1
        if self.shared is not None:
            self.shared.add(host.url, 1)
        self.health.started(host)
        return Attempt(self, host, model, self.clock())

    def ended(self, attempt: Attempt) -> None:
        host, outcome = attempt.host, attempt.outcome
        stats = host.stats
        if self.shared is not None:  # before the hook: its queue reads the freed slot
            self.shared.add(host.url, -1)
        if self.released is not None:
            self.released(attempt)
        if outcome == CANCELLED:
            self.health.released(host)
            return
        if outcome == OK:
            # Decode rate for routing: completion tokens over the time after the first byte.
            stats.record(attempt.ttfb_s, False, attempt.ended_at, attempt.completion_tokens,
                         attempt.ended_at - attempt.started)  # fmt: skip
        else:
            stats.record(None, True, attempt.ended_at)
            if attempt.ttfb_s is None:  # before the first byte: health's verdict
                if attempt.blame:
                    self.health.failed(host)
                else:
                    self.health.released(host)
        if self.listener is not None:
            self.listener(attempt)

    def __repr__(self) -> str:
        return f"<Attempts started={self.started} {self.health!r}>"
