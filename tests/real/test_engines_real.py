"""Engine-metrics scraping against a real llama.cpp server (`make test-real`).

A server shared with clients the edge does not see has a queue the edge cannot count. llama.cpp
publishes it (`llamacpp:requests_deferred`, `llamacpp:requests_processing` on `/metrics`), and
with `routing.scrape` the edge reads it into the routing score (engines.py -> HostStats ->
balance.py). Here the slow requests go straight to one server, not through the edge: the edge's
own in-flight count for that server stays 0, so only the scrape can make it look busier.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from edge.routing.balance import ROUTE_HEADER
from edge.routing.fleet import Host
from edge.routing.policies import NEUTRAL_TTFB_S, cost, median
from loadtests import llama
from tests.procs import free_port

pytestmark = [pytest.mark.real, pytest.mark.timeout(600)]

MODEL = llama.MODEL_ID
# About 580 tokens: with one thread, two of these in the server's two slots keep it busy for
# several seconds, and the others wait in its queue (requests_deferred) meanwhile.
LONG = " ".join(
    f"Rule {i}: the archive keeps record {i * 7} in drawer {i % 13} beside ledger {i * 3}."
    for i in range(1, 26)
)
SLOTS = 2  # llama.server_command runs `-np 2`
BUSY_REQUESTS = 4  # two run, two are deferred
SCRAPE_S = 0.2


def _cost_of(edge: Any, host: Host) -> float:
    """The latency policy's cost of `host` now, as Picker.latency (policies.py) computes it."""
    pool = edge.view.fleet.models[MODEL]
    measured = [h.stats.ttfb_ewma for h in pool if h.stats.samples]
    neutral = median(measured) or NEUTRAL_TTFB_S
    return cost(host, time.monotonic(), neutral, edge.config.routing.decay_s)


async def _until(condition: Callable[[], bool], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s} s: {what}")
        await asyncio.sleep(0.05)


async def _slow(client: aiohttp.ClientSession, url: str, tag: int) -> dict[str, Any]:
    # A distinct start per request, so a deferred request does not reuse a finished one's cache
    # and shorten the busy period.
    body = {"model": MODEL, "max_tokens": 48, "temperature": 0,
            "messages": [{"role": "user", "content": f"{tag}. {LONG}"}]}  # fmt: skip
    async with client.post(f"{url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        doc: dict[str, Any] = await resp.json()
        return doc


async def _routed(client: aiohttp.ClientSession, base: str, **headers: str) -> str:
    body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}
    async with client.post(f"{base}/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
        return resp.headers["X-Edge-Server"]


async def test_scraped_llama_queue_raises_the_busy_servers_routing_cost(start_edge):
    ports = [free_port() for _ in range(2)]
    with llama.fleet(ports) as urls:
        busy_url, idle_url = urls
        # Affinity off: a prefix key would pin the probes below to one server whatever its
        # queue (the affinity bounded-load check counts the edge's own in-flight only).
        edge = await start_edge(
            {MODEL: urls}, routing__scrape=("*",), routing__scrape_interval_s=SCRAPE_S,
            routing__scrape_timeout_s=5.0, routing__affinity=False,
        )  # fmt: skip
        hosts = {h.url: h for h in edge.view.fleet.models[MODEL]}
        busy, idle = hosts[busy_url], hosts[idle_url]
        clock = time.monotonic
        # Both idle: readings arrive, with an empty queue.
        await _until(lambda: edge.scraper.readings >= 4, 10, "two scrapes of both servers")
        assert busy.stats.queue(clock()) == idle.stats.queue(clock()) == 0
        assert _cost_of(edge, busy) == pytest.approx(_cost_of(edge, idle))

        async with aiohttp.ClientSession() as client:
            slow = [asyncio.create_task(_slow(client, busy_url, i)) for i in range(BUSY_REQUESTS)]
            try:
                await _until(
                    lambda: busy.stats.queue(clock()) > 0, 30, "the deferred requests scraped"
                )
                # The engine's own view: requests it defers for want of a slot, and its slots.
                assert busy.stats.queue(clock()) == BUSY_REQUESTS - SLOTS
                assert busy.stats.engine_running == SLOTS
                assert busy.inflight == 0  # the edge sent none of them
                assert idle.stats.queue(clock()) == 0
                assert _cost_of(edge, busy) > 2 * _cost_of(edge, idle)
                # And routing follows: least_inflight (deterministic; without the queue it
                # alternates between two idle-looking servers) and the default latency policy
                # both send new requests to the idle server.
                chosen = [
                    await _routed(client, edge.url, **{ROUTE_HEADER: "least_inflight"}),
                    await _routed(client, edge.url, **{ROUTE_HEADER: "least_inflight"}),
                    await _routed(client, edge.url),
                    await _routed(client, edge.url),
                ]
                still_queued = busy.stats.queue(clock()) > 0
            finally:
                done = await asyncio.gather(*slow, return_exceptions=True)
        for result in done:
            assert isinstance(result, dict), result
            assert result["usage"]["prompt_tokens"] > 500
        # The deferred requests wait for ~600 tokens of prefill each: seconds, against a fraction
        # of one for the four short probes on the idle server.
        assert still_queued, "the queue drained before the probes were routed"
        assert chosen == [idle_url] * len(chosen), chosen

        # Finished: the next scrapes read an empty queue, and the costs are level again.
        await _until(
            lambda: busy.stats.queue(clock()) == 0 and busy.stats.engine_running == 0,
            10,
            "the server scraped idle",
        )
        assert edge.scraper.readings > 10
        busy_cost, idle_cost = _cost_of(edge, busy), _cost_of(edge, idle)
        assert busy_cost <= idle_cost * 1.01, (busy_cost, idle_cost)
