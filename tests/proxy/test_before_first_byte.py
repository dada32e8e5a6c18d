"""Before the first byte, end to end: a slow first token loses the request to another host
within its deadline, and Retry-After holds a busy host out of routing (or is waited for when no
other host can serve). A real edge, mocks with faults, the openai SDK as the client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import EdgeUnderTest
from tests.proxy import faults

MockStarter = Callable[..., Awaitable[str]]
EdgeStarter = Callable[..., Awaitable[EdgeUnderTest]]
HI: Any = [{"role": "user", "content": "hi"}]


async def _fleet(
    start_mock: MockStarter, start_edge: EdgeStarter, count: int = 2, **overrides: Any
) -> tuple[EdgeUnderTest, list[str]]:
    urls = [await start_mock(name=f"mock{i}", models=("m",), tokens=4) for i in range(count)]
    settings: dict[str, Any] = {
        "routing__models": faults.prices(urls),
        "routing__affinity": False,
        "health__enabled": False,
        **overrides,
    }
    return await start_edge(models={"m": urls}, **settings), urls


async def _served_by(edge: EdgeUnderTest, stream: bool = False) -> tuple[str, float]:
    """One chat through the SDK: which mock answered (its fingerprint), and how long it took."""
    started = time.monotonic()
    async with openai.AsyncOpenAI(base_url=f"{edge.url}/v1", api_key="k", max_retries=0) as c:
        if stream:
            chunks = [
                chunk
                async for chunk in await c.chat.completions.create(
                    model="m", messages=HI, stream=True
                )
            ]
            name = chunks[0].system_fingerprint
        else:
            name = (await c.chat.completions.create(model="m", messages=HI)).system_fingerprint
    assert name is not None
    return name, time.monotonic() - started


async def test_a_slow_first_token_fails_over_within_the_deadline(
    start_mock: MockStarter, start_edge: EdgeStarter
) -> None:
    # Headers at once, first token after 20 s, as in the failure-injection benchmark.
    edge, (slow, _) = await _fleet(start_mock, start_edge, upstream__first_token_floor_s=0.5)
    await faults.fault(slow, ttft_ms=20000, count=1)
    for stream in (True, False):
        if not stream:
            await faults.fault(slow, ttft_ms=20000, count=1)
        name, took = await _served_by(edge, stream)
        # No sample of the slow host yet: 2 x the floor (1 s), then the other host answers.
        assert name == "mock1"
        assert 0.9 < took < 3.0, took
    timeouts = await faults.counter(
        edge.url, "edge_upstream_attempts_total", model="m", outcome="timeout", server=slow
    )
    assert timeouts == 2


async def test_the_last_chance_waits_the_whole_first_byte_timeout(
    start_mock: MockStarter, start_edge: EdgeStarter
) -> None:
    # One host: nobody else could take the request, so its slow first token is waited for.
    url = await start_mock(name="only", models=("m",), tokens=4)
    edge = await start_edge(
        models={"m": [url]}, upstream__first_token_floor_s=0.2, health__enabled=False
    )
    await faults.fault(url, ttft_ms=1500, count=1)
    name, took = await _served_by(edge, stream=True)
    assert name == "only" and took >= 1.5


async def test_retry_after_holds_a_busy_host_out_for_that_long(
    start_mock: MockStarter, start_edge: EdgeStarter
) -> None:
    edge, (busy, other) = await _fleet(start_mock, start_edge)
    await faults.fault(busy, status=429, retry_after="2", count=1)
    held_at = time.monotonic()
    name, _ = await _served_by(edge)
    assert name == "mock1"  # moved on at once
    # Held: the cheapest host takes nothing for 2 s, though it answers again at once.
    while time.monotonic() - held_at < 1.7:
        assert (await _served_by(edge))[0] == "mock1"
        await asyncio.sleep(0.1)
    await asyncio.sleep(max(0.0, 2.1 - (time.monotonic() - held_at)))
    assert (await _served_by(edge))[0] == "mock0"  # back once the 2 s are over
    assert await faults.counter(edge.url, "edge_retry_after_holds_total", server=busy) == 1.0
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{edge.url}/ready") as resp:
            assert resp.status == 200  # busy is not down


async def test_retry_after_is_waited_for_when_no_other_host_can_serve(
    start_mock: MockStarter, start_edge: EdgeStarter
) -> None:
    url = await start_mock(name="only", models=("m",), tokens=4)
    edge = await start_edge(models={"m": [url]}, health__enabled=False)
    await faults.fault(url, status=503, retry_after="1", count=1)
    name, took = await _served_by(edge)
    assert name == "only" and 0.9 < took < 3.0, took
    # Longer than upstream.retry_after_wait_s: not waited for, the 503 comes at once.
    await faults.fault(url, status=503, retry_after="30", count=1)
    started = time.monotonic()
    async with openai.AsyncOpenAI(base_url=f"{edge.url}/v1", api_key="k", max_retries=0) as c:
        with pytest.raises(openai.APIStatusError) as failed:
            await c.chat.completions.create(model="m", messages=HI)
    assert failed.value.status_code == 503 and "HTTP 503" in str(failed.value)
    assert time.monotonic() - started < 2.0
