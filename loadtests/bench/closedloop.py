"""A closed-loop HTTP load for the cost benchmarks: N users, each sending one request after
another for a fixed time."""

from __future__ import annotations

import asyncio
import statistics
import time

import aiohttp


async def closed_loop(
    url: str, body: bytes, headers: dict[str, str], seconds: float, concurrency: int
) -> tuple[int, float]:
    """(requests completed, median latency in ms); any non-200 answer stops the benchmark."""
    latencies: list[float] = []
    deadline = time.monotonic() + seconds

    async def user(client: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            began = time.perf_counter()
            async with client.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise SystemExit(f"request failed: {resp.status} {await resp.text()}")
            latencies.append(time.perf_counter() - began)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as client:
        await asyncio.gather(*(user(client) for _ in range(concurrency)))
    return len(latencies), statistics.median(latencies) * 1000
