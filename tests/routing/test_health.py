"""Host health: the state machine on a fake clock, the retry budget, and probes against real
servers on loopback (200 vs 202 ranking, one failed probe never ejects, /ready shows it all)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from edge.config import HealthSettings, OutlierSettings
from edge.dev.mock import MockOptions, build_app
from edge.routing.fleet import (
    DOWN,
    EJECTED,
    HALF_OPEN,
    LOADABLE,
    LOADED,
    REMOVED,
    UP,
    Host,
    HostTable,
)
from edge.routing.health import (
    TABLE,
    Health,
    RetryBudget,
    candidates,
    describe,
    fallback,
    probe_rank,
    why,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def machine(**outlier: Any) -> tuple[Health, Clock, list[Host]]:
    clock, out = Clock(), list[Host]()
    settings = OutlierSettings(
        **{"consecutive_failures": 3, "base_ejection_s": 1.0, "max_ejection_s": 4.0, **outlier}
    )
    health = Health(HealthSettings(), settings, on_eject=out.append, clock=clock)
    return health, clock, out


def test_failures_in_a_row_eject_then_one_half_open_trial_with_doubling_backoff():
    health, clock, ejected = machine()
    host = Host("http://127.0.0.1:1")
    health.failed(host)
    health.succeeded(host)  # a success in between resets the count
    health.failed(host)
    health.failed(host)
    assert host.state == UP
    health.failed(host)
    assert host.state == EJECTED and host.until == clock.now + 1.0 and ejected == [host]
    assert not host.routable_at(clock.now)
    clock.now += 1.0
    assert host.routable_at(clock.now)  # due for its trial
    health.started(host)
    assert host.state == HALF_OPEN and not host.routable_at(clock.now)  # exactly one trial
    health.failed(host)
    assert host.state == EJECTED and host.until == clock.now + 2.0  # doubled
    for expected in (4.0, 4.0):  # capped at max_ejection_s
        clock.now = host.until
        health.started(host)
        health.failed(host)
        assert host.until == clock.now + expected
    assert ejected == [host]  # a failed trial extends the ejection, it is not a new one
    clock.now = host.until
    health.started(host)
    health.succeeded(host)
    assert host.state == UP and host.fails_in_row == 0 and host.routable_at(clock.now)
    assert "ejections=1" in repr(health) and "restores=1" in repr(health)


def test_a_trial_without_verdict_frees_the_host_for_the_next_one():
    health, clock, _ = machine(consecutive_failures=1)
    host = Host("http://127.0.0.1:1")
    health.failed(host)
    clock.now += 1.0
    health.started(host)
    health.released(host)  # the client went away during the trial
    assert host.state == EJECTED and host.routable_at(clock.now)


def test_backoff_level_is_forgotten_after_serving_well():
    health, clock, _ = machine(consecutive_failures=1)
    host = Host("http://127.0.0.1:1")
    health.failed(host)
    clock.now += 1
    health.started(host)
    health.failed(host)  # level 2: the next ejection would be 4 s
    clock.now = host.until
    health.started(host)
    health.succeeded(host)
    clock.now += 4.0  # max_ejection_s of good service
    health.succeeded(host)
    health.failed(host)
    assert host.until == clock.now + 1.0


def test_probes_need_thresholds_in_a_row_and_do_not_lift_a_passive_ejection():
    health, clock, ejected = machine()
    host = Host("http://127.0.0.1:1")
    for ok in (False, False, True, False, False):
        health.probed(host, ok)
    assert host.state == UP  # never three failures in a row
    health.probed(host, False)
    assert host.state == DOWN and ejected == [host] and "3 health probes" in why(host)
    health.probed(host, True)
    assert host.state == DOWN
    health.probed(host, True)
    assert host.state == UP
    for _ in range(3):
        health.failed(host)
    for _ in range(5):
        health.probed(host, True)
    assert host.state == EJECTED  # /health answering does not prove requests work


def test_table_only_names_known_states_and_removed_absorbs_everything():
    states = {UP, EJECTED, HALF_OPEN, DOWN}
    assert all(s in states and t in states for (s, _), t in TABLE.items())
    health, _, _ = machine(consecutive_failures=1)
    table = HostTable()
    kept, gone = table.build({"m": ["http://127.0.0.1:1", "http://127.0.0.1:2"]}).models["m"]
    fleet = table.build({"m": ["http://127.0.0.1:1"]})
    assert fleet.models["m"] == (kept,) and kept.state == UP and gone.state == REMOVED
    for event in (health.started, health.failed, health.succeeded, health.released):
        event(gone)
    assert gone.state == REMOVED and not gone.routable_at(time.monotonic())


def test_candidates_rank_loaded_before_loadable_and_fallback_trials_the_soonest():
    a, b, c = (Host(f"http://127.0.0.1:{p}") for p in (1, 2, 3))
    assert candidates("m", (a, b, c), ()) == (a, b, c)  # the common case: untouched
    b.ranks = {"m": LOADABLE}
    assert candidates("m", (a, b, c), ()) == [a, c]
    assert candidates("m", (a, b, c), [a, c]) == [b]  # loaded ones failed: the 202 one next
    assert candidates("other", (a, b, c), ()) == [a, b, c]
    a.state, a.until = EJECTED, 1e12
    c.state = DOWN
    b.state, b.until = EJECTED, 1e11
    assert candidates("m", (a, b, c), ()) == []
    c.until = 1e13
    assert fallback((a, b, c), ()) is b  # the ejection that ends first
    assert fallback((a, b, c), [b]) is a
    b.state = HALF_OPEN  # its trial is in flight: never two
    assert fallback((a, b, c), [a]) is c
    assert probe_rank(200) == LOADED and probe_rank(202) == LOADABLE and probe_rank(None) == 2


def test_a_held_host_is_skipped_by_candidates_and_fallback_but_reads_as_up():
    a, b, c = (Host(f"http://127.0.0.1:{p}") for p in (1, 2, 3))
    fleet = (a, b, c)
    assert a.held_until == 0.0
    now = time.monotonic()
    b.held_until = now + 30.0
    assert candidates("m", fleet, ()) == [a, c]
    assert candidates("m", fleet, [a]) == [c]
    # Busy, not broken: routable for metrics and /ready, health untouched, the 503 says why.
    assert b.routable_at(now) and b.state == UP and b.fails_in_row == 0
    shown = describe(b, now)
    assert shown["routable"] and shown["state"] == UP and shown["held_for_s"] == 30.0
    assert "held_for_s" not in describe(a, now)
    assert why(b, now) == "busy, held for 30.0 s more (Retry-After)"
    # An expired hold is forgotten, so the next request takes the common case again.
    b.held_until = now - 1.0
    assert candidates("m", fleet, [a]) == [b, c] and b.held_until == 0.0
    assert candidates("m", fleet, ()) is fleet
    # The fallback's early trial is never a held host, even the one back soonest.
    for host, until in ((a, 1e11), (b, 1e12), (c, 1e13)):
        host.state, host.until = EJECTED, until
    a.held_until = now + 30.0
    assert fallback(fleet, ()) is b
    assert fallback(fleet, (), now + 31.0) is a  # its hold is over then
    assert why(a, now).startswith("ejected for")  # out of rotation says more than busy


def test_retry_budget_peek_says_what_withdraw_would_and_counts_nothing():
    clock = Clock()
    budget = RetryBudget(ratio=0.0, window_s=10.0, min_per_s=0.2, clock=clock)  # 2 retries
    assert budget.peek() and budget.peek() and budget.retries == 0
    assert budget.withdraw() and budget.peek()
    assert budget.withdraw() and not budget.peek()
    assert budget.denied == 0 and budget.retries == 2
    assert not budget.withdraw() and budget.denied == 1
    clock.now += 11.0  # the window moved on: peek sees it too
    assert budget.peek()


def test_retry_budget_allows_a_ratio_plus_a_floor_over_a_sliding_window():
    clock = Clock()
    budget = RetryBudget(ratio=0.2, window_s=10.0, min_per_s=0.1, clock=clock)
    for _ in range(50):
        budget.deposit()
    allowed = sum(budget.withdraw() for _ in range(30))
    assert allowed == 11  # 0.2 x 50 + 0.1 x 10
    assert "denied=19" in repr(budget)
    clock.now += 11.0  # the window has moved past every deposit and retry
    assert budget.withdraw() and sum(budget.withdraw() for _ in range(5)) == 0


# --- probes against real servers ---------------------------------------------------------


def controllable(name: str, state: dict[str, int]) -> web.Application:
    """The mock, with /health* answering state["health"] and POSTs state["post"] when set."""
    app = build_app(MockOptions(models=("m",), name=name, tokens=3))

    @web.middleware
    async def override(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/health") and "health" in state:
            state["probes"] = state.get("probes", 0) + 1
            if state.get("fail_next", 0) > 0:
                state["fail_next"] -= 1
                return web.json_response({"status": "x"}, status=503)
            return web.json_response({"status": "x"}, status=state["health"])
        if request.method == "POST" and "post" in state:
            return web.json_response({"error": {"message": "no"}}, status=state["post"])
        return await handler(request)

    app.middlewares.append(override)
    return app


async def served_by(client: aiohttp.ClientSession, base: str, n: int) -> list[str]:
    out = []
    for _ in range(n):
        async with client.post(f"{base}/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200, await resp.text()
            out.append(resp.headers["X-Mock-Server"])
    return out


async def until(predicate: Any, within: float = 10.0) -> None:
    """Poll `predicate` every 20 ms; fail the test if it is still false after `within` s."""
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_202_server_ranks_below_loaded_ones_and_takes_over_when_they_fail(
    aiohttp_server, start_edge
):
    sa, sb = {"health": 200}, {"health": 202}
    a = await aiohttp_server(controllable("A", sa))
    b = await aiohttp_server(controllable("B", sb))
    urls = [f"http://127.0.0.1:{s.port}" for s in (a, b)]
    edge = await start_edge(
        {"m": urls}, health__path="/health/{model}", health__interval_s=0.05,
        routing__affinity=False,
    )  # fmt: skip
    host_b = edge.view.fleet.models["m"][1]
    await until(lambda: host_b.ranks == {"m": LOADABLE})
    async with aiohttp.ClientSession() as client:
        assert set(await served_by(client, edge.url, 8)) == {"A"}
        sa["post"] = 503  # A fails requests: each moves to B, the loadable one
        assert set(await served_by(client, edge.url, 6)) == {"B"}
        async with client.get(f"{edge.url}/ready") as resp:
            health = (await resp.json())["health"]
    assert health[urls[0]]["state"] == EJECTED and not health[urls[0]]["routable"]
    assert health[urls[1]] == {"state": UP, "routable": True, "models": {"m": "loadable"}}


async def test_one_failed_probe_never_ejects_and_down_servers_come_back(aiohttp_server, start_edge):
    sa, sb = {"health": 200}, {"health": 200}
    a = await aiohttp_server(controllable("A", sa))
    b = await aiohttp_server(controllable("B", sb))
    urls = [f"http://127.0.0.1:{s.port}" for s in (a, b)]
    edge = await start_edge(
        {"m": urls}, health__interval_s=0.05, health__unhealthy_threshold=3,
        health__healthy_threshold=2, routing__affinity=False, routing__policy="round_robin",
    )  # fmt: skip
    host_a = edge.view.fleet.models["m"][0]
    seen: set[str] = set()

    def probed_again() -> bool:
        seen.add(host_a.state)
        return sa["fail_next"] == 0 and host_a.probe_ok > 0

    sa["fail_next"] = 2  # two failed probes, then good ones again
    await until(probed_again)
    assert seen == {UP} and edge.health.ejections == 0
    sa["health"] = 500
    await until(lambda: host_a.state == DOWN)
    async with aiohttp.ClientSession() as client:
        assert set(await served_by(client, edge.url, 6)) == {"B"}
        async with client.get(f"{edge.url}/ready") as resp:
            body = await resp.json()
        assert resp.status == 200 and body["health"][urls[0]]["state"] == DOWN
        sa["health"] = 200
        await until(lambda: host_a.state == UP)
        assert "A" in await served_by(client, edge.url, 12)
    assert "rounds=" in repr(edge.prober) and edge.health.restores >= 1


@pytest.mark.parametrize("path", ["/health", "/health/{model}"])
async def test_probes_reuse_pooled_connections(aiohttp_server, start_edge, path):
    peers: set[int] = set()
    state = {"health": 200}
    app = controllable("A", state)

    @web.middleware
    async def track(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.transport is not None:
            peers.add(request.transport.get_extra_info("peername")[1])
        return await handler(request)

    app.middlewares.insert(0, track)
    a = await aiohttp_server(app)
    edge = await start_edge(
        {"m": [f"http://127.0.0.1:{a.port}"]}, health__interval_s=0.02, health__path=path
    )
    await until(lambda: state.get("probes", 0) >= 10)
    assert edge.prober.rounds >= 9 and len(peers) <= 2
