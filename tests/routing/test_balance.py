"""Balancer units: policies, pins, affinity decisions, hedge budget (statistics: test_stats.py).

Picks go through health.candidates first, as the forwarder's do: the balancer weighs the hosts
health allows and never judges health itself."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from edge.config import from_mapping
from edge.errors import BadRequest
from edge.routing.affinity import host_id, split_entries
from edge.routing.balance import Balancer
from edge.routing.fleet import EJECTED, LOADABLE, UP, Host
from edge.routing.health import candidates

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(n=3, seed=1, **routing):
    clock = Clock()
    settings = from_mapping({}, **{f"routing__{k}": v for k, v in routing.items()}).routing
    import random

    balancer = Balancer(settings, rng=random.Random(seed), clock=clock)
    hosts = tuple(Host(f"http://10.0.0.{i}:8000") for i in range(n))
    return balancer, hosts, clock


def feed(host, ttfb, clock, times=5):
    for _ in range(times):
        clock.now += 0.1
        host.stats.record(ttfb, False, clock.now)


def share(balancer, hosts, decision=None, picks=2000):
    counts = Counter(
        balancer.pick(candidates("m", hosts, ()), (), decision).url for _ in range(picks)
    )
    return [counts[h.url] / picks for h in hosts]


def decide(balancer, hosts, doc=None, **headers):
    return balancer.decide("m", hosts, doc or {"model": "m"}, headers)


# --- policies -------------------------------------------------------------------------------


def test_latency_prefers_fast_hosts_and_still_uses_the_slow_one_a_little():
    balancer, hosts, clock = make(3, affinity=False)
    for host, ttfb in zip(hosts, (0.05, 0.1, 0.4), strict=True):
        feed(host, ttfb, clock)
    fast, mid, slow = share(balancer, hosts, decide(balancer, hosts))
    assert fast > mid > slow and slow < 0.2 and fast > 0.45


def test_in_flight_multiplies_the_score():
    balancer, hosts, clock = make(2, affinity=False)
    feed(hosts[0], 0.05, clock)
    feed(hosts[1], 0.2, clock)
    hosts[0].inflight = 10  # 0.05 x 11 > 0.2 x 1
    assert share(balancer, hosts, decide(balancer, hosts)) == [0.0, 1.0]


def test_fast_failures_do_not_attract_traffic():
    balancer, hosts, clock = make(3, affinity=False)
    for host in hosts:
        feed(host, 0.2, clock)
    hosts[0].stats.record(None, True, clock.now)  # answers 503 in 1 ms
    assert share(balancer, hosts, decide(balancer, hosts))[0] == 0.0


def test_a_penalised_host_is_tried_again_once_its_score_decays():
    balancer, hosts, clock = make(3, affinity=False)
    for host in hosts:
        feed(host, 0.2, clock)
    hosts[0].stats.record(None, True, clock.now)
    hosts[1].inflight = hosts[2].inflight = 2
    assert share(balancer, hosts, decide(balancer, hosts), picks=300)[0] == 0.0
    clock.now += 60  # nobody sent it anything: its penalty has decayed toward neutral
    for host in hosts[1:]:
        feed(host, 0.2, clock, times=1)
    assert share(balancer, hosts, decide(balancer, hosts), picks=300)[0] > 0.3


def test_a_new_host_starts_neutral_and_is_tried():
    balancer, hosts, clock = make(3, affinity=False)
    feed(hosts[0], 0.1, clock)
    feed(hosts[1], 0.3, clock)
    new = share(balancer, hosts, decide(balancer, hosts))[2]
    assert 0.2 < new < 0.6  # beats the slow host, loses to the fast one


def test_engine_queue_counts_as_load():
    balancer, hosts, clock = make(2, affinity=False)
    feed(hosts[0], 0.1, clock)
    feed(hosts[1], 0.1, clock)
    hosts[0].stats.engine_queue, hosts[0].stats.engine_until = 20, clock.now + 5
    assert share(balancer, hosts, decide(balancer, hosts), picks=200) == [0.0, 1.0]
    clock.now += 6  # the reading expired
    assert share(balancer, hosts, decide(balancer, hosts), picks=400)[0] > 0.3


def test_least_inflight_round_robin_and_random():
    balancer, hosts, _ = make(3, affinity=False, policy="least_inflight")
    hosts[0].inflight, hosts[1].inflight, hosts[2].inflight = 3, 1, 2
    assert share(balancer, hosts, decide(balancer, hosts), picks=50) == [0.0, 1.0, 0.0]
    hosts[0].inflight = hosts[2].inflight = 1
    assert all(s > 0.2 for s in share(balancer, hosts, decide(balancer, hosts), picks=300))
    d = decide(balancer, hosts, **{"X-Edge-Route": "round_robin"})
    order = [balancer.pick(hosts, (), d) for _ in range(6)]
    assert order[:3] == order[3:] and set(order) == set(hosts)
    d = decide(balancer, hosts, **{"X-Edge-Route": "random"})
    assert all(0.25 < s < 0.42 for s in share(balancer, hosts, d, picks=3000))


def test_throughput_prefers_the_fastest_decoder():
    balancer, hosts, clock = make(3, affinity=False, policy="throughput")
    for host, rate in zip(hosts, (20.0, 80.0, 40.0), strict=True):
        for _ in range(3):
            clock.now += 0.1
            host.stats.record(0.1, False, clock.now, int(rate), duration_s=1.1)
    low, high, mid = share(balancer, hosts, decide(balancer, hosts))
    assert high > mid > low


def test_price_uses_the_cheapest_tier_then_latency():
    prices = {
        "http://10.0.0.0:8000": {"input": 1, "output": 2},
        "http://10.0.0.1:8000/": {"input": 0.5, "output": 1},
        "http://10.0.0.2:8000": {"input": 1, "output": 0.5},
    }
    models = {"m": {"policy": "price", "prices": prices}}
    balancer, hosts, clock = make(4, affinity=False, models=models)
    shares = share(balancer, hosts, decide(balancer, hosts), picks=400)
    assert shares[0] == shares[3] == 0.0 and shares[1] == pytest.approx(0.5, abs=0.1)
    feed(hosts[1], 0.05, clock)
    feed(hosts[2], 0.5, clock)
    cheap_fast, cheap_slow = share(balancer, hosts, decide(balancer, hosts))[1:3]
    assert cheap_fast == 1.0 and cheap_slow == 0.0  # two candidates: latency decides
    # A retry still goes by price: the next tier is the unpriced host only after the priced.
    d = decide(balancer, hosts)
    assert balancer.pick(hosts, hosts[1:3], d) is hosts[0]


def test_route_header_and_provider_sort():
    balancer, hosts, _ = make(2, models={"m": {"policy": "random"}})
    assert decide(balancer, hosts).policy == "random"
    assert decide(balancer, hosts, **{"X-Edge-Route": "Price"}).policy == "price"
    doc = {"model": "m", "provider": {"sort": "throughput"}}
    assert decide(balancer, hosts, doc).policy == "throughput"
    assert decide(balancer, hosts, {"provider": {"sort": "nonsense"}}).policy == "random"
    with pytest.raises(BadRequest) as err:
        decide(balancer, hosts, **{"X-Edge-Route": "fastest"})
    assert "latency" in err.value.message


def test_unroutable_hosts_are_skipped():
    balancer, hosts, _ = make(2)
    hosts[0].state, hosts[0].until = EJECTED, time.monotonic() + 600  # health.py ejected it
    assert share(balancer, hosts, decide(balancer, hosts), picks=50) == [0.0, 1.0]
    tried = [hosts[1]]
    assert balancer.pick(candidates("m", hosts, tried), tried, decide(balancer, hosts)) is None
    for i in range(20):  # nor does affinity send anything there
        assert decide(balancer, hosts, {"user": f"u{i}"}).target in (None, hosts[1])


# --- pins -----------------------------------------------------------------------------------


def test_pin_goes_to_that_host_once_and_never_elsewhere():
    balancer, hosts, _ = make(3)
    d = decide(balancer, hosts, CHAT, **{"X-Edge-Server": "HTTP://10.0.0.2:8000/"})
    assert d.pinned and d.affinity == "pinned" and d.target is hosts[2]
    assert balancer.pick(hosts, (), d) is hosts[2]
    assert balancer.pick(hosts, [hosts[2]], d) is None  # failed: no silent move
    assert balancer.hedge_delay(hosts[2], hosts, d) is None
    assert balancer.served(d, hosts[2], secure=False) is None  # a pin sets no cookie


@pytest.mark.parametrize("pin", ["http://10.0.0.9:8000", "http://evil.example", "not a url", ""])
def test_pin_to_anything_else_is_refused(pin):
    balancer, hosts, _ = make(3)
    with pytest.raises(BadRequest) as err:
        decide(balancer, hosts, CHAT, **{"X-Edge-Server": pin})
    assert err.value.status == 400 and err.value.code == "unknown_server"
    assert pin not in err.value.message or not pin


# --- affinity -------------------------------------------------------------------------------


def cookie_of(set_cookie: str | None) -> str:
    assert set_cookie is not None
    return set_cookie.split(";", 1)[0]


def chat(text: str, **extra: object) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **extra}


def away(hosts, host):
    return next(h for h in hosts if h is not host)


def entries_of(balancer, set_cookie: str | None) -> list[tuple[bytes, bytes]]:
    """(host id, tag) of each entry of an issued cookie, most recent first."""
    value = cookie_of(set_cookie).split("=", 1)[1]
    return split_entries(balancer.codec.decode(value, balancer.wall()))


def conversations(balancer, hosts, home, n=1, but=None):
    """`n` chat bodies whose rendezvous home is `home` (or, with `but`, anything else)."""
    found = []
    for i in range(500):
        doc = chat(f"conversation {i}")
        target = decide(balancer, hosts, doc).target
        if (target is home) if but is None else (target is not but):
            found.append(doc)
            if len(found) == n:
                return found
    raise AssertionError("no such conversation")


def test_a_turn_at_home_sets_no_cookie_and_a_moved_one_names_its_host():
    balancer, hosts, _ = make(3)
    first = decide(balancer, hosts, CHAT)
    assert first.affinity == "key_hit" and first.key_kind == "prefix" and first.tag
    home = balancer.pick(hosts, (), first)
    assert balancer.served(first, home, secure=False) is None  # the key finds it again
    retried = decide(balancer, hosts, CHAT)
    other = away(hosts, home)
    cookie = balancer.served(retried, other, secure=False)  # a retry answered elsewhere
    assert retried.affinity == "moved" and "HttpOnly" in cookie
    assert entries_of(balancer, cookie) == [(host_id(other.url), retried.tag)]
    again = decide(balancer, hosts, CHAT, Cookie=cookie_of(cookie))
    assert again.affinity == "cookie_hit" and again.target is other
    assert entries_of(balancer, balancer.served(again, other, False)) == entries_of(
        balancer, cookie
    )  # refreshed as it was


def test_another_conversation_is_placed_by_its_key_not_by_the_cookie():
    balancer, hosts, _ = make(3)
    one, two = conversations(balancer, hosts, hosts[0], n=2)
    d = decide(balancer, hosts, one)
    cookie = balancer.served(d, hosts[1], False)  # the first conversation failed over
    d = decide(balancer, hosts, two, Cookie=cookie_of(cookie))
    assert d.affinity == "key_hit" and d.target is hosts[0] and d.cookie_ids
    assert balancer.served(d, hosts[0], False) is None  # at home: the cookie stays as it is
    d = decide(balancer, hosts, two, Cookie=cookie_of(cookie))
    both = entries_of(balancer, balancer.served(d, hosts[2], False))  # this one moved too
    assert [h for h, _ in both] == [host_id(hosts[2].url), host_id(hosts[1].url)]
    assert both[0][1] != both[1][1]  # two conversations, two entries, the newest first


def test_a_failed_over_conversation_stays_and_new_ones_go_home_once_it_is_back():
    balancer, hosts, clock = make(2, decay_s=1.0)
    home, fallback = hosts
    failed, new = conversations(balancer, hosts, home, n=2)
    d = decide(balancer, hosts, failed)
    home.stats.record(None, True, clock.now)  # its first attempt failed: a retry answered
    cookie = cookie_of(balancer.served(d, fallback, False))
    assert decide(balancer, hosts, new, Cookie=cookie).target is fallback  # home is failing
    clock.now += 5  # home has recovered
    d = decide(balancer, hosts, failed, Cookie=cookie)
    assert d.affinity == "cookie_hit" and d.target is fallback  # its KV cache is there now
    d = decide(balancer, hosts, new, Cookie=cookie)
    assert d.affinity == "key_hit" and d.target is home


def test_the_one_candidate_left_of_several_is_remembered():
    balancer, hosts, _ = make(2)
    (doc,) = conversations(balancer, hosts, hosts[0])
    hosts[0].state, hosts[0].until = EJECTED, time.monotonic() + 600
    d = decide(balancer, hosts, doc)
    assert d.target is None and d.key_kind == "prefix"  # the policy picks the one left
    cookie = cookie_of(balancer.served(d, hosts[1], False))
    hosts[0].state, hosts[0].until = UP, 0.0
    assert decide(balancer, hosts, doc, Cookie=cookie).target is hosts[1]


def test_one_conversation_has_one_entry_whichever_model_set_it():
    balancer, hosts, _ = make(3)
    others = (Host("http://10.9.9.1:8000"), Host("http://10.9.9.2:8000"))
    d = balancer.decide("other", others, CHAT, {})
    cookie = cookie_of(balancer.served(d, away(others, d.target), False))
    d = decide(balancer, hosts, CHAT, Cookie=cookie)
    assert d.affinity == "key_hit" and d.cookie_ids  # names no server of "m": the key decides
    moved = entries_of(balancer, balancer.served(d, away(hosts, d.target), False))
    assert len(moved) == 1 and moved[0][0] == host_id(away(hosts, d.target).url)


def test_the_session_header_is_the_conversation():
    balancer, hosts, _ = make(3)
    session = {"X-Session-ID": "s-1"}
    d = decide(balancer, hosts, chat("a"), **session)
    assert d.key_kind == "session"
    cookie = cookie_of(balancer.served(d, away(hosts, d.target), False))
    d = decide(balancer, hosts, chat("b"), Cookie=cookie, **session)  # same session, new turn
    assert d.affinity == "cookie_hit"
    assert decide(balancer, hosts, chat("b"), Cookie=cookie).affinity != "cookie_hit"


def test_a_users_conversations_share_a_home_but_not_a_cookie_entry():
    balancer, hosts, _ = make(3)
    one, two = chat("first", user="u-1"), chat("second", user="u-1")
    d = decide(balancer, hosts, one)
    home = d.target
    assert d.key_kind == "user" and d.tag is None  # its prefix is hashed only if needed
    assert balancer.served(d, home, False) is None and d.tag is None
    d = decide(balancer, hosts, one)
    cookie = cookie_of(balancer.served(d, away(hosts, home), False))
    assert d.tag is not None
    d = decide(balancer, hosts, two, Cookie=cookie)
    assert d.affinity == "key_hit" and d.target is home
    d = decide(balancer, hosts, one, Cookie=cookie)
    assert d.affinity == "cookie_hit" and d.target is away(hosts, home)


def test_a_request_of_no_conversation_ignores_the_cookie_and_sets_none():
    balancer, hosts, _ = make(3)
    d = decide(balancer, hosts, CHAT)
    cookie = cookie_of(balancer.served(d, away(hosts, d.target), False))
    for doc in ({"model": "m"}, {"model": "m", "input": "embed me"}):
        d = decide(balancer, hosts, doc, Cookie=cookie)
        assert d.affinity == "none" and d.target is None and d.cookie_ids == b""
        assert balancer.served(d, hosts[0], False) is None
    d = decide(balancer, hosts, {"model": "m", "input": "x", "user": "u"}, Cookie=cookie)
    assert d.key_kind == "user" and d.cookie_ids == b""  # placed by user, of no conversation
    assert balancer.served(d, away(hosts, d.target), False) is None


def test_a_model_with_one_server_does_no_affinity_work():
    balancer, hosts, _ = make(3)
    d = decide(balancer, hosts, CHAT)
    cookie = cookie_of(balancer.served(d, away(hosts, d.target), False))
    d = decide(balancer, hosts[:1], CHAT, Cookie=cookie)
    assert d.key_kind is None and d.affinity == "none" and d.cookie_ids == b""
    assert balancer.served(d, hosts[0], False) is None


def test_forged_cookie_is_ignored():
    balancer, hosts, _ = make(3)
    forged = "edge_affinity=" + "A" * 40
    d = decide(balancer, hosts, CHAT, Cookie=forged)
    assert d.affinity == "key_hit" and d.cookie_ids == b""


def test_bounded_load_moves_an_overloaded_home_and_then_the_cookies_host():
    balancer, hosts, _ = make(3, load_factor=1.5)
    home = decide(balancer, hosts, CHAT).target
    home.inflight = 4  # cap = ceil(1.5 x 5 / 3) = 3
    moved = decide(balancer, hosts, CHAT)
    assert moved.affinity == "moved" and moved.target not in (home, None)
    held = moved.target
    cookie = cookie_of(balancer.served(moved, held, False))
    home.inflight = 0
    assert decide(balancer, hosts, CHAT, Cookie=cookie).affinity == "cookie_hit"  # held stays
    held.inflight = 4
    by_key = decide(balancer, hosts, CHAT, Cookie=cookie)
    assert by_key.affinity == "moved" and by_key.target is home  # the key decides again
    cookie = cookie_of(balancer.served(by_key, home, False))  # moved home: named home now
    held.inflight = 0
    d = decide(balancer, hosts, CHAT, Cookie=cookie)
    assert d.affinity == "cookie_hit" and d.target is home


def test_a_failing_home_is_left_and_a_served_elsewhere_outcome_reads_moved():
    balancer, hosts, clock = make(3)
    d = decide(balancer, hosts, CHAT)
    home = d.target
    balancer.served(d, next(h for h in hosts if h is not home), False)
    assert d.affinity == "moved"  # a retry served it
    home.stats.record(None, True, clock.now)
    assert decide(balancer, hosts, CHAT).target is not home
    clock.now += 20
    assert decide(balancer, hosts, CHAT).target is home


def test_affinity_off_per_model_and_the_outcome_counts():
    balancer, hosts, _ = make(3, models={"m": {"affinity": False}})
    d = decide(balancer, hosts, CHAT)
    assert d.affinity == "none" and d.target is None
    assert balancer.served(d, hosts[0], False) is None
    assert "none=1" in repr(balancer) and "decisions=1" in repr(balancer)


def test_reload_keeps_a_drawn_secret_and_takes_a_configured_one(monkeypatch):
    monkeypatch.delenv("EDGE_AFFINITY_SECRET", raising=False)
    balancer, hosts, _ = make(3)
    d = decide(balancer, hosts, CHAT)
    cookie = cookie_of(balancer.served(d, away(hosts, d.target), False))
    balancer.reconfigure(from_mapping({}).routing)  # a reload draws another secret: ignored
    assert decide(balancer, hosts, CHAT, Cookie=cookie).affinity == "cookie_hit"
    balancer.reconfigure(from_mapping({}, routing__cookie_secret="configured-secret-1234").routing)
    assert decide(balancer, hosts, CHAT, Cookie=cookie).cookie_ids == b""


# --- hedging --------------------------------------------------------------------------------


def test_hedging_is_off_by_default_and_bounded_by_its_budget():
    balancer, hosts, clock = make(3)
    for _ in range(10):
        hosts[0].stats.record(0.2, False, clock.now)
    assert balancer.hedge_delay(hosts[0], hosts, decide(balancer, hosts)) is None
    balancer, hosts, clock = make(3, hedging=True, hedge_budget=0.05, hedge_min_delay_s=0.5)
    assert balancer.hedge_delay(hosts[0], hosts, decide(balancer, hosts)) is None  # no p95 yet
    for _ in range(10):
        hosts[0].stats.record(0.2, False, clock.now)
    assert balancer.hedge_delay(hosts[0], hosts, decide(balancer, hosts)) == 0.5  # min delay
    hedges = 0
    for _ in range(400):
        d = decide(balancer, hosts)
        hedges += balancer.hedge_host(hosts, [hosts[0]], d) is not None
    assert 18 <= hedges <= 21 and balancer.hedges == hedges


def test_a_hedge_goes_only_to_a_candidate_not_tried_yet():
    # hedge_host gets the model's whole list (unlike pick) and asks health.candidates itself.
    balancer, hosts, _ = make(4, affinity=False, hedging=True, hedge_budget=1.0)
    hosts[2].state, hosts[2].until = EJECTED, time.monotonic() + 600
    hosts[3].ranks = {"m": LOADABLE}  # loads on demand: only when no loaded host is left
    for _ in range(30):
        assert balancer.hedge_host(hosts, [hosts[0]], decide(balancer, hosts)) is hosts[1]
    assert balancer.hedge_host(hosts, hosts[:2], decide(balancer, hosts)) is hosts[3]
    assert (
        balancer.hedge_host(hosts, [hosts[0], hosts[1], hosts[3]], decide(balancer, hosts)) is None
    )
    assert balancer.hedges == 31  # a hedge with no host to go to spends nothing


def test_hedge_delay_is_the_hosts_p95_capped_at_four_medians():
    balancer, hosts, clock = make(3, hedging=True, hedge_min_delay_s=0.01)
    for _ in range(20):
        hosts[0].stats.record(0.4, False, clock.now)  # slow, but always slow
        hosts[1].stats.record(0.05, False, clock.now)
    d = decide(balancer, hosts)
    assert balancer.hedge_delay(hosts[0], hosts, d) == 0.4
    for _ in range(6):
        hosts[1].stats.record(1.5, False, clock.now)  # it stalled: its own p95 is its stalls
    assert balancer.hedge_delay(hosts[1], hosts, d) == pytest.approx(0.2)
    assert balancer.hedge_delay(hosts[2], hosts, d) is None  # unmeasured: no hedging yet


def test_a_host_stuck_without_a_first_byte_is_avoided_while_it_stalls():
    balancer, hosts, clock = make(2)
    feed(hosts[0], 0.05, clock)
    feed(hosts[1], 0.1, clock)
    d = decide(balancer, hosts, {"model": "m"})
    assert share(balancer, hosts, d, picks=100)[0] == 1.0  # fast, and nothing outstanding
    token = hosts[0].stats.waiting(clock.now)  # one attempt sent, no first byte yet
    clock.now += 0.3
    assert hosts[0].stats.waited(clock.now) == pytest.approx(0.3)
    assert share(balancer, hosts, d, picks=100)[0] == 0.0  # 0.3 s x 2 > 0.1 s x 1
    clock.now += 0.3  # over 0.5 s: a session held there moves too
    keyed = [decide(balancer, hosts, {"user": f"u{i}"}) for i in range(20)]
    assert all(k.target is hosts[1] for k in keyed)
    hosts[0].stats.answered(token)
    assert hosts[0].stats.waited(clock.now) == 0.0
    assert share(balancer, hosts, d, picks=100)[0] == 1.0
