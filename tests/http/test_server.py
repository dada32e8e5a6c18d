"""The HTTP/1.1 front door (edge/http/server.py) on loopback, checked byte by byte with raw sockets:
whole replies (GET, HEAD, keep-alive, pipelining in order), request bodies (Content-Length,
chunked, over the limit, `Expect: 100-continue`), streamed responses (chunked, close-delimited
for HTTP/1.0, known length), parser errors (garbage, an oversized head), `Connection: close`,
a client that goes away mid-handler, a handler that raises, `Server.shutdown` (idle, busy, past
the deadline), the keep-alive sweep, and write backpressure reaching `Connection.source`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from email.utils import parsedate_to_datetime
from typing import Any

import pytest

from edge.errors import PayloadTooLarge
from edge.http.server import Connection, Handler, Limits, Reply, Request, Server
from tests.fuzzing.harness import FakeTransport as RecordingTransport

T = 3.0  # every read is bounded: a hung server fails the test instead of stalling the run


class Edge:
    """One running Server on 127.0.0.1 and the raw client sockets opened to it."""

    def __init__(self, server: Server, listener: asyncio.Server) -> None:
        self.server = server
        self.listener = listener
        self.port = listener.sockets[0].getsockname()[1]
        self.writers: list[asyncio.StreamWriter] = []

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers.append(writer)
        return reader, writer

    async def stop(self) -> None:
        self.listener.close()
        await self.server.shutdown(1.0)  # also cancels the sweep timer
        await self.listener.wait_closed()
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@pytest.fixture
async def start():
    edges: list[Edge] = []

    async def start(handler, max_body: int = 100, **limits: Any) -> Edge:
        server = Server(handler, Limits(max_body=max_body, **limits))
        listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
        edges.append(Edge(server, listener))
        return edges[-1]

    yield start
    for edge in edges:
        await edge.stop()


async def read_head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), T)
    status, *lines = raw.decode("latin-1").split("\r\n")[:-2]
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"duplicate header {name}"
        headers[name.lower()] = value.strip()
    return status, headers


async def read_response(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    status, headers = await read_head(reader)
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), T)
    return status, headers, body


async def rest(reader: asyncio.StreamReader) -> bytes:
    """Whatever comes before the server closes (b"" if it closes at once, or resets)."""
    try:
        return await asyncio.wait_for(reader.read(), T)
    except ConnectionResetError:
        return b""


def get(path: str = "/", extra: str = "", method: str = "GET", version: str = "1.1") -> bytes:
    return f"{method} {path} HTTP/{version}\r\nHost: t\r\n{extra}\r\n".encode()


async def echo_path(request: Request) -> None:
    request.conn.reply(request, Reply(b'{"path":"%s"}' % request.path.encode()))


async def echo_body(request: Request) -> None:
    try:
        body = await request.read()
    except PayloadTooLarge:
        request.conn.respond(request, 413, b'{"error":"too large"}')
        return
    request.conn.reply(request, Reply(body, content_type="application/octet-stream"))


async def test_get_reply_and_keep_alive(start):
    edge = await start(echo_path)
    reader, writer = await edge.connect()
    writer.write(get("/a?x=1"))
    status, headers, body = await read_response(reader)
    assert status == "HTTP/1.1 200 OK"
    assert headers["content-type"] == "application/json"
    assert body == b'{"path":"/a"}'
    assert headers["content-length"] == str(len(body))
    assert abs(parsedate_to_datetime(headers["date"]).timestamp() - time.time()) < 60
    assert "connection" not in headers and "transfer-encoding" not in headers

    writer.write(get("/b"))
    status, _, body = await read_response(reader)
    assert (status, body) == ("HTTP/1.1 200 OK", b'{"path":"/b"}')
    assert len(edge.server.connections) == 1 and edge.server.requests == 2


async def test_head_announces_length_but_sends_no_body(start):
    edge = await start(echo_path)
    reader, writer = await edge.connect()
    writer.write(get("/abc", method="HEAD"))
    status, headers = await read_head(reader)
    assert status == "HTTP/1.1 200 OK"
    assert headers["content-length"] == str(len(b'{"path":"/abc"}'))
    # Had a body followed the head, it would be read here instead of the next status line.
    writer.write(get("/next"))
    status, _, body = await read_response(reader)
    assert (status, body) == ("HTTP/1.1 200 OK", b'{"path":"/next"}')


async def test_pipelined_requests_are_answered_in_order(start):
    begun: list[str] = []

    async def handler(request: Request) -> None:
        begun.append(request.path)
        if request.path == "/slow":
            await asyncio.sleep(0.2)
        await echo_path(request)

    edge = await start(handler)
    reader, writer = await edge.connect()
    writer.write(get("/slow") + get("/a") + get("/b"))
    bodies = [(await read_response(reader))[2] for _ in range(3)]
    assert bodies == [b'{"path":"/slow"}', b'{"path":"/a"}', b'{"path":"/b"}']
    assert begun == ["/slow", "/a", "/b"]  # one handler at a time, not just ordered output


async def test_content_length_and_chunked_bodies_are_read_whole(start):
    edge = await start(echo_body)
    reader, writer = await edge.connect()
    writer.write(get("/", "Content-Length: 11\r\n", method="POST") + b"hello world")
    status, headers, body = await read_response(reader)
    assert (status, body) == ("HTTP/1.1 200 OK", b"hello world")
    assert headers["content-type"] == "application/octet-stream"

    # Pieces in separate writes: the handler runs at the end of the head and must wait.
    writer.write(get("/", "Transfer-Encoding: chunked\r\n", method="POST") + b"3\r\nhel\r\n")
    for piece in (b"2\r\nlo\r\n", b"6\r\n there\r\n", b"0\r\n\r\n"):
        await asyncio.sleep(0.02)
        writer.write(piece)
    status, headers, body = await read_response(reader)
    assert (status, body) == ("HTTP/1.1 200 OK", b"hello there")
    assert "connection" not in headers  # a body read whole leaves the connection usable


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_over_the_limit_gets_413_and_close(start, chunked):
    edge = await start(echo_body, max_body=100)
    reader, writer = await edge.connect()
    if chunked:
        writer.write(
            get("/", "Transfer-Encoding: chunked\r\n", method="POST")
            + b"64\r\n" + b"a" * 100 + b"\r\n1\r\nb\r\n0\r\n\r\n"
        )  # fmt: skip
    else:
        writer.write(get("/", "Content-Length: 200\r\n", method="POST") + b"a" * 200)
    status, headers, body = await read_response(reader)
    assert status == "HTTP/1.1 413 Payload Too Large"
    assert body == b'{"error":"too large"}'
    assert headers["connection"] == "close"
    assert await rest(reader) == b""


async def test_expect_100_continue(start):
    edge = await start(echo_body, max_body=100)
    reader, writer = await edge.connect()
    writer.write(get("/", "Content-Length: 5\r\nExpect: 100-continue\r\n", method="POST"))
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), T) == (
        b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    writer.write(b"hello")
    status, _, body = await read_response(reader)
    assert (status, body) == ("HTTP/1.1 200 OK", b"hello")


async def test_expect_over_the_limit_gets_413_without_continue(start):
    edge = await start(echo_body, max_body=100)
    reader, writer = await edge.connect()
    writer.write(get("/", "Content-Length: 1000\r\nExpect: 100-continue\r\n", method="POST"))
    status, headers, _ = await read_response(reader)  # the first status line is the 413
    assert status == "HTTP/1.1 413 Payload Too Large"
    assert headers["connection"] == "close"
    assert await rest(reader) == b""


async def stream(request: Request) -> None:
    length = int(request.query["len"]) if "len" in request.query else None
    request.conn.start(request, 200, "OK", b"Content-Type: text/plain\r\n", length, b"one,")
    await asyncio.sleep(0.01)
    request.conn.write(b"two,")
    request.conn.write(b"three")
    request.conn.end()


async def test_stream_of_unknown_length_is_chunked_for_http11(start):
    edge = await start(stream)
    reader, writer = await edge.connect()
    writer.write(get("/"))
    status, headers = await read_head(reader)
    assert status == "HTTP/1.1 200 OK"
    assert headers["transfer-encoding"] == "chunked" and "content-length" not in headers
    pieces = []
    while True:
        size = int(await asyncio.wait_for(reader.readuntil(b"\r\n"), T), 16)
        piece = await asyncio.wait_for(reader.readexactly(size + 2), T)
        assert piece.endswith(b"\r\n")
        pieces.append(piece[:-2])
        if size == 0:
            break
    assert pieces == [b"one,", b"two,", b"three", b""]
    writer.write(get("/", method="HEAD"))  # still open for the next request
    assert (await read_head(reader))[0] == "HTTP/1.1 200 OK"


async def test_stream_to_http10_is_close_delimited(start):
    edge = await start(stream)
    reader, writer = await edge.connect()
    writer.write(get("/", version="1.0"))
    _, headers = await read_head(reader)
    assert headers["connection"] == "close"
    assert "transfer-encoding" not in headers and "content-length" not in headers
    assert await rest(reader) == b"one,two,three"


async def test_stream_of_known_length_is_unframed(start):
    edge = await start(stream)
    reader, writer = await edge.connect()
    writer.write(get("/?len=13"))
    status, headers, body = await read_response(reader)
    assert headers["content-length"] == "13" and "transfer-encoding" not in headers
    assert body == b"one,two,three"
    writer.write(get("/?len=13"))  # no stray framing bytes left before the next answer
    assert (await read_response(reader))[2] == b"one,two,three"


async def test_garbage_gets_400_json_and_close(start):
    edge = await start(echo_path)
    reader, writer = await edge.connect()
    writer.write(b"\x00\x01 this is not http\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert status == "HTTP/1.1 400 Bad Request"
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert await rest(reader) == b""


def huge_head(size: int) -> bytes:
    return get("/", f"X-Big: {'a' * size}\r\n")


async def test_oversized_head_is_refused_and_closed(start):
    edge = await start(echo_path)
    reader, writer = await edge.connect()
    writer.write(huge_head(60 * 1024))  # under the limit: served
    assert (await read_response(reader))[0] == "HTTP/1.1 200 OK"
    writer.write(huge_head(70 * 1024))
    status, headers, _ = await read_response(reader)
    assert status == "HTTP/1.1 431 Request Header Fields Too Large"
    assert headers["connection"] == "close"
    assert await rest(reader) == b""


async def test_oversized_head_gets_431(start):
    edge = await start(echo_path)
    reader, writer = await edge.connect()
    writer.write(huge_head(70 * 1024))
    status, _, body = await read_response(reader)
    assert status == "HTTP/1.1 431 Request Header Fields Too Large"
    assert b"64 KB" in body


async def test_connection_close_from_client(start):
    edge = await start(echo_path)
    reader, writer = await edge.connect()
    writer.write(get("/", "Connection: close\r\n"))
    status, headers, body = await read_response(reader)
    assert status == "HTTP/1.1 200 OK" and body == b'{"path":"/"}'
    assert headers["connection"] == "close"
    assert await rest(reader) == b""


def parked() -> tuple[Handler, asyncio.Event, asyncio.Event]:
    """A handler that waits until cancelled: (handler, entered, cancelled)."""
    entered, cancelled = asyncio.Event(), asyncio.Event()

    async def handler(request: Request) -> None:
        entered.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    return handler, entered, cancelled


async def test_client_gone_cancels_its_handler(start):
    handler, entered, cancelled = parked()
    edge = await start(handler)
    _, writer = await edge.connect()
    writer.write(get("/"))
    await asyncio.wait_for(entered.wait(), T)
    writer.close()
    await writer.wait_closed()
    await asyncio.wait_for(cancelled.wait(), 1.0)
    await asyncio.sleep(0.01)  # connection_lost has run by now on the server's side
    assert not edge.server.connections


async def test_handler_error_gives_500_and_logs_without_the_body(start, caplog):
    async def handler(request: Request) -> None:
        await request.read()
        raise RuntimeError("handler failed")

    edge = await start(handler)
    reader, writer = await edge.connect()
    secret = b'{"prompt":"sk-do-not-log-this"}'
    writer.write(get("/", f"Content-Length: {len(secret)}\r\n", method="POST") + secret)
    with caplog.at_level(logging.ERROR, logger="edge.http"):
        status, _, body = await read_response(reader)
    assert status == "HTTP/1.1 500 Internal Server Error"
    assert json.loads(body)["error"]["type"] == "server_error"
    records = [r for r in caplog.records if r.name == "edge.http"]
    assert records and records[0].levelno == logging.ERROR
    assert "handler failed" in caplog.text
    assert "sk-do-not-log-this" not in caplog.text


async def test_shutdown_closes_an_idle_connection_at_once(start):
    edge = await start(echo_path)
    reader, writer = await edge.connect()
    writer.write(get("/"))
    await read_response(reader)
    began = time.monotonic()
    await asyncio.wait_for(edge.server.shutdown(5.0), T)
    assert time.monotonic() - began < 1.0
    assert await rest(reader) == b""


async def test_shutdown_lets_a_busy_connection_finish_then_closes_it(start):
    entered, release = asyncio.Event(), asyncio.Event()

    async def handler(request: Request) -> None:
        entered.set()
        await release.wait()
        await echo_path(request)

    edge = await start(handler)
    reader, writer = await edge.connect()
    writer.write(get("/busy"))
    await asyncio.wait_for(entered.wait(), T)
    drain = asyncio.create_task(edge.server.shutdown(5.0))
    await asyncio.sleep(0.1)
    assert not drain.done()
    release.set()
    status, headers, body = await read_response(reader)
    assert (status, body) == ("HTTP/1.1 200 OK", b'{"path":"/busy"}')
    assert headers["connection"] == "close"
    assert await rest(reader) == b""
    await asyncio.wait_for(drain, T)


async def test_shutdown_cancels_a_handler_busy_past_the_deadline(start):
    handler, entered, cancelled = parked()
    edge = await start(handler)
    reader, writer = await edge.connect()
    writer.write(get("/"))
    await asyncio.wait_for(entered.wait(), T)
    began = time.monotonic()
    await asyncio.wait_for(edge.server.shutdown(0.2), T)
    assert 0.15 < time.monotonic() - began < 2.0
    assert cancelled.is_set()
    assert await rest(reader) == b""
    assert not edge.server.connections


async def test_keepalive_sweep_closes_an_idle_connection(start):
    edge = await start(echo_path, keepalive_timeout_s=0.3)
    reader, writer = await edge.connect()
    writer.write(get("/"))
    await read_response(reader)
    began = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 6.0) == b""
    # Not before its keep-alive ran out (minus the time the answer took to arrive).
    assert 0.2 < time.monotonic() - began < 6.0


class FakeTransport:
    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default


class FakeSource:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")

    def stop(self) -> None:
        self.calls.append("stop")


async def test_write_backpressure_reaches_the_source():
    server = Server(echo_path, Limits(max_body=100))
    conn = Connection(server)
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    conn.pause_writing()  # no source yet: only the flag
    assert conn.paused
    conn.resume_writing()

    source = FakeSource()
    conn.source = source
    conn.pause_writing()
    assert conn.paused and source.calls == ["pause"]
    drained = asyncio.create_task(conn.drain())
    await asyncio.sleep(0.01)
    assert not drained.done()  # a relay waiting on drain() stays parked while paused
    conn.resume_writing()
    await asyncio.wait_for(drained, T)
    assert not conn.paused and source.calls == ["pause", "resume"]
    server.forget(conn)


async def settled(done: Any) -> None:
    for _ in range(100):
        if done():
            return
        await asyncio.sleep(0)
    raise AssertionError("not settled in 100 loop turns")


async def test_the_response_and_the_connection_go_through_their_states():
    """`Connection`'s explicit states, as its repr names them: a chunked answer to a 1.1
    client (NONE -> CHUNKED -> ENDED, the connection OPEN), then an answer framed by the close
    to a 1.0 client (UNTIL_CLOSE, the connection CLOSING), then the loss (CLOSED: dropped)."""
    seen: list[str] = []
    go = asyncio.Event()

    async def handler(request: Request) -> None:
        conn = request.conn
        seen.append(repr(conn))
        conn.start(request, 200, "OK", b"", None, b"a")
        seen.append(repr(conn))
        assert conn.chunked != (request.version == "1.0") and not conn.sized
        await go.wait()
        conn.write(b"b")
        conn.end()
        seen.append(repr(conn))

    server = Server(handler, Limits())
    conn = Connection(server)
    transport = RecordingTransport(conn)
    conn.connection_made(transport)
    conn.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await settled(lambda: len(seen) == 2)
    assert "OPEN reading=IDLE response=NONE busy=True" in seen[0]
    assert "OPEN reading=IDLE response=CHUNKED" in seen[1]
    go.set()
    await settled(lambda: len(seen) == 3)
    assert "OPEN reading=IDLE response=ENDED" in seen[2]
    assert transport.out.endswith(b"\r\n\r\n1\r\na\r\n1\r\nb\r\n0\r\n\r\n")

    seen.clear()
    transport.out.clear()
    conn.data_received(b"GET / HTTP/1.0\r\n\r\n")
    await settled(lambda: len(seen) == 3)
    assert "CLOSING reading=IDLE response=UNTIL_CLOSE" in seen[1]
    assert "CLOSING reading=IDLE response=ENDED" in seen[2]
    assert b"Connection: close\r\n" in transport.out and transport.out.endswith(b"\r\n\r\nab")
    await settled(lambda: transport.lost)  # the close after the last answer
    assert "CLOSED" in repr(conn)
    written = bytes(transport.out)
    conn.write_raw(b"late")
    conn.write(b"late")
    assert transport.out == written  # a lost connection takes nothing


async def test_requests_with_the_same_fields_share_them_and_keep_their_own_length(start):
    seen: list[Request] = []

    async def handler(request: Request) -> None:
        seen.append(request)
        request.conn.reply(request, Reply(await request.read()))

    edge = await start(handler)
    reader, writer = await edge.connect()
    for body, agent in ((b"ab", "x"), (b"abcd", "x"), (b"ab", "y")):
        head = f"POST / HTTP/1.1\r\nHost: t\r\nUser-Agent: {agent}\r\n"
        writer.write(head.encode() + b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        assert (await read_response(reader))[2] == body
    first, second, other = seen
    assert first.fields is second.fields and other.fields is not first.fields
    assert [r.content_length for r in seen] == [2, 4, 2]
    assert "Content-Length" not in first.headers and first.headers["User-Agent"] == "x"


async def test_a_body_answered_without_reading_is_dropped_and_the_connection_goes_on(start):
    seen: list[Request] = []

    async def not_found(request: Request) -> None:
        seen.append(request)
        request.conn.respond(request, 404, b'{"error":"no such path"}')

    edge = await start(not_found, max_body=1 << 20)
    reader, writer = await edge.connect()
    size = 200_000  # past the eager read: the handler answers while the body is on its way
    writer.write(get("/nowhere", f"Content-Length: {size}\r\n", method="POST"))
    status, headers, _ = await read_response(reader)
    assert status == "HTTP/1.1 404 Not Found" and "connection" not in headers
    for _ in range(size // 10_000):
        writer.write(b"x" * 10_000)
        await writer.drain()
    writer.write(get("/after"))
    status, _, body = await read_response(reader)
    assert (status, body) == ("HTTP/1.1 404 Not Found", b'{"error":"no such path"}')
    assert [r.path for r in seen] == ["/nowhere", "/after"]
    # Nothing of the unread body was kept.
    assert seen[0].body == b"" and not seen[0]._chunks


async def test_an_unmet_expect_100_continue_ends_the_connection_after_the_answer(start):
    async def not_found(request: Request) -> None:
        request.conn.respond(request, 404, b'{"error":"no such path"}')

    edge = await start(not_found, max_body=1 << 20)
    reader, writer = await edge.connect()
    writer.write(
        get("/nowhere", "Content-Length: 200000\r\nExpect: 100-continue\r\n", method="POST")
    )
    status, headers, _ = await read_response(reader)  # no 100 Continue before it
    assert status == "HTTP/1.1 404 Not Found" and headers["connection"] == "close"
    assert await rest(reader) == b""
