"""A request's plan, with no I/O: which host each attempt goes to, the retry budget, the early
trial when no host is routable, the 503 that names every server; Retry-After holds and the waits
for them; whether another host is left for a slow attempt to move to."""

from __future__ import annotations

import asyncio
import random
import time

from edge.config import RoutingSettings
from edge.routing.balance import Balancer
from edge.routing.fleet import DOWN, EJECTED, HALF_OPEN, REMOVED, Host
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


# --- Retry-After: holds and waits ----------------------------------------------------------
# `now` is the monotonic clock plus an offset: candidates() reads the real clock, and holds of
# tens of seconds stay in force for the whole test.


def test_a_held_host_takes_no_new_request_and_the_busy_one_moves_on():
    fleet = hosts(3)
    p = plan(fleet)
    first = p.next()
    assert first is not None
    p.hold(first, 30.0, time.monotonic())
    p.failed(first, "HTTP 429")
    second = p.next()
    assert second not in (None, first)
    for _ in range(20):  # no other request picks it either, whatever the policy draws
        assert plan(fleet).next() is not first
    assert first.state == "up" and first.fails_in_row == 0  # busy, not broken


def test_a_hold_is_only_ever_extended():
    host = hosts(1)[0]
    p = plan((host,))
    p.hold(host, 0.0, 100.0)
    p.hold(host, -5.0, 100.0)
    assert host.held_until == 0.0  # "Retry-After: 0" holds nothing
    p.hold(host, 30.0, 100.0)
    p.hold(host, 5.0, 110.0)
    assert host.held_until == 130.0
    p.hold(host, 25.0, 110.0)
    assert host.held_until == 135.0


def test_when_only_held_hosts_are_left_the_request_waits_and_retries_the_one_back_first():
    fleet = hosts(2)
    budget = RetryBudget(1.0, 10.0, 10.0)
    p = plan(fleet, budget)
    now = time.monotonic()
    a = p.next()
    assert a is not None
    b = fleet[1] if a is fleet[0] else fleet[0]
    p.hold(a, 3.0, now)
    p.failed(a, "HTTP 429")
    assert p.next() is b
    p.hold(b, 2.0, now)
    p.failed(b, "HTTP 503")
    assert p.next() is None and not p.denied
    retries = budget.retries
    assert p.wait(now, 10.0) == 2.0 and p.waited == 2.0
    assert p.next() is b  # tried already: a 429 or 503 with Retry-After is no failure
    assert budget.retries == retries + 1  # a retry like any other
    p.hold(b, 4.0, now + 2.0)
    p.failed(b, "HTTP 429")
    assert p.next() is None
    assert p.wait(now + 2.0, 10.0) == 1.0 and p.waited == 3.0  # `a` is back first now
    assert p.next() is a
    assert p.tried == [a, b, b, a]
    p.failed(a, "HTTP 429")
    p.hold(a, 8.0, now + 3.0)
    assert p.wait(now + 3.0, 10.0) == 3.0  # b, at now + 6
    assert p.next() is b
    p.hold(b, 30.0, now + 6.0)
    p.failed(b, "HTTP 429")
    assert p.wait(now + 6.0, 10.0) is None  # a is back at now + 11: 5 s more is past the 10
    assert p.waited == 6.0


def test_nothing_held_nothing_to_wait_for():
    fleet = hosts(2)
    p = plan(fleet)
    while (host := p.next()) is not None:
        p.failed(host, "HTTP 503")
    assert p.wait(time.monotonic(), 10.0) is None and p.waited == 0.0


def test_a_wait_the_retry_budget_could_not_pay_for_is_no_wait():
    host = hosts(1)[0]
    now = time.monotonic()
    p = plan((host,), RetryBudget(0.0, 10.0, 0.0))  # no retry at all
    assert p.next() is host
    p.hold(host, 1.0, now)
    p.failed(host, "HTTP 429")
    assert p.next() is None and p.wait(now, 10.0) is None
    # A first attempt is no retry: a request that finds its only host held waits for it.
    q = plan((host,), RetryBudget(0.0, 10.0, 0.0))
    assert q.next() is None and q.wait(now, 10.0) == 1.0 and q.next() is host


def test_a_wait_ends_early_when_the_host_was_held_again_meanwhile():
    host = hosts(1)[0]
    now = time.monotonic()
    p = plan((host,))
    p.hold(host, 2.0, now)
    assert p.next() is None and p.wait(now, 10.0) == 2.0
    p.hold(host, 5.0, now + 1.0)  # another request's 429, during the wait
    assert p.next() is None
    assert p.wait(now + 2.0, 10.0) == 4.0 and p.waited == 6.0
    assert p.next() is host


def test_only_hosts_back_in_rotation_when_their_hold_ends_are_waited_for():
    fleet = hosts(4)
    now = time.monotonic()
    down, removed, trial, ejected = fleet
    for host in fleet:
        host.held_until = now + 2.0
    down.state = DOWN
    removed.state = REMOVED
    trial.state = HALF_OPEN
    ejected.state, ejected.until = EJECTED, now + 5.0  # still out when the hold ends
    p = plan(fleet)
    assert p.next() is None and p.wait(now, 10.0) is None  # not even the fallback's trial
    ejected.until = now + 1.0  # due for its trial by the end of the hold
    assert p.wait(now, 10.0) == 2.0
    ejected.state = HALF_OPEN  # another request took that trial during the wait
    assert p.next() is None
    ejected.state = EJECTED
    assert p.wait(now, 10.0) == 2.0 and p.next() is ejected and p.waited == 4.0


def test_a_pinned_request_waits_for_its_own_host_and_no_other():
    fleet = hosts(3)
    now = time.monotonic()
    pinned = fleet[2]
    fleet[0].held_until = now + 1.0
    p = plan(fleet, headers={"X-Edge-Server": pinned.url})
    p.hold(pinned, 5.0, now)
    assert p.next() is None  # not another host, not the held one before its time
    assert p.wait(now, 10.0) == 5.0
    assert p.next() is pinned
    p.hold(pinned, 5.0, now + 5.0)
    p.failed(pinned, "HTTP 429")
    assert p.wait(now + 5.0, 10.0) == 5.0 and p.next() is pinned  # tried, still its host
    p.failed(pinned, "HTTP 503")
    assert p.next() is None and p.wait(now + 10.0, 10.0) is None  # no hold: it fails
    assert not p.others_left()


def test_a_host_affinity_chose_then_held_is_not_sent_the_request():
    fleet = hosts(2)
    p = plan(fleet)
    assert p.decision is not None
    p.decision.target = fleet[0]  # as a cookie would have it
    p.hold(fleet[0], 30.0, time.monotonic())  # between the decision and the first attempt
    assert p.next() is fleet[1]


def test_the_503_names_a_held_host_as_busy():
    fleet = hosts(2)
    p = plan(fleet)
    host = p.next()
    assert host is not None
    other = fleet[1] if host is fleet[0] else fleet[0]
    p.hold(other, 30.0, time.monotonic())
    p.failed(host, "HTTP 503")
    assert p.next() is None
    assert f"{other.url}: busy, held for" in p.unavailable().message


async def test_a_held_host_is_back_after_the_wait_on_the_real_clock():
    # The loop as the proxy runs it: next, and when it finds none, wait and try again.
    host = hosts(1)[0]
    p = plan((host,))
    assert p.next() is host
    p.hold(host, 0.02, time.monotonic())
    p.failed(host, "HTTP 429")
    got = p.next()
    while got is None:
        delay = p.wait(time.monotonic(), 1.0)
        assert delay is not None and delay <= 0.02
        await asyncio.sleep(delay)
        got = p.next()
    assert got is host and 0.0 < p.waited <= 0.02
    assert plan((host,)).next() is host  # no hold left for anyone


# --- others_left: could a slow attempt move on? ----------------------------------------------


def test_others_left_while_a_host_is_untried_and_a_retry_is_in_the_budget():
    fleet = hosts(3)
    budget = RetryBudget(1.0, 10.0, 10.0)
    p = plan(fleet, budget)
    for _ in range(3):
        host = p.next()
        assert host is not None
        assert p.others_left() == (len(p.tried) < 3)
        p.failed(host, "timed out before the first byte")
    assert budget.denied == 0 and budget.retries == 2  # peeked, never spent
    single = plan(hosts(1))
    assert single.next() is not None and not single.others_left()


def test_no_others_left_without_budget_for_a_pin_or_when_the_rest_are_held():
    fleet = hosts(3)
    broke = plan(fleet, RetryBudget(0.0, 10.0, 0.0))
    assert broke.next() is not None and not broke.others_left()
    assert broke.budget.denied == 0
    pinned = plan(fleet, headers={"X-Edge-Server": fleet[0].url})
    assert pinned.next() is fleet[0] and not pinned.others_left()
    p = plan(fleet)
    host = p.next()
    assert host is not None
    rest = [h for h in fleet if h is not host]
    for other in rest:
        p.hold(other, 30.0, time.monotonic())
    assert not p.others_left()
    rest[0].held_until = time.monotonic() - 1.0  # its hold is over
    assert p.others_left()


def test_others_left_counts_hosts_due_for_a_trial_and_the_fallback_once():
    fleet = hosts(3)
    now = time.monotonic()
    for host in fleet:
        host.state, host.until = EJECTED, now + 60.0
    p = plan(fleet)
    first = p.next()  # the fallback's early trial
    assert first is not None and not p.others_left()  # one trial per request
    fleet[1].until = fleet[2].until = now - 1.0  # due for their half-open trials
    first.state = HALF_OPEN
    assert p.others_left()
    q = plan(hosts(2))
    up = q.next()
    assert up is not None
    other = q.hosts[1] if up is q.hosts[0] else q.hosts[0]
    other.state, other.until = DOWN, now + 60.0
    assert q.others_left()  # the request would get the fallback's trial of it
