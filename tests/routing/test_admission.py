"""Admission, pure: capacity per host, the queue's order (priority, then weighted fair sharing
by tenant), shedding, deadline feasibility, grants. No I/O: hosts' in-flight counts are set by
hand, as attempts would set them."""

from __future__ import annotations

from collections import Counter
from typing import Any

import aiohttp
import pytest

from edge.config import AdmissionSettings, ModelAdmission, RoutingSettings, from_mapping
from edge.errors import TooManyRequests
from edge.routing.admission import (
    GONE,
    SHED_DEADLINE,
    SHED_FULL,
    Admission,
    Capacity,
    Ticket,
)
from edge.routing.balance import Balancer
from edge.routing.engines import Scraper
from edge.routing.fleet import EJECTED, FleetView, Host, HostTable
from edge.routing.health import RetryBudget
from edge.routing.plan import Plan
from tests.routing.test_engines import VLLM, metrics_app


def hosts(*urls: str) -> tuple[Host, ...]:
    return tuple(Host(u) for u in urls)


def settings(**fields: Any) -> AdmissionSettings:
    return AdmissionSettings(**fields)


def ticket(tenant: str = "t", priority: int = 5, weight: float = 1.0, deadline: float = 30.0):
    return Ticket(tenant, weight, priority, deadline)


# --- capacity ------------------------------------------------------------------------------


def test_capacity_comes_from_the_model_else_the_longest_server_prefix() -> None:
    cap = Capacity(
        settings(
            servers={"*": 8, "http://a": 4, "http://a1": 2},
            models={"big": ModelAdmission(capacity=1)},
        )
    )
    a1, a2, b = hosts("http://a1", "http://a2", "http://b")
    assert [cap.of(h, "m") for h in (a1, a2, b)] == [2, 4, 8]
    assert cap.of(a1, "big") == 1  # the model's own wins


def test_no_capacity_configured_is_unlimited() -> None:
    cap = Capacity(settings(servers={"http://other": 1}))
    (a,) = hosts("http://a")
    a.inflight = 10_000
    assert cap.of(a, "m") == 0 and cap.has_room(a, "m")


def test_replicas_take_a_share_of_each_host_at_least_one() -> None:
    a, b = hosts("http://a", "http://b")
    assert Capacity(settings(servers={"http://a": 8}, replicas=3)).of(a, "m") == 2
    assert Capacity(settings(servers={"http://b": 2}, replicas=4)).of(b, "m") == 1


def test_load_counts_the_other_workers_in_flight() -> None:
    cap = Capacity(settings(servers={"*": 2}))
    (a,) = hosts("http://a")
    a.inflight = 1
    assert cap.has_room(a, "m")
    a.stats.remote_inflight = 1  # another worker's attempt, through SharedLoad
    assert not cap.has_room(a, "m")


def test_an_engine_queue_teaches_a_lower_capacity_and_a_quiet_reading_raises_it() -> None:
    cap = Capacity(settings(engine_metrics=True))
    (a,) = hosts("http://a")
    a.inflight = 6
    cap.engine(a, queue=2.0, kv=0.5)  # 2 waiting in the engine: 4 is what it runs
    assert cap.of(a, "m") == 4 and not cap.has_room(a, "m")
    cap.engine(a, queue=0.0, kv=0.5)
    assert cap.of(a, "m") == 5
    a.inflight = 3
    cap.engine(a, queue=0.0, kv=0.99)  # the KV cache full: saturated too
    assert cap.of(a, "m") == 3


def test_engine_readings_change_nothing_unless_asked() -> None:
    cap = Capacity(settings(servers={"*": 4}))
    (a,) = hosts("http://a")
    cap.engine(a, queue=5.0, kv=1.0)
    assert cap.of(a, "m") == 4


def test_the_plan_skips_a_full_host_while_another_has_room() -> None:
    a, b = hosts("http://a", "http://b")
    a.inflight = 2
    balancer = Balancer(RoutingSettings(policy="round_robin"))
    for _ in range(4):
        plan = Plan("m", (a, b), None, balancer, RetryBudget(0.2, 10.0, 1.0))
        plan.capacity = Capacity(settings(servers={"*": 2}))
        assert plan.next() is b
    b.inflight = 2  # both full (the queue let this one through): picking is as before
    plan = Plan("m", (a, b), None, balancer, RetryBudget(0.2, 10.0, 1.0))
    plan.capacity = Capacity(settings(servers={"*": 2}))
    assert plan.next() in (a, b)


# --- the queue -----------------------------------------------------------------------------


def full(n: int = 1, cap: int = 1, **fields: Any) -> tuple[Admission, tuple[Host, ...]]:
    fleet = hosts(*(f"http://h{i}" for i in range(n)))
    for h in fleet:
        h.inflight = cap
    return Admission(settings(servers={"*": cap}, **fields)), fleet


def drain(adm: Admission, fleet: tuple[Host, ...], n: int) -> list[str]:
    """Free one slot at a time, n times: the tenants granted, in order."""
    order = []
    for _ in range(n):
        fleet[0].inflight -= 1
        (granted,) = adm.dispatch("m", 0.0)
        adm.leave(granted)
        fleet[0].inflight += 1  # it runs now
        order.append(granted.ticket.tenant)
    return order


def test_a_request_goes_at_once_while_a_host_has_room() -> None:
    adm, fleet = full(2, cap=2)
    assert not adm.admit_now("m", fleet, 0.0)
    fleet[1].inflight = 1
    assert adm.admit_now("m", fleet, 0.0)


def test_no_barging_an_arrival_waits_behind_the_queue_even_with_a_free_slot() -> None:
    adm, fleet = full()
    adm.enqueue("m", fleet, ticket(), 0.0)
    fleet[0].inflight = 0
    assert not adm.admit_now("m", fleet, 0.0)


def test_no_host_up_lets_the_request_through_to_the_plans_own_answer() -> None:
    adm, fleet = full()
    fleet[0].state, fleet[0].until = EJECTED, 1e12
    assert adm.admit_now("m", fleet, 0.0)


def test_higher_priority_is_dequeued_first_then_arrival_order() -> None:
    adm, fleet = full()
    for name, priority in (("a", 5), ("b", 1), ("c", 9), ("d", 5), ("e", 9)):
        adm.enqueue("m", fleet, ticket(name, priority), 0.0)
    assert drain(adm, fleet, 5) == ["c", "e", "a", "d", "b"]


def test_a_tenant_sending_ten_times_more_gets_an_equal_share_of_dispatches() -> None:
    adm, fleet = full()
    for i in range(100):
        adm.enqueue("m", fleet, ticket("heavy"), 0.0)
        if i % 10 == 0:
            adm.enqueue("m", fleet, ticket("light"), 0.0)
    order = drain(adm, fleet, 20)
    # The light tenant's 10 requests go within the first 20, alternating with the heavy one's.
    assert Counter(order) == {"heavy": 10, "light": 10}
    assert order[:4] in (["heavy", "light"] * 2, ["light", "heavy"] * 2)


def test_a_late_light_arrival_goes_next_not_behind_the_heavy_backlog() -> None:
    adm, fleet = full()
    for _ in range(50):
        adm.enqueue("m", fleet, ticket("heavy"), 0.0)
    drain(adm, fleet, 10)
    adm.enqueue("m", fleet, ticket("light"), 0.0)
    assert drain(adm, fleet, 2) in (["light", "heavy"], ["heavy", "light"])


def test_weights_share_dispatches_in_proportion() -> None:
    adm, fleet = full()
    for _ in range(60):
        adm.enqueue("m", fleet, ticket("pro", weight=4.0), 0.0)
        adm.enqueue("m", fleet, ticket("base", weight=1.0), 0.0)
    assert Counter(drain(adm, fleet, 50)) == {"pro": 40, "base": 10}


def test_grants_match_free_slots_less_those_not_yet_used() -> None:
    adm, fleet = full(1, cap=3)
    waiters = [adm.enqueue("m", fleet, ticket(), 0.0)[0] for _ in range(4)]
    fleet[0].inflight = 1  # two slots free
    assert len(adm.dispatch("m", 0.0)) == 2
    assert adm.dispatch("m", 0.0) == []  # the two grants are not used yet: no third
    adm.leave(waiters[0])  # one resumed (and will count in flight)...
    fleet[0].inflight = 2
    assert adm.dispatch("m", 0.0) == []
    adm.leave(waiters[1])  # ...the other left without using its slot: the next goes
    assert len(adm.dispatch("m", 0.0)) == 1


def test_a_waiter_that_leaves_is_out_of_the_counts_at_once() -> None:
    adm, fleet = full()
    waiter, _ = adm.enqueue("m", fleet, ticket(), 0.0)
    assert adm.length("m") == 1 and adm.waiting == 1
    adm.leave(waiter)
    assert adm.length("m") == 0 and adm.waiting == 0 and waiter.state == GONE
    fleet[0].inflight = 0
    assert adm.dispatch("m", 0.0) == []


def test_a_full_queue_sheds_the_arrival() -> None:
    adm, fleet = full(queue_length=2)
    adm.enqueue("m", fleet, ticket(), 0.0)
    adm.enqueue("m", fleet, ticket(), 0.0)
    with pytest.raises(TooManyRequests) as raised:
        adm.enqueue("m", fleet, ticket(), 0.0)
    assert raised.value.code == SHED_FULL and raised.value.headers["Retry-After"] == "1"


def test_a_higher_priority_arrival_evicts_the_youngest_of_the_lowest_priority() -> None:
    adm, fleet = full(queue_length=3)
    old_low = adm.enqueue("m", fleet, ticket("x", 1), 0.0)[0]
    young_low = adm.enqueue("m", fleet, ticket("y", 1), 0.0)[0]
    adm.enqueue("m", fleet, ticket("z", 5), 0.0)
    waiter, evicted = adm.enqueue("m", fleet, ticket("w", 9), 0.0)
    assert evicted is young_low and old_low.state != GONE and adm.length("m") == 3
    with pytest.raises(TooManyRequests):  # an equal priority does not evict
        adm.enqueue("m", fleet, ticket("v", 1), 0.0)


def test_an_arrival_that_would_wait_past_its_deadline_is_shed_at_once() -> None:
    adm, fleet = full(2, cap=2)  # 4 slots
    for _ in range(8):
        adm.enqueue("m", fleet, ticket(), 0.0)
    adm.ended("m", 2.0)  # an attempt takes 2 s
    assert adm.expected_wait(adm.queues["m"], 5, 0.0) == pytest.approx(6.0)  # 3 rounds
    with pytest.raises(TooManyRequests) as raised:
        adm.enqueue("m", fleet, ticket(deadline=5.0), 0.0)
    assert raised.value.code == SHED_DEADLINE and raised.value.headers["Retry-After"] == "6"
    # A higher priority has nobody ahead: it fits.
    adm.enqueue("m", fleet, ticket(priority=9, deadline=5.0), 0.0)


def test_deadlines_and_queue_lengths_per_model() -> None:
    adm = Admission(
        settings(deadline_ms=1000, models={"m": ModelAdmission(deadline_ms=250, queue_length=7)})
    )
    assert adm.deadline_s("m") == 0.25 and adm.deadline_s("other") == 1.0
    assert adm._limit("m") == 7 and adm._limit("other") == 1000


def test_config_reads_admission_and_checks_it() -> None:
    config = from_mapping(
        {"admission": {"servers": {"http://a": 2}, "weights": {"ws": 4}, "deadline_ms": 500}}
    )
    assert config.admission.enabled and config.admission.weights == {"ws": 4}
    assert not from_mapping({}).admission.enabled
    for bad in ({"servers": {"http://a": -1}}, {"weights": {"ws": 0}}, {"max_priority": 10}):
        with pytest.raises(ValueError):
            from_mapping({"admission": bad})


def test_a_tenant_that_filled_the_fleet_before_a_queue_formed_waits_behind_the_other() -> None:
    adm, fleet = full(2, cap=2)
    for h in fleet:
        h.inflight = 0
    for _ in range(4):  # tenant a takes every slot at once
        assert adm.admit_now("m", fleet, 0.0, ticket("a"))
        fleet[0 if fleet[0].inflight < 2 else 1].inflight += 1
    for _ in range(4):
        assert not adm.admit_now("m", fleet, 0.0, ticket("a"))
        adm.enqueue("m", fleet, ticket("a"), 0.0)
    adm.enqueue("m", fleet, ticket("b"), 0.0)
    assert drain(adm, fleet, 5) == ["b", "a", "a", "a", "a"]


async def test_a_scraped_engine_queue_teaches_capacity_through_the_scraper(aiohttp_server):
    """vLLM says 9 requests wait in its queue while the edge has 12 on it: 3 is what it runs
    for the edge; an engine the scraper is not told of teaches nothing."""
    servers = [await aiohttp_server(metrics_app(VLLM)) for _ in range(2)]
    urls = [f"http://127.0.0.1:{s.port}" for s in servers]
    view = FleetView(HostTable().build({"m": urls}))
    capacity = Capacity(settings(engine_metrics=True))
    routing = from_mapping({}, routing__scrape=urls[:1]).routing
    taught, other = view.fleet.models["m"]
    taught.inflight = other.inflight = 12
    async with aiohttp.ClientSession() as session:
        scraper = Scraper(routing, view, session)
        scraper.on_reading = lambda host, reading: capacity.engine(host, reading.queue, reading.kv)
        assert await scraper.scrape_once() == 1
    assert capacity.of(taught, "m") == 3 and not capacity.has_room(taught, "m")
    assert capacity.of(other, "m") == 0 and capacity.has_room(other, "m")
