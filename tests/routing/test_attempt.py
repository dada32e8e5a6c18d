"""An attempt's life on a fake clock: each end is read once, into the host's one failure count,
health's state machine and the routing statistics, and handed to the listener."""

from __future__ import annotations

import math

import pytest

from edge.config import HealthSettings, OutlierSettings
from edge.routing.attempt import (
    CANCELLED,
    HTTP_5XX,
    HTTP_429,
    OK,
    POOL_FULL,
    STREAM_ERROR,
    TIMEOUT,
    Attempt,
    Attempts,
)
from edge.routing.fleet import EJECTED, HALF_OPEN, UP, Host
from edge.routing.health import Health
from tests.routing.test_health import Clock


def wired(consecutive_failures: int = 3) -> tuple[Attempts, Clock, list[Attempt]]:
    clock, heard = Clock(), list[Attempt]()
    outlier = OutlierSettings(consecutive_failures=consecutive_failures, base_ejection_s=10.0)
    health = Health(HealthSettings(), outlier, clock=clock)
    return Attempts(health, listener=heard.append, clock=clock), clock, heard


def test_a_served_attempt_samples_its_ttfb_and_decode_rate_and_leaves_nothing_in_flight():
    attempts, clock, heard = wired()
    host = Host("http://a")
    attempt = attempts.start(host, "m")
    assert host.inflight == 1 and host.requests == 1
    clock.now += 0.2
    assert host.stats.waited(clock.now) == pytest.approx(0.2)  # the balancer sees the wait
    attempt.answered(clock.now)
    assert host.stats.waited(clock.now) == 0.0 and host.inflight == 1  # still streaming
    attempt.finish(OK, clock.now + 1.0, completion_tokens=50)
    assert host.inflight == 0 and heard == [attempt] and attempt.outcome == OK
    assert host.stats.samples == 1 and host.stats.ttfb_ewma == pytest.approx(0.2)
    assert host.stats.rate_ewma == pytest.approx(50.0)  # 50 tokens in the 1 s after the byte
    assert host.fails_in_row == 0 and host.stats.failed_at == -math.inf


def test_blamed_failures_are_the_one_count_that_ejects_and_unblamed_ones_do_not():
    attempts, clock, heard = wired(consecutive_failures=3)
    host = Host("http://a")
    for outcome in (HTTP_429, HTTP_5XX, POOL_FULL):  # busy, this request's 500, no connection
        attempts.start(host, "m").fail(outcome, clock.now, blame=False)
    assert host.fails_in_row == 0 and host.state == UP
    assert host.stats.failing(clock.now, 1.0)  # but routing avoids it for a while
    assert host.stats.samples == 3  # each one a penalty sample
    for _ in range(3):
        attempts.start(host, "m").fail(TIMEOUT, clock.now, blame=True)
    assert host.state == EJECTED and host.inflight == 0
    assert [a.outcome for a in heard] == [HTTP_429, HTTP_5XX, POOL_FULL, TIMEOUT, TIMEOUT, TIMEOUT]


def test_the_first_byte_is_health_s_verdict_and_a_half_open_host_is_back_at_once():
    attempts, clock, _ = wired(consecutive_failures=1)
    host = Host("http://a")
    attempts.start(host, "m").fail(TIMEOUT, clock.now, blame=True)
    assert host.state == EJECTED
    clock.now += 10.0
    trial = attempts.start(host, "m")
    assert host.state == HALF_OPEN and not host.routable_at(clock.now)
    trial.answered(clock.now + 0.1)
    assert host.state == UP and host.fails_in_row == 0  # before the stream ends
    trial.finish(STREAM_ERROR, clock.now + 5.0)
    # Broken mid-stream: routing's penalty, no health verdict (the host answered).
    assert host.state == UP and host.fails_in_row == 0 and host.stats.failing(clock.now + 5, 1.0)


def test_a_cancelled_trial_frees_the_host_for_the_next_one_and_reports_nothing():
    attempts, clock, heard = wired(consecutive_failures=1)
    host = Host("http://a")
    attempts.start(host, "m").fail(TIMEOUT, clock.now, blame=True)
    clock.now += 10.0
    heard.clear()
    trial = attempts.start(host, "m")
    trial.cancel()
    assert host.state == EJECTED and host.routable_at(clock.now) and host.inflight == 0
    assert trial.outcome == CANCELLED and heard == []


def test_an_attempt_ends_once_whatever_is_called_after():
    attempts, clock, heard = wired()
    host = Host("http://a")
    attempt = attempts.start(host, "m")
    attempt.fail(TIMEOUT, clock.now, blame=True)
    attempt.fail(TIMEOUT, clock.now, blame=True)
    attempt.finish(OK, clock.now)
    attempt.cancel()
    assert host.inflight == 0 and host.fails_in_row == 1 and heard == [attempt]
    assert "timeout" in repr(attempt) and "started=1" in repr(attempts)
