"""The lean upstream client against a scripted raw HTTP/1.1 server on loopback."""

from __future__ import annotations

import asyncio
import sys

import pytest

from edge.http.client import (
    ConnectFailed,
    Disconnected,
    Malformed,
    TimedOut,
    UpstreamPool,
    UpstreamResponse,
    _Conn,
)
from edge.http.heads import BadField, render
from tests.procs import free_port
from tests.rawupstream import Scripted as Server
from tests.rawupstream import answer

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture
async def pool():
    p = UpstreamPool(connect_timeout_s=2, keepalive_s=30, limit_per_origin=8, ssl_context=None)
    yield p
    await p.close()


async def post(pool: UpstreamPool, url: str, headers=(), head_s: float = 2.0):
    block = render(headers)
    return await pool.post(url, "/v1/x?a=1", block, b'{"model":"m"}', head_s)


def conn_of(resp: UpstreamResponse) -> _Conn:
    conn = resp._conn
    assert conn is not None
    return conn


async def test_keep_alive_reuses_one_connection_and_sends_exact_request(pool):
    server = Server(answer(OK))
    url = await server.start()
    for _ in range(3):
        resp = await post(pool, url, [("X-A", "1")])
        assert resp.status == 200 and await resp.read() == b"ok"
        resp.close()
    assert server.connections == 1 and pool.connects == 1
    host = url.removeprefix("http://").encode()
    assert server.requests[0] == (
        b"POST /v1/x?a=1 HTTP/1.1\r\nHost: " + host + b"\r\nX-A: 1\r\n"
        b'Content-Length: 13\r\n\r\n{"model":"m"}'
    )
    assert "idle=1" in repr(pool)
    await server.close()


async def test_a_pooled_connection_the_server_closed_is_retried_fresh(pool):
    server = Server(answer(OK, keep=False))  # answers, then closes its end
    url = await server.start()
    for _ in range(3):
        resp = await post(pool, url)
        assert await resp.read() == b"ok"
        resp.close()
        await asyncio.sleep(0.05)  # the close reaches the pool while the connection is idle
    assert server.connections == 3 and len(server.requests) == 3
    await server.close()


async def test_stale_connection_closed_during_send_is_resent_once(pool):
    first = True

    async def script(reader, writer, n):
        nonlocal first
        if first:  # answer, keep the connection, then drop it without a word
            first = False
            writer.write(OK)
            await writer.drain()
            return await asyncio.sleep(0.2, result=False)
        writer.write(OK)
        return True

    server = Server(script)
    url = await server.start()
    resp = await post(pool, url)
    assert await resp.read() == b"ok"
    resp.close()
    await asyncio.sleep(0.05)
    resp = await post(pool, url)  # may meet the dying connection; never fails because of it
    assert await resp.read() == b"ok"
    resp.close()
    await server.close()


async def test_chunked_close_delimited_and_interim_responses(pool):
    chunked = (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    server = Server(answer(chunked))
    url = await server.start()
    resp = await post(pool, url)
    assert resp.status == 200 and await resp.read() == b"abcde"
    assert resp.content_length is None
    resp.close()
    await server.close()
    server = Server(answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil eof", False))
    url = await server.start()
    resp = await post(pool, url)
    assert await resp.read() == b"until eof"
    resp.close()
    await server.close()


async def test_body_cut_short_raises_disconnected(pool):
    server = Server(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", False))
    url = await server.start()
    resp = await post(pool, url)
    with pytest.raises(Disconnected):
        await resp.read()
    resp.close()
    await server.close()


async def test_malformed_response_and_smuggling_headers(pool):
    server = Server(answer(b"NOT HTTP AT ALL\r\n\r\n", False))
    url = await server.start()
    with pytest.raises(Malformed):
        await post(pool, url)
    with pytest.raises(BadField):
        await post(pool, url, [("X-A", "1\r\nX-Injected: yes")])
    with pytest.raises(Malformed):
        await pool.post(url, "/v1/x HTTP/1.1\r\nX: y", b"", b"", 1)
    await server.close()


async def test_backpressure_pauses_reading_and_loses_nothing(pool):
    body = bytes(range(256)) * 8192  # 2 MiB
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    server = Server(answer(head + body))
    url = await server.start()
    resp = await post(pool, url)
    await asyncio.sleep(0.2)  # nobody reads: the buffer stops near the high-water mark
    assert resp._paused and resp._size < len(body)
    assert await resp.read() == body
    resp.close()
    await server.close()


async def test_limit_per_origin_queues_instead_of_opening_more():
    pool = UpstreamPool(connect_timeout_s=2, keepalive_s=30, limit_per_origin=1, ssl_context=None)

    async def slow(reader, writer, n):
        await asyncio.sleep(0.1)
        writer.write(OK)
        return True

    server = Server(slow)
    url = await server.start()

    async def one():
        resp = await post(pool, url)
        data = await resp.read()
        resp.close()
        return data

    assert list(await asyncio.gather(one(), one(), one())) == [b"ok"] * 3
    assert server.connections == 1
    await pool.close()
    await server.close()


async def test_timeouts_head_read_and_total(pool):
    calls = 0

    async def stall(reader, writer, n):
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(5)  # no head at all
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
        await writer.drain()
        await asyncio.sleep(5)  # then a stall mid-body
        return False

    server = Server(stall)
    url = await server.start()
    with pytest.raises(TimedOut, match="before the first byte"):
        await post(pool, url, head_s=0.2)
    resp = await post(pool, url)
    resp.read_timeout = 0.2
    assert await resp.readany() == b"ab"
    with pytest.raises(TimedOut):
        await resp.readany()
    resp.close()
    resp = await post(pool, url)
    resp.read_timeout = 10
    resp.set_deadline(0.2)
    assert await resp.readany() == b"ab"
    with pytest.raises(TimedOut, match="total"):
        await resp.readany()
    resp.close()
    await server.close()


async def test_connect_refused(pool):
    with pytest.raises(ConnectFailed, match="connect failed"):
        await post(pool, f"http://127.0.0.1:{free_port()}")
    assert "open=0" in repr(pool)


async def test_pipe_hands_every_piece_to_the_sink_and_pauses_on_request(pool):
    pieces = [b"data: %d\n\n" % i for i in range(50)]

    async def stream(reader, writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in pieces:
            writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.002)
        writer.write(b"0\r\n\r\n")
        return True

    server = Server(stream)
    url = await server.start()
    resp = await post(pool, url)
    first = await resp.readany()
    got: list[bytes] = []
    pipe = resp.pipe(got.append)
    pipe.pause_reading()  # the client lags: nothing arrives while paused
    assert [resp.piping, conn_of(resp).pipe] == [pipe, pipe]  # the connection feeds it
    await asyncio.sleep(0.1)
    held = len(got)
    pipe.resume_reading()
    await asyncio.wait_for(pipe.ended, 5)
    assert held <= 2  # at most what was already buffered before the pause took effect
    assert first + b"".join(got) == b"".join(pieces)
    assert pipe.piped == pipe.body_piped == len(b"".join(got)) and pipe.last == got[-1]
    assert conn_of(resp).pipe is None  # the body ended: the connection no longer feeds it
    resp.close()
    # Closed, the response lets go of the pipe, and nothing else holds it (no timer, no cycle):
    # it goes with the relay's last reference, not with the next run of the collector.
    assert resp.piping is None and sys.getrefcount(pipe) == 2  # `pipe`, and the call's argument
    assert "idle=1" in repr(pool)  # read to the end: the connection went back to the pool
    await server.close()


async def test_pipe_fails_on_an_idle_gap_and_on_a_cut_body(pool):
    calls = 0

    async def stall(reader, writer, n):
        nonlocal calls
        calls += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
        await writer.drain()
        if calls == 1:
            await asyncio.sleep(5)  # a gap longer than the read timeout
        return False  # the second: closed with 8 bytes missing

    server = Server(stall)
    url = await server.start()
    resp = await post(pool, url)
    resp.read_timeout = 0.3
    got: list[bytes] = []
    with pytest.raises(TimedOut):
        await asyncio.wait_for(resp.pipe(got.append).ended, 5)
    assert b"".join(got) == b"ab"
    resp.close()
    resp = await post(pool, url)
    with pytest.raises(Disconnected):
        await asyncio.wait_for(resp.pipe(got.append).ended, 5)
    resp.close()
    await server.close()


async def test_a_connection_paused_at_the_end_of_a_body_goes_back_reading(pool):
    server = Server(answer(OK))
    url = await server.start()
    resp = await post(pool, url)

    def lagging(data: bytes) -> None:
        assert resp.piping is not None
        resp.piping.pause_reading()  # the client's buffer filled on the last piece

    await asyncio.wait_for(resp.pipe(lagging).ended, 5)
    resp.close()
    # The same pooled connection: still paused, it would never read this answer.
    again = await post(pool, url, head_s=2.0)
    assert await asyncio.wait_for(again.read(), 5) == b"ok"
    again.close()
    assert server.connections == 1
    await server.close()
