"""Fair queueing at the edge in front of real llama.cpp servers (`make test-real`).

Two servers with 2 slots each (`-np 2`), `[admission] servers = {"*" = 2}`: tenant A opens 8
streams at once, then tenant B one. A's first 4 take the 4 slots (16, 32, 48 and 64 tokens,
so that slots free one by one); the other 4 and B's wait in the edge. B's stream must start
(its first byte) before any of A's 4 that arrived after the first 4: A took the whole fleet
before the queue formed, so B goes first. Measured: B's first byte 1.2 s after A's first, A's
queued ones at 2.0 to 4.0 s.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from loadtests import llama
from tests.procs import free_port

pytestmark = [pytest.mark.real, pytest.mark.timeout(600)]

MODEL = llama.MODEL_ID
A, B = "a" * 24, "b" * 24
BODY = {
    "model": MODEL, "temperature": 0, "max_tokens": 48, "stream": True, "ignore_eos": True,
    "messages": [{"role": "user", "content": "Count from one to thirty in words."}],
}  # fmt: skip


async def _first_byte(session: aiohttp.ClientSession, url: str, firsts: dict[str, float],
                      name: str, tokens: int = 48) -> None:  # fmt: skip
    async with session.post(url, json={**BODY, "max_tokens": tokens}) as resp:
        assert resp.status == 200, await resp.text()
        async for _ in resp.content.iter_any():
            firsts.setdefault(name, time.monotonic())


async def _until(check: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)


async def test_the_second_tenant_starts_before_the_first_tenants_queued_streams(start_edge):
    ports = [free_port() for _ in range(2)]
    with llama.fleet(ports) as urls:
        edge = await start_edge(
            {MODEL: urls}, admission__servers={"*": 2}, routing__affinity=False,
            health__enabled=False,
        )  # fmt: skip
        queueing = edge.forwarder.queueing
        firsts: dict[str, float] = {}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            tasks = []
            for i in range(8):
                url = f"{edge.url}/api/{A}/v1/chat/completions"
                # The first 4 end one after the other (16 tokens apart): each freed slot is
                # given on its own, and B must get the first.
                tokens = 16 * (i + 1) if i < 4 else 48
                opening = _first_byte(session, url, firsts, f"A{i}", tokens)
                tasks.append(asyncio.create_task(opening))
                if i >= 4:  # the first 4 took the slots; each later one is queued in turn
                    await _until(lambda n=i - 3: queueing.length(MODEL) == n)
                else:
                    await _until(
                        lambda n=i + 1: sum(h.inflight for h in edge.view.fleet.hosts(MODEL)) == n
                    )
            url = f"{edge.url}/api/{B}/v1/chat/completions"
            tasks.append(asyncio.create_task(_first_byte(session, url, firsts, "B")))
            await asyncio.gather(*tasks)
    later = [firsts[f"A{i}"] for i in range(4, 8)]
    print(f"B first byte {firsts['B'] - min(firsts.values()):.2f} s after the first; A's queued "
          f"ones at {', '.join(f'{t - min(firsts.values()):.2f}' for t in later)} s")  # fmt: skip
    assert firsts["B"] < min(later)
