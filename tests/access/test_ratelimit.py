"""In-process rate limits: buckets with a fake clock, then through a real edge and mock with the
OpenAI SDK (429s with Retry-After and x-ratelimit-*, tokens settled against real usage)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import openai
import pytest

from edge.access.auth import requested_tokens
from edge.access.keys import FileBackend, Limits, create_key
from edge.access.ratelimit import LocalLimiter, duration
from edge.errors import TooManyRequests

MODEL = "mock-model"
CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "one two three"}]}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_minute_bucket() -> None:
    clock = Clock()
    limiter = LocalLimiter(clock)
    limits = Limits(rpm=3)
    grants = [limiter.take("k1", limits, 0) for _ in range(3)]
    assert [g.headers["x-ratelimit-remaining-requests"] for g in grants] == ["2", "1", "0"]
    assert grants[-1].headers["x-ratelimit-reset-requests"] == "1m0s"
    with pytest.raises(TooManyRequests) as info:
        limiter.take("k1", limits, 0)
    err = info.value
    assert err.status == 429 and err.code == "rate_limit_requests"
    assert err.headers["Retry-After"] == "20"  # one request comes back every 20 s
    assert err.headers["x-ratelimit-remaining-requests"] == "0"
    assert "k1" in err.message
    limiter.take("k2", limits, 0)  # another key has its own bucket
    clock.now += 20
    assert limiter.take("k1", limits, 0).headers["x-ratelimit-remaining-requests"] == "0"
    assert repr(limiter) == "<LocalLimiter keys=2 inflight=0>"


def test_tokens_reserved_then_settled() -> None:
    clock = Clock()
    limiter = LocalLimiter(clock)
    limits = Limits(tpm=100)
    first = limiter.take("k", limits, 60)
    assert first.headers["x-ratelimit-remaining-tokens"] == "40"
    with pytest.raises(TooManyRequests) as info:
        limiter.take("k", limits, 60)
    assert info.value.code == "rate_limit_tokens"
    assert info.value.headers["Retry-After"] == "12"  # 20 tokens at 100/min
    limiter.release(first, 10)  # used 10 of 60: 50 come back
    second = limiter.take("k", limits, 60)
    assert second.headers["x-ratelimit-remaining-tokens"] == "30"
    limiter.release(second, 160)  # used more than reserved: the bucket goes below zero
    with pytest.raises(TooManyRequests):
        limiter.take("k", limits, 1)
    # A reservation bigger than the whole bucket is capped at it, so it can ever pass.
    clock.now += 600
    assert limiter.take("k", limits, 10_000).reserved == 100


def test_unknown_usage_keeps_the_reservation() -> None:
    limiter = LocalLimiter(Clock())
    grant = limiter.take("k", Limits(tpm=100), 70)
    limiter.release(grant, None)
    with pytest.raises(TooManyRequests):
        limiter.take("k", Limits(tpm=100), 31)


def test_concurrency_lease() -> None:
    limiter = LocalLimiter(Clock())
    limits = Limits(concurrency=2)
    a, b = limiter.take("k", limits, 0), limiter.take("k", limits, 0)
    with pytest.raises(TooManyRequests) as info:
        limiter.take("k", limits, 0)
    assert info.value.code == "rate_limit_concurrency"
    assert info.value.headers["Retry-After"] == "1"
    limiter.release(a, None)
    c = limiter.take("k", limits, 0)
    limiter.release(b, None)
    limiter.release(c, None)
    assert limiter.inflight("k") == 0


def test_unlimited_key_costs_nothing() -> None:
    limiter = LocalLimiter(Clock())
    grant = limiter.take("k", Limits(), 500)
    assert grant.headers == {} and repr(limiter) == "<LocalLimiter keys=0 inflight=0>"


def test_duration_format() -> None:
    assert [duration(s) for s in (0, 0.02, 1, 6.5, 59.9994, 60, 360, 61.25)] == [
        "0ms", "20ms", "1s", "6.5s", "1m0s", "1m0s", "6m0s", "1m1.25s",
    ]  # fmt: skip


def test_requested_tokens() -> None:
    assert requested_tokens({"max_tokens": 50}, 1024) == 50
    assert requested_tokens({"max_completion_tokens": 7, "max_tokens": 50}, 1024) == 7
    assert requested_tokens({"generationConfig": {"maxOutputTokens": 9}}, 1024) == 9
    assert requested_tokens({"max_tokens": True}, 1024) == 1024
    assert requested_tokens({}, 33) == 33


@pytest.fixture
def keys(tmp_path: Path):
    path = str(tmp_path / "keys.json")
    store = FileBackend(path)

    def make(**limits: int) -> str:
        return create_key(store, "k", limits=Limits(**limits))[1]

    return path, make


async def test_429_through_the_edge(start_mock, start_edge, keys) -> None:
    path, make = keys
    key = make(rpm=2, tpm=10_000)
    mock = await start_mock()
    worker = await start_edge(models={MODEL: [mock]}, auth__mode="keys", auth__key_store=path)
    async with openai.AsyncOpenAI(
        base_url=f"{worker.url}/v1", api_key=key, max_retries=0
    ) as client:
        ok = await client.chat.completions.with_raw_response.create(**CHAT, max_tokens=100)
        assert ok.headers["x-ratelimit-limit-requests"] == "2"
        assert ok.headers["x-ratelimit-remaining-requests"] == "1"
        assert ok.headers["x-ratelimit-limit-tokens"] == "10000"
        assert ok.headers["x-ratelimit-remaining-tokens"] == "9900"
        await client.chat.completions.create(**CHAT)
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(**CHAT)
    headers = info.value.response.headers
    assert headers["retry-after"] == "30"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    assert info.value.body["code"] == "rate_limit_requests"  # type: ignore[index]


async def test_tpm_settles_against_real_usage(start_mock, start_edge, keys) -> None:
    """The mock answers 5 completion tokens; each request reserves 80 of a 100-token minute.
    Without settlement the second request would be refused (20 < 80)."""
    path, make = keys
    key = make(tpm=100)
    mock = await start_mock(tokens=5)
    worker = await start_edge(models={MODEL: [mock]}, auth__mode="keys", auth__key_store=path)
    async with openai.AsyncOpenAI(
        base_url=f"{worker.url}/v1", api_key=key, max_retries=0
    ) as client:
        first = await client.chat.completions.with_raw_response.create(**CHAT, max_tokens=80)
        assert first.headers["x-ratelimit-remaining-tokens"] == "20"
        used = first.parse().usage.total_tokens
        assert used == 9  # 3 words + 1 per message, and 5 generated
        # Streamed, with usage in the last chunk: settled the same way.
        second = await client.chat.completions.with_raw_response.create(
            **CHAT, max_tokens=80, stream=True, stream_options={"include_usage": True}
        )
        remaining = int(second.headers["x-ratelimit-remaining-tokens"])
        assert 100 - used - 80 <= remaining <= 100 - used - 80 + 2  # + refill while running
        chunks = [c async for c in second.parse()]
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == used
        await asyncio.sleep(0.05)
        third = await client.chat.completions.with_raw_response.create(**CHAT, max_tokens=80)
        assert int(third.headers["x-ratelimit-remaining-tokens"]) <= 100 - 2 * used - 80 + 3
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(**CHAT, max_tokens=80)
        assert info.value.body["code"] == "rate_limit_tokens"  # type: ignore[index]


async def test_concurrency_limit_through_the_edge(start_mock, start_edge, keys) -> None:
    path, make = keys
    key = make(concurrency=2)
    mock = await start_mock(ttft_ms=300)
    worker = await start_edge(models={MODEL: [mock]}, auth__mode="keys", auth__key_store=path)
    async with openai.AsyncOpenAI(
        base_url=f"{worker.url}/v1", api_key=key, max_retries=0
    ) as client:
        slow = [asyncio.create_task(client.chat.completions.create(**CHAT)) for _ in range(2)]
        await asyncio.sleep(0.1)
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(**CHAT)
        assert info.value.body["code"] == "rate_limit_concurrency"  # type: ignore[index]
        await asyncio.gather(*slow)
        await client.chat.completions.create(**CHAT)  # the slots came back
    assert worker.gate is not None and worker.gate.limiter.inflight(_id(key)) == 0


def _id(key: str) -> str:
    return key[8:16]
