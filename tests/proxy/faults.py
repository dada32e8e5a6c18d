"""What the end-to-end failure tests share: a fleet whose first server takes every request, the
mock's faults and request log, and one counter of the edge's /metrics."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.observe.test_metrics import scrape, total


def prices(urls: list[str], model: str = "m") -> dict[str, Any]:
    """[routing.models] for the price policy, which tries the servers in the order given: the
    first takes every request, a retry or continuation goes to the next one not tried."""
    priced = {u: {"input": float(i + 1), "output": float(i + 1)} for i, u in enumerate(urls)}
    return {model: {"policy": "price", "prices": priced}}


async def fault(url: str, **fields: Any) -> None:
    """POST /_mock/fault to the mock at `url` (edge/dev/mockwire.py: Fault)."""
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/_mock/fault", json=fields) as resp:
            assert resp.status == 200, await resp.text()


async def mock_requests(url: str) -> list[dict[str, Any]]:
    """The last requests the mock at `url` read: path, body, headers (newest last)."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/_mock/requests") as resp:
            found: list[dict[str, Any]] = await resp.json()
            return found


async def counter(edge_url: str, name: str, **labels: str) -> float:
    """The sum of `name` over the edge's series whose labels include `labels`."""
    async with aiohttp.ClientSession() as session:
        return total(await scrape(session, edge_url), name, **labels)
