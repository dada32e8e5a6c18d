"""Broken and hostile upstreams, each met by the bound that stops it: a head that never ends,
bytes after a body, protocol switches and interim answers, forged edge headers, a saturated
connection pool, and a slow client's pause that must not pass for a silent server.

Every upstream here is a raw socket server (tests/rawupstream.py) writing exactly the bytes a
test scripts; health probes are off so that only the test's requests reach it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

import aiohttp
import orjson
import pytest

from edge.http.client import Malformed, PoolFull, TimedOut, UpstreamPool
from tests.observe.test_metrics import scrape, total
from tests.rawupstream import SSE_HEAD, Scripted, answer, chunked
from tests.routing.test_health import until

CHAT = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]})
STREAM = orjson.dumps(
    {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}
)
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
YES = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nyes"
QUIET: dict[str, Any] = {"health__enabled": False, "routing__affinity": False}


def make_pool(**kw: Any) -> UpstreamPool:
    settings: dict[str, Any] = {
        "connect_timeout_s": 2, "keepalive_s": 30, "limit_per_origin": 8, "ssl_context": None,
    }  # fmt: skip
    return UpstreamPool(**(settings | kw))


@pytest.fixture
async def pool():
    p = make_pool()
    yield p
    await p.close()


async def post(pool: UpstreamPool, url: str, head_s: float = 2.0):
    return await pool.post(url, "/v1/x", b"", b"{}", head_s)


async def ask(edge: Any, body: bytes = CHAT, path: str = "/v1/chat/completions", **kw: Any):
    """(status, headers, body) of one request to the edge."""
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{edge.url}{path}", data=body, **kw) as resp:
            return resp.status, resp.headers, await resp.read()


def only_host(edge: Any) -> Any:
    (host,) = edge.view.fleet.models["m"]
    return host


# --- 1. a head that never ends


async def _endless_head(reader, writer, n):
    writer.write(b"HTTP/1.1 200 OK\r\n")
    line = b"X-Junk: " + b"a" * 1000 + b"\r\n"
    while True:  # until the edge hangs up (the write then fails)
        writer.write(line * 16)
        await writer.drain()


async def test_a_head_that_never_ends_fails_at_max_head_bytes(start_edge):
    upstream = Scripted(_endless_head)
    url = await upstream.start()
    edge = await start_edge(
        {"m": [url]}, upstream__max_head_bytes=32768, upstream__first_byte_timeout_s=10.0, **QUIET
    )
    started = time.monotonic()
    status, _, body = await ask(edge)
    assert status == 503 and time.monotonic() - started < 3  # not after first_byte_timeout_s
    assert "response head over 32768 bytes" in orjson.loads(body)["error"]["message"]
    host = only_host(edge)
    assert host.fails_in_row == 1  # counted like a malformed answer
    await until(lambda: upstream.lost == 1, within=3)  # and the connection was closed
    await upstream.close()


async def test_interim_heads_count_toward_the_head_bound():
    async def endless_continue(reader, writer, n):
        while True:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" * 64)
            await writer.drain()

    pool = make_pool(max_head_bytes=4096)
    upstream = Scripted(endless_continue)
    url = await upstream.start()
    with pytest.raises(Malformed, match="head over 4096 bytes"):
        await post(pool, url, head_s=5)
    await pool.close()
    await upstream.close()


async def test_a_head_in_small_pieces_is_read_in_linear_time():
    """Each piece is searched once (plus 3 bytes before it) and appended in place: a head
    that arrives a few bytes at a time costs no more than one that arrives whole."""

    async def silent(reader, writer, n):
        await reader.read()  # the test hands the answer to the connection itself
        return False

    pool = make_pool(max_head_bytes=4 * 2**20)
    upstream = Scripted(silent)
    url = await upstream.start()
    waiting = asyncio.create_task(post(pool, url, head_s=30))
    await until(lambda: upstream.requests)
    (conn,) = pool._conns
    line = b"X-A: " + b"a" * 57 + b"\r\n"  # 64 bytes
    started = time.perf_counter()
    conn.data_received(b"HTTP/1.1 200 OK\r\n")
    for _ in range(2**20 // len(line)):  # a 1 MiB head in 16384 pieces
        conn.data_received(line)
    conn.data_received(b"Content-Length: 2\r\n\r\nok")
    elapsed = time.perf_counter() - started
    resp = await waiting
    assert resp.status == 200 and await resp.read() == b"ok"
    resp.close()
    # Quadratic (each piece appended to a copy of the head and the whole head searched again)
    # took seconds here; linear takes a few tens of milliseconds.
    assert elapsed < 1.0, elapsed
    await pool.close()
    await upstream.close()


# --- 2. bytes after the end of a body


STRAY = b"HTTP/1.1 503 Service Unavailable\r\nX-Junk: "  # a head left open: it eats the next


@pytest.mark.parametrize("when", ["with the body", "while idle"])
async def test_bytes_after_a_sized_body_are_never_read_as_the_next_answer(pool, when):
    async def script(reader, writer, n):
        if len(upstream.requests) > 1:  # the second request, on whichever connection
            writer.write(YES)
        elif when == "with the body":
            writer.write(OK + STRAY)  # one write: one piece
        else:
            writer.write(OK)
            await writer.drain()
            await asyncio.sleep(0.1)  # the connection is back in the pool by now
            writer.write(STRAY)
        await writer.drain()
        return True

    upstream = Scripted(script)
    url = await upstream.start()
    resp = await post(pool, url)
    assert await resp.read() == b"{}"
    resp.close()
    await asyncio.sleep(0.3)
    again = await post(pool, url)
    # Reused, the connection's parser would read this answer as the end of the stray head
    # (503 with "X-Junk: HTTP/1.1 200 OK"); it was closed instead.
    assert again.status == 200 and await again.read() == b"yes"
    again.close()
    assert upstream.connections == 2
    await upstream.close()


async def test_bytes_after_a_chunked_body_while_idle_close_the_connection(pool):
    async def script(reader, writer, n):
        if len(upstream.requests) == 1:
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
            )
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(STRAY)
        else:
            writer.write(YES)
        await writer.drain()
        return True

    upstream = Scripted(script)
    url = await upstream.start()
    resp = await post(pool, url)
    assert await resp.read() == b"ok"
    resp.close()
    await asyncio.sleep(0.3)
    again = await post(pool, url)
    assert again.status == 200 and await again.read() == b"yes"
    again.close()
    assert upstream.connections == 2
    await upstream.close()


# --- 3. interim (1xx) answers


SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


async def test_101_switching_protocols_is_one_warning_line_and_a_503(start_edge, caplog):
    upstream = Scripted(answer(SWITCH + b"\x81\x05hello"))
    url = await upstream.start()
    edge = await start_edge({"m": [url]}, **QUIET)
    caplog.set_level(logging.INFO)
    status, _, body = await ask(edge)
    assert status == 503 and b"switched protocols" in body
    await asyncio.sleep(0.1)
    noted = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.name, r.levelno, r.exc_info) for r in noted] == [
        ("edge.upstream", logging.WARNING, None)
    ]
    assert url in noted[0].getMessage() and "101" in noted[0].getMessage()
    assert only_host(edge).fails_in_row == 1
    await upstream.close()


async def test_100_continue_and_103_early_hints_are_skipped_not_relayed(start_edge):
    async def script(reader, writer, n):
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)  # the interim answer alone in its piece
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(OK.replace(b"\r\n\r\n", b"\r\nX-Final: yes\r\n\r\n"))
        await writer.drain()
        return True

    upstream = Scripted(script)
    url = await upstream.start()
    edge = await start_edge({"m": [url]}, **QUIET)
    status, headers, body = await ask(edge)
    assert (status, body, headers["X-Final"]) == (200, b"{}", "yes")
    assert "Link" not in headers  # an interim head's fields are not the answer's
    await upstream.close()


async def test_a_stream_after_100_continue_in_the_same_piece(start_edge):
    events = [b'data: {"n":1}\n\n', b"data: [DONE]\n\n"]
    upstream = Scripted(
        answer(b"HTTP/1.1 100 Continue\r\n\r\n" + SSE_HEAD + b"".join(chunked(events)))
    )
    url = await upstream.start()
    edge = await start_edge({"m": [url]}, **QUIET)
    status, headers, body = await ask(edge, STREAM)
    assert (status, body) == (200, b"".join(events))
    assert headers["Content-Type"] == "text/event-stream"
    await upstream.close()


# --- 4. the edge's own response headers


@pytest.mark.parametrize("expose", [True, False])
async def test_an_upstreams_own_edge_headers_never_reach_the_client(start_edge, expose):
    forged = OK.replace(
        b"\r\n\r\n", b"\r\nX-Edge-Server: http://elsewhere:1\r\nX-Request-ID: theirs\r\n\r\n"
    )
    upstream = Scripted(answer(forged))
    url = await upstream.start()
    edge = await start_edge({"m": [url]}, server__expose_server=expose, **QUIET)
    for _ in range(2):  # the second answer's head comes from the cache
        status, headers, _ = await ask(edge, headers={"X-Request-ID": "mine"})
        assert status == 200
        assert headers.getall("X-Edge-Server", []) == ([only_host(edge).url] if expose else [])
        assert headers.getall("X-Request-ID") == ["mine"]
    await upstream.close()


# --- 5. a saturated connection pool


def _held(release: asyncio.Event):
    async def script(reader, writer, n):
        await release.wait()
        writer.write(YES)
        await writer.drain()
        return True

    return script


SATURABLE: dict[str, Any] = {
    **QUIET,
    "upstream__max_connections_per_server": 1,
    "upstream__pool_timeout_s": 0.2,
    # No retry may be charged: moving off a full pool sent nothing to anyone.
    "upstream__retry_ratio": 0.0,
    "upstream__retry_min_per_s": 0.0,
    "routing__policy": "round_robin",
}


async def test_a_saturated_server_sends_requests_to_another_without_blame(start_edge):
    release = asyncio.Event()
    slow, fast = Scripted(_held(release)), Scripted(answer(OK))
    slow_url, fast_url = await slow.start(), await fast.start()
    edge = await start_edge({"m": [slow_url, fast_url]}, **SATURABLE)
    held: list[asyncio.Task[Any]] = []
    try:
        while not slow.requests:  # round robin: one of the first two holds the slow server
            held.append(asyncio.create_task(ask(edge)))
            await asyncio.sleep(0.1)
        for _ in range(4):  # every other one picks the saturated server first
            status, headers, _ = await asyncio.wait_for(ask(edge), 2)
            assert status == 200 and headers["X-Edge-Server"] == fast_url
    finally:
        release.set()
    assert edge.pool.pool_timeouts >= 2
    slow_host = next(h for h in edge.view.fleet.models["m"] if h.url == slow_url)
    assert slow_host.fails_in_row == 0 and slow_host.state == "up"
    assert edge.forwarder.budget.retries == 0 and edge.forwarder.budget.denied == 0
    async with aiohttp.ClientSession() as client:
        samples = await scrape(client, edge.url)
    assert total(samples, "edge_upstream_attempts_total", outcome="pool_full") >= 2
    assert all(status == 200 for status, _, _ in await asyncio.gather(*held))
    await slow.close()
    await fast.close()


async def test_a_saturated_only_server_is_a_503_in_the_clients_dialect(start_edge):
    release = asyncio.Event()
    upstream = Scripted(_held(release))
    url = await upstream.start()
    edge = await start_edge({"m": [url]}, **SATURABLE)
    first = asyncio.create_task(ask(edge))
    await until(lambda: upstream.requests)
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    started = time.monotonic()
    try:
        status, _, answer_ = await asyncio.wait_for(ask(edge, body, "/v1/messages"), 2)
    finally:
        release.set()
    assert status == 503 and time.monotonic() - started < 1.5
    error = orjson.loads(answer_)
    assert error["type"] == "error" and error["error"]["type"] == "overloaded_error"
    assert "connections busy" in error["error"]["message"]
    host = only_host(edge)
    assert host.fails_in_row == 0
    assert (await first)[0] == 200
    await upstream.close()


async def test_the_pool_wait_gives_up_after_pool_timeout_s_and_passes_wakeups_on():
    release = asyncio.Event()
    upstream = Scripted(_held(release))
    url = await upstream.start()
    pool = make_pool(limit_per_origin=1, pool_timeout_s=0.2)
    first = asyncio.create_task(post(pool, url, head_s=10))
    await until(lambda: upstream.requests)
    started = time.monotonic()
    with pytest.raises(PoolFull):
        await asyncio.wait_for(post(pool, url), 2)
    assert 0.15 < time.monotonic() - started < 1.0
    # A waiter cancelled after its wakeup hands the slot on to the next one.
    pool.pool_timeout_s = 5.0
    second = asyncio.create_task(post(pool, url, head_s=10))
    third = asyncio.create_task(post(pool, url, head_s=10))
    await asyncio.sleep(0.05)
    release.set()
    resp = await first
    assert await resp.read() == b"yes"
    resp.close()  # back to the pool: wakes `second` ...
    second.cancel()  # ... which is gone before it could take it
    resp = await asyncio.wait_for(third, 2)
    assert await resp.read() == b"yes"
    resp.close()
    await pool.close()
    await upstream.close()


# --- 6. a client that pauses a stream


async def test_a_client_pausing_a_stream_past_the_idle_timeout_loses_nothing(start_edge):
    event = b"data: " + b"x" * 16000 + b"\n\n"
    count = 1024  # 16 MB: more than every socket buffer on the way can hold

    async def stream(reader, writer, n):
        writer.write(SSE_HEAD + chunked([event])[0])
        for _ in range(count - 1):
            writer.write(chunked([event])[0])
            await writer.drain()  # blocks while the edge has stopped reading
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    upstream = Scripted(stream)
    url = await upstream.start()
    edge = await start_edge({"m": [url]}, upstream__idle_timeout_s=0.4, **QUIET)
    host, port = edge.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(STREAM), STREAM)
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        await asyncio.sleep(1.2)  # three idle timeouts without reading a byte
        body = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    assert body.count(event) == count and body.endswith(b"\r\n0\r\n\r\n")
    assert b"error" not in body[-200:]
    h = only_host(edge)
    assert not h.stats.failing(time.monotonic(), 60.0) and h.fails_in_row == 0
    await upstream.close()


async def test_a_stream_resumed_after_a_pause_times_out_again_when_the_server_stalls(pool):
    async def stall(reader, writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
        await writer.drain()
        await asyncio.sleep(5)
        return False

    upstream = Scripted(stall)
    url = await upstream.start()
    resp = await post(pool, url)
    resp.read_timeout = 0.3
    got: list[bytes] = []
    pipe = resp.pipe(got.append)
    pipe.pause_reading()  # the client lags as the pipe starts
    await asyncio.sleep(0.6)  # paused: no idle timeout
    assert not pipe.ended.done()
    pipe.resume_reading()
    started = time.monotonic()
    with pytest.raises(TimedOut):
        await asyncio.wait_for(pipe.ended, 5)
    assert 0.25 < time.monotonic() - started < 1.0  # the timer restarted at the resume
    assert b"".join(got) == b"ab"
    resp.close()
    await upstream.close()


# --- framing and status oddities


async def test_a_body_framed_by_close_despite_a_transfer_encoding_arrives_whole(start_edge):
    # RFC 9112 6.3: a Transfer-Encoding that does not end in chunked is read until close.
    upstream = Scripted(
        answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n{}", keep=False)
    )
    url = await upstream.start()
    edge = await start_edge({"m": [url]}, **QUIET)
    status, _, body = await ask(edge)
    assert (status, body) == (200, b"{}")
    assert not only_host(edge).stats.failing(time.monotonic(), 60.0)
    await upstream.close()


async def test_a_status_below_100_is_a_bad_answer(pool):
    upstream = Scripted(answer(b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\n{}"))
    url = await upstream.start()
    with pytest.raises(Malformed):
        await post(pool, url)
    await upstream.close()
