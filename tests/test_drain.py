"""Drain and reload of a real `edge serve` process (tests/test_app.py has the basic SIGTERM case):
many streams in flight at SIGTERM, one longer than the drain timeout, and SIGHUP mid-stream."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.procs import Procs, free_port


async def stream(client: aiohttp.ClientSession, base: str, chunk_ms: int, tokens: int) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {"X-Mock-Chunk-Ms": str(chunk_ms), "X-Mock-Tokens": str(tokens)}
    async with client.post(f"{base}/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200
        try:
            return await resp.read()
        except aiohttp.ClientPayloadError:
            return b"(cut)"


def config(path: Path, servers: list[str], drain_s: float = 2.0) -> str:
    listed = ", ".join(f'"{s}"' for s in servers)
    path.write_text(
        f"[server]\ndrain_timeout_s = {drain_s}\n[health]\ninterval_s = 0.2\n"
        f'[models."m"]\nservers = [{listed}]\n'
    )
    return str(path)


async def test_sigterm_lets_streams_finish_cuts_the_overdue_and_exits_0(
    procs: Procs, start_mock, tmp_path: Path
):
    a = await start_mock(models=("m",), name="A")
    port = free_port()
    edge = procs.edge(port, "--config", config(tmp_path / "edge.toml", [a], drain_s=2.0))
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as client:
        # Five streams of ~1 s, and one of ~6 s: longer than the 2 s drain timeout.
        short = [asyncio.create_task(stream(client, base, 100, 10)) for _ in range(5)]
        overdue = asyncio.create_task(stream(client, base, 100, 60))
        await asyncio.sleep(0.4)
        edge.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        await asyncio.sleep(0.2)
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as fresh:
                await fresh.get(f"{base}/health")
        bodies = await asyncio.wait_for(asyncio.gather(*short), timeout=10)
        assert all(b.endswith(b"data: [DONE]\n\n") for b in bodies)
        cut = await asyncio.wait_for(overdue, timeout=10)
        cut_after = time.monotonic() - sent
    # The overdue stream ends at the deadline with an error event and a clean end of body (no
    # reset, no [DONE]): an SSE client learns it should send the request again.
    events = cut.split(b"\n\n")
    assert events[-1] == b"" and events[-2].startswith(b"data: {")
    error = orjson.loads(events[-2][len(b"data: ") :])["error"]
    assert error["type"] == "server_error" and "send the request again" in error["message"]
    assert b"[DONE]" not in cut and events[0].startswith(b"data: {")
    assert 1.5 < cut_after < 2.0 + 1.0  # at the drain timeout, not twice it
    assert await asyncio.to_thread(edge.wait, 10) == 0


async def test_sighup_reloads_servers_without_dropping_a_stream(
    procs: Procs, start_mock, tmp_path: Path
):
    a = await start_mock(models=("m",), name="A")
    b = await start_mock(models=("m",), name="B")
    port = free_port()
    path = tmp_path / "edge.toml"
    edge = procs.edge(port, "--config", config(path, [a]))
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as client:
        running = [asyncio.create_task(stream(client, base, 80, 10)) for _ in range(3)]
        await asyncio.sleep(0.3)
        config(path, [b])
        edge.send_signal(signal.SIGHUP)
        servers: set[str] = set()
        for _ in range(100):
            async with client.post(
                f"{base}/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
            ) as resp:
                servers.add(resp.headers["X-Mock-Server"])
            if servers == {"B"} or "B" in servers:
                break
            await asyncio.sleep(0.05)
        bodies = await asyncio.wait_for(asyncio.gather(*running), timeout=10)
    assert "B" in servers
    assert all(body.endswith(b"data: [DONE]\n\n") for body in bodies)
    assert edge.poll() is None


async def test_drain_stops_probes_and_discovery(start_mock, start_edge):
    a = await start_mock(models=("m",))
    edge = await start_edge({"m": [a]}, health__interval_s=0.02)
    for _ in range(200):
        if edge.prober.rounds >= 2:
            break
        await asyncio.sleep(0.01)
    await edge.drain()
    rounds = edge.prober.rounds
    await asyncio.sleep(0.1)
    assert edge.prober.rounds == rounds and edge.life.draining
