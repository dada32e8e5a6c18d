"""Policy units: the picks of `Picker` on a pool of candidates, the price tier, cost, median."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from edge.routing.fleet import Host
from edge.routing.policies import NEUTRAL_TTFB_S, Picker, cost, load, median, tier


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(n=3, seed=1):
    clock = Clock()
    hosts = [Host(f"http://10.0.0.{i}:8000") for i in range(n)]
    return Picker(random.Random(seed), clock, decay_s=10.0), hosts, clock


def test_the_same_seed_picks_the_same_hosts():
    runs = []
    for _ in range(2):
        picker, hosts, clock = make(5, seed=42)
        for i, host in enumerate(hosts):
            host.stats.record(0.05 * (i + 1), False, clock.now, 50 * (i + 1), duration_s=1.0)
            host.inflight = i % 3
        picks = [
            picker.pick(policy, hosts, "m", {}).url
            for _ in range(50)
            for policy in ("latency", "throughput", "least_inflight", "round_robin", "random")
        ]
        runs.append(picks)
    assert runs[0] == runs[1] and len(set(runs[0])) == 5


def test_one_candidate_is_picked_without_drawing():
    picker, hosts, _ = make(1)
    state = picker.rng.getstate()
    assert picker.latency(hosts) is hosts[0] and picker.throughput(hosts) is hosts[0]
    assert picker.rng.getstate() == state


def test_latency_is_power_of_two_choices_on_cost():
    picker, hosts, clock = make(2)
    hosts[0].stats.record(0.05, False, clock.now)
    hosts[1].stats.record(0.2, False, clock.now)
    assert {picker.latency(hosts).url for _ in range(50)} == {hosts[0].url}
    hosts[0].inflight = 10  # 0.05 x 11 > 0.2 x 1
    assert {picker.latency(hosts).url for _ in range(50)} == {hosts[1].url}


def test_round_robin_keeps_a_cursor_per_model():
    picker, hosts, _ = make(3)
    assert [picker.round_robin(hosts, "a") for _ in range(4)] == [*hosts, hosts[0]]
    assert picker.round_robin(hosts, "b") is hosts[0]  # its own cursor
    assert picker.round_robin(hosts, "a") is hosts[1]


def test_least_inflight_counts_the_engine_queue_and_rotates_ties():
    picker, hosts, clock = make(3)
    hosts[0].inflight, hosts[1].stats.remote_inflight = 1, 1
    hosts[2].stats.engine_queue, hosts[2].stats.engine_until = 1, clock.now + 5
    assert Counter(picker.least(hosts).url for _ in range(30)) == {h.url: 10 for h in hosts}
    hosts[2].stats.engine_queue = 0
    assert {picker.least(hosts).url for _ in range(10)} == {hosts[2].url}


def test_throughput_without_rates_goes_by_latency():
    picker, hosts, clock = make(2)
    hosts[0].stats.record(0.05, False, clock.now)
    hosts[1].stats.record(0.5, False, clock.now)
    assert {picker.pick("throughput", hosts, "m", {}).url for _ in range(30)} == {hosts[0].url}


def test_price_takes_the_cheapest_tier_then_latency():
    picker, hosts, clock = make(4)
    prices = {hosts[1].url: 1.0, hosts[2].url: 1.0, hosts[3].url: 3.0}
    assert tier(hosts, prices) == hosts[1:3]
    assert tier(hosts[3:] + hosts[:1], prices) == hosts[3:]  # priced before unpriced
    assert tier(hosts[:1], prices) == hosts[:1]  # nothing priced left: the unpriced
    assert tier(hosts, {}) is hosts and tier([], prices) == []
    hosts[1].stats.record(0.5, False, clock.now)
    hosts[2].stats.record(0.05, False, clock.now)
    assert {picker.pick("price", hosts, "m", prices).url for _ in range(30)} == {hosts[2].url}


def test_cost_is_the_score_or_the_stall_times_the_load_joined():
    _, (host,), clock = make(1)
    assert cost(host, clock.now, 0.3, 10.0) == pytest.approx(0.3)  # unmeasured: neutral
    host.inflight, host.stats.remote_inflight = 2, 1
    assert load(host) == 3
    assert cost(host, clock.now, 0.3, 10.0) == pytest.approx(0.3 * 4)
    host.stats.waiting(clock.now)
    clock.now += 2.0  # an attempt without a first byte for 2 s: worse than any score here
    assert cost(host, clock.now, 0.3, 10.0) == pytest.approx(2.0 * 4)


def test_median_is_the_neutral_score():
    assert median([]) == 0.0 and NEUTRAL_TTFB_S == 1.0
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([5.0, 1.0, 2.0, 4.0]) == 3.0
    assert median([0.1, 0.1, math.inf]) == 0.1  # one penalised host does not move it
