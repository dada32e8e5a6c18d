"""A request's plan, with no I/O: which host each attempt goes to, the retry budget, the early
trial when no host is routable, and the 503 that names every server."""

from __future__ import annotations

import random
import time

from edge.config import RoutingSettings
from edge.routing.balance import Balancer
from edge.routing.fleet import EJECTED, Host
from edge.routing.health import RetryBudget
from edge.routing.plan import Plan


def hosts(n: int) -> tuple[Host, ...]:
    return tuple(Host(f"http://10.0.0.{i}:8000") for i in range(1, n + 1))


def plan(
    fleet: tuple[Host, ...],
    budget: RetryBudget | None = None,
    headers: dict[str, str] | None = None,
) -> Plan:
    balancer = Balancer(RoutingSettings(affinity=False), rng=random.Random(7))
    decision = balancer.decide("m", fleet, {}, headers or {})
    return Plan("m", fleet, decision, balancer, budget or RetryBudget(1.0, 10.0, 10.0))


def test_each_attempt_goes_to_a_host_not_tried_yet_until_none_is_left():
    fleet = hosts(3)
    p = plan(fleet)
    seen = []
    while (host := p.next()) is not None:
        seen.append(host)
        p.failed(host, "HTTP 503")
    assert sorted(h.url for h in seen) == sorted(h.url for h in fleet)
    err = p.unavailable()
    assert err.status == 503 and err.attempts == 3
    assert all(f"- {h.url}: HTTP 503" in err.message for h in fleet)


def test_a_pinned_request_tries_its_host_once_and_names_the_others_untried():
    fleet = hosts(3)
    p = plan(fleet, headers={"X-Edge-Server": fleet[2].url})
    assert p.next() is fleet[2]
    p.failed(fleet[2], "connect failed")
    assert p.next() is None
    message = p.unavailable().message
    assert f"{fleet[2].url}: connect failed" in message and f"{fleet[0].url}: not tried" in message


def test_retries_stop_when_the_budget_is_spent_and_the_503_says_so():
    fleet = hosts(3)
    budget = RetryBudget(0.0, 10.0, 0.0)  # no retry at all
    p = plan(fleet, budget)
    first = p.next()
    assert first is not None
    p.failed(first, "timed out before the first byte")
    assert p.next() is None and p.denied
    assert "not tried: the retry budget is spent" in p.unavailable().message
    # A move off a full pool put no load on anyone: it needs no budget.
    q = plan(fleet, budget)
    host = q.next()
    assert host is not None
    q.failed(host, "connection pool full", free=True)
    assert q.next() not in (None, host) and not q.denied


def test_with_every_host_out_one_gets_an_early_trial_the_soonest_back():
    fleet = hosts(3)
    now = time.monotonic()
    for i, host in enumerate(fleet):
        host.state, host.until = EJECTED, now + 60.0 - i  # the last one is back first
    p = plan(fleet)
    assert p.next() is fleet[2]
    p.failed(fleet[2], "HTTP 503")
    assert p.next() is None  # one trial per request, at most
    assert "ejected for" in p.unavailable().message
