"""Limits and keys shared through a real redis-server: atomic admission across limiters and edge
processes, fail_open / fail_closed when Redis dies or stops answering, and no key in any log."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from edge.access.keys import Limits, RedisBackend, create_key
from edge.access.ratelimit import LocalLimiter, RedisLimiter
from edge.access.redisconn import RedisDown, RedisLink
from edge.errors import TooManyRequests, Unavailable
from tests.procs import Procs, free_port, wait_http
from tests.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture

MODEL = "mock-model"
CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "one two three"}]}


@pytest.fixture
async def links(redis_server: RedisServer) -> AsyncIterator[list[RedisLink]]:  # noqa: F811
    made: list[RedisLink] = []
    yield made
    for link in made:
        await link.close()


def _link(links: list[RedisLink], url: str, timeout: float = 0.25) -> RedisLink:
    link = RedisLink(url, timeout)
    links.append(link)
    return link


async def test_two_limiters_share_one_bucket(redis_server, links) -> None:  # noqa: F811
    a = RedisLimiter(_link(links, redis_server.url), 60, None)
    b = RedisLimiter(_link(links, redis_server.url), 60, None)
    limits = Limits(rpm=10)
    results = await asyncio.gather(
        *(lim.admit("k", limits, 0) for lim in (a, b) * 15), return_exceptions=True
    )
    admitted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, TooManyRequests)]
    assert len(admitted) == 10 and len(refused) == 20
    assert {r.headers["x-ratelimit-remaining-requests"] for r in refused} == {"0"}
    assert refused[0].headers["Retry-After"] in ("6", "5")
    # Admissions of one loop turn went to Redis together: one round trip per limiter.
    assert repr(a._admit) == "<ScriptBatch admit calls=15 batches=1>"


async def test_redis_tokens_and_leases(redis_server, links) -> None:  # noqa: F811
    limiter = RedisLimiter(_link(links, redis_server.url), 60, None)
    limits = Limits(tpm=100, concurrency=1)
    grant = await limiter.admit("t", limits, 80)
    assert grant.headers["x-ratelimit-remaining-tokens"] == "20"
    with pytest.raises(TooManyRequests) as info:
        await limiter.admit("t", limits, 10)
    assert info.value.code == "rate_limit_concurrency"
    limiter.release(grant, 9)
    await limiter.close()  # the settlement is sent off the request path; wait for it here
    again = await limiter.admit("t", limits, 80)
    assert 11 <= int(again.headers["x-ratelimit-remaining-tokens"]) <= 12  # 100 - 9 - 80 + refill
    limiter.release(again, None)
    await limiter.close()
    assert repr(limiter).endswith("settle calls=2 batches=2> degraded=0 lost=0>")


async def test_cancelled_admission_gives_its_lease_back(redis_server, links) -> None:  # noqa: F811
    limiter = RedisLimiter(_link(links, redis_server.url), 60, None)
    limits = Limits(concurrency=1)
    task = asyncio.create_task(limiter.admit("c", limits, 0))
    for _ in range(3):  # queued, flushed, sent: the reply is on its way
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)  # the reply arrives for nobody: the lease goes back
    await limiter.close()
    grant = await limiter.admit("c", limits, 0)  # the one slot is free again
    limiter.release(grant, None)
    await limiter.close()


async def test_fail_open_and_fail_closed(redis_server, links) -> None:  # noqa: F811
    open_ = RedisLimiter(_link(links, redis_server.url), 60, LocalLimiter())
    closed = RedisLimiter(_link(links, redis_server.url), 60, None)
    limits = Limits(rpm=100)
    await open_.admit("k", limits, 0)
    await closed.admit("k", limits, 0)
    redis_server.kill()
    started = time.monotonic()
    grant = await open_.admit("k", limits, 0)
    assert grant.local and open_.degraded == 1
    with pytest.raises(Unavailable) as info:
        await closed.admit("k", limits, 0)
    assert info.value.status == 503 and info.value.headers["Retry-After"] == "1"
    # The circuit is open now: further calls fail at once, without touching the network.
    for _ in range(50):
        with pytest.raises(Unavailable):
            await closed.admit("k", limits, 0)
    assert time.monotonic() - started < 1.0
    assert not closed.link.up
    redis_server.start()
    deadline = time.monotonic() + 5
    while True:  # the circuit lets a probe through after its backoff, then closes
        try:
            await closed.admit("k", limits, 0)
            break
        except Unavailable:
            assert time.monotonic() < deadline, closed.link
            await asyncio.sleep(0.05)
    assert closed.link.up


def _half_closed_to(port: int) -> int:
    """This process's TCP connections to `port` the peer has closed and we have not (CLOSE_WAIT)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "08":
                count += 1
    return count


async def test_a_dead_redis_leaves_no_half_closed_connections(redis_server, links) -> None:  # noqa: F811
    link = _link(links, redis_server.url)
    # Several calls at once: the pool opens several connections, idle once they are answered.
    await asyncio.gather(*(link.call(link.client.ping) for _ in range(6)))
    redis_server.kill()
    await asyncio.sleep(0.1)  # the FINs arrive: the idle connections are half-closed now
    with pytest.raises(RedisDown):
        await link.call(link.client.ping)
    assert not link.up
    assert _half_closed_to(redis_server.port) == 0


async def test_unanswering_redis_never_hangs(links) -> None:
    """A Redis that accepts connections and never answers: every call ends at its deadline."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        link = _link(links, f"redis://127.0.0.1:{port}/0", timeout=0.2)
        limiter = RedisLimiter(link, 60, None)
        started = time.monotonic()
        results = await asyncio.gather(
            *(limiter.admit("k", Limits(rpm=5), 0) for _ in range(20)), return_exceptions=True
        )
        assert all(isinstance(r, Unavailable) for r in results)
        assert time.monotonic() - started < 1.0
        with pytest.raises(RedisDown):
            await link.call(link.client.ping)
    finally:
        server.close()
        await server.wait_closed()


# --- edge processes ------------------------------------------------------------------------


def _config(tmp_path: Path, name: str, mock: str, redis_url: str, policy: str) -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f"""
[auth]
mode = "keys"
redis_url = "{redis_url}"
failure_policy = "{policy}"
reload_s = 0.2
[models."{MODEL}"]
servers = ["{mock}"]
"""
    )
    return str(path)


async def _edges(
    procs: Procs, tmp_path: Path, mock: str, redis_url: str, *policies: str
) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    """Edge processes sharing `redis_url`, one per failure policy, started side by side."""
    ports = [free_port() for _ in policies]
    edges = [
        procs.start("serve", "--port", str(port), "--config",
                    _config(tmp_path, f"edge{i}", mock, redis_url, policy))
        for i, (port, policy) in enumerate(zip(ports, policies, strict=True))
    ]  # fmt: skip
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    for base, proc in zip(bases, edges, strict=True):
        await asyncio.to_thread(wait_http, f"{base}/health", 20, proc)
    return edges, bases


def _cli(url: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "edge", "keys", "--redis-url", url, *args],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    # stdout is the key itself for `create`; nothing else may ever show it.
    assert "sk-edge-" not in done.stderr
    return done.stdout.strip()


async def _post(session: aiohttp.ClientSession, base: str, key: str) -> tuple[int, dict[str, str]]:
    async with session.post(
        f"{base}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        await resp.read()
        return resp.status, dict(resp.headers)


async def test_two_edges_enforce_one_limit(redis_server, procs, tmp_path, start_mock) -> None:  # noqa: F811
    mock = await start_mock()
    # The key exists before the edges start: each loads the store once before it accepts a
    # request, and only sees later keys at its next reload.
    key = await asyncio.to_thread(_cli, redis_server.url, "create", "--name", "t", "--rpm", "10")
    edges, bases = await _edges(
        procs, tmp_path, mock, redis_server.url, "fail_closed", "fail_closed"
    )
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(_post(session, bases[i % 2], key) for i in range(20)))
    ok = [h for s, h in results if s == 200]
    limited = [h for s, h in results if s == 429]
    # Refill is 1 request per 6 s: one more may pass if the burst spans a refill.
    assert 10 <= len(ok) <= 11 and len(ok) + len(limited) == 20
    for headers in limited:
        assert headers["x-ratelimit-limit-requests"] == "10"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-ratelimit-reset-requests"].endswith("s")
        assert int(headers["Retry-After"]) in range(1, 7)
    assert {h["x-ratelimit-limit-requests"] for h in ok} == {"10"}
    _assert_no_key_logged(edges, [key])


async def test_redis_killed_mid_test(redis_server, procs, tmp_path, start_mock) -> None:  # noqa: F811
    mock = await start_mock()
    backend = RedisBackend(redis_server.url)
    _, key = create_key(backend, "t", limits=Limits(rpm=1000))
    backend.client.close()
    edges, (fail_open, fail_closed) = await _edges(
        procs, tmp_path, mock, redis_server.url, "fail_open", "fail_closed"
    )
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        assert (await _post(session, fail_open, key))[0] == 200
        assert (await _post(session, fail_closed, key))[0] == 200
        redis_server.kill()
        started = time.monotonic()
        for _ in range(5):
            status, headers = await _post(session, fail_open, key)
            assert status == 200  # served on this edge's own limits
            assert headers["x-ratelimit-limit-requests"] == "1000"
            status, headers = await _post(session, fail_closed, key)
            assert status == 503 and headers["Retry-After"] == "1"
        assert time.monotonic() - started < 3.0  # nothing waited on the dead Redis
        # The key store snapshot outlives Redis: keys are still checked.
        assert (await _post(session, fail_open, "sk-wrong"))[0] == 401
        async with session.get(f"{fail_open}/metrics") as resp:
            text = await resp.text()
        assert "edge_redis_up 0.0" in text
        assert "edge_ratelimit_fail_open_total 5.0" in text
        redis_server.start()
        deadline = time.monotonic() + 10
        while (await _post(session, fail_closed, key))[0] != 200:
            assert time.monotonic() < deadline, "fail_closed edge did not recover"
            await asyncio.sleep(0.1)
    _assert_no_key_logged(edges, [key])


async def test_redis_key_store_lifecycle(redis_server, procs, tmp_path, start_mock) -> None:  # noqa: F811
    mock = await start_mock()
    started = _edges(procs, tmp_path, mock, redis_server.url, "fail_open")
    create = ("create", "--name", "t", "--workspace", "a" * 24)
    key, (edges, (base,)) = await asyncio.gather(
        asyncio.to_thread(_cli, redis_server.url, *create), started
    )
    kid = key[8:16]
    async with openai.AsyncOpenAI(
        base_url=f"{base}/api/{'a' * 24}/v1", api_key=key, max_retries=0
    ) as client:
        deadline = time.monotonic() + 5
        while True:  # the edge picks the new key up on its next refresh
            try:
                await client.chat.completions.create(**CHAT)
                break
            except openai.AuthenticationError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        listed = await asyncio.to_thread(_cli, redis_server.url, "list")
        assert kid in listed and key not in listed
        await asyncio.to_thread(_cli, redis_server.url, "revoke", kid)
        deadline = time.monotonic() + 5
        with pytest.raises(openai.AuthenticationError):
            while time.monotonic() < deadline:
                await client.chat.completions.create(**CHAT)
                await asyncio.sleep(0.1)
    backend = RedisBackend(redis_server.url)
    assert backend.records()[kid].revoked is not None
    backend.client.close()
    _assert_no_key_logged(edges, [key])


def test_redis_backend_round_trip(redis_server) -> None:  # noqa: F811
    backend = RedisBackend(redis_server.url)
    record, key = create_key(backend, "x", models=("a",), limits=Limits(rpm=3))
    assert backend.records() == {record.id: record}
    assert key not in str(backend.client.hgetall("edge:keys"))
    backend.client.close()


def _assert_no_key_logged(edges: list[subprocess.Popen[bytes]], keys: list[str]) -> None:
    for proc in edges:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:  # the drain is not under test here; the log is
            proc.kill()
            out, _ = proc.communicate(timeout=10)
        text = out.decode(errors="replace")
        assert "edge serving on" in text  # the output was captured
        for key in keys:
            assert key not in text and key[16:] not in text
