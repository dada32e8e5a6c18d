"""Hedge budget units: the token bucket and the delay before a hedge."""

from __future__ import annotations

from edge.config import from_mapping
from edge.routing.fleet import Host
from edge.routing.hedging import HedgeBudget


def budget(**routing):
    return HedgeBudget(from_mapping({}, **{f"routing__{k}": v for k, v in routing.items()}).routing)


def test_each_request_earns_a_share_of_a_hedge_and_each_hedge_spends_one():
    hedging = budget(hedge_budget=0.25)
    for _ in range(3):
        hedging.earn()
    assert not hedging.ready()
    hedging.earn()
    assert hedging.ready()
    hedging.spend()
    assert not hedging.ready() and hedging.tokens == 0.0 and hedging.hedges == 1


def test_a_quiet_spell_saves_up_no_burst():
    hedging = budget(hedge_budget=0.05)
    for _ in range(10_000):
        hedging.earn()
    assert hedging.tokens == 5.0  # 100 requests' worth
    small = budget(hedge_budget=0.001)
    for _ in range(10_000):
        small.earn()
    assert small.tokens == 1.0  # never less than one hedge


def test_reload_keeps_the_tokens_and_takes_the_new_rate():
    hedging = budget(hedge_budget=0.5)
    hedging.earn()
    hedging.configure(from_mapping({}, routing__hedge_budget=0.25).routing)
    assert hedging.tokens == 0.5
    hedging.earn()
    assert hedging.tokens == 0.75 and "tokens=0.75" in repr(hedging)


def test_delay_is_the_hosts_p95_never_below_the_minimum():
    hedging = budget(hedge_min_delay_s=0.1)
    host = Host("http://10.0.0.1:8000")
    assert hedging.delay(host) is None  # too few samples for a p95: no hedging yet
    for i in range(20):
        host.stats.record(0.2, False, float(i))
    assert hedging.delay(host) == 0.2
    assert budget(hedge_min_delay_s=0.5).delay(host) == 0.5
