"""The front door against hostile clients, on loopback with raw sockets (issue 15): a malformed
chunked body, a body sent on after an early answer (lingering close), slow heads and bodies,
unwanted bodies, the named bounds (head size and fields, keep-alive, connections per worker,
TCP keepalive), and request paths that could leave the /v1/ tree on a normalising host.

Each test here fails on the front door as it was before: a hang (the read bounds end it), a
reset instead of the answer, a connection never cut, or a request forwarded that must not be.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from edge.app import limits
from edge.config import ServerSettings
from edge.http.server import Limits, Reply, Request, Server
from tests.http.test_server import Edge, T, echo_body, echo_path, get, read_response, rest

CHAT = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class Front(Edge):
    """An http1.Server on 127.0.0.1 with the given limits; `connect()` opens raw sockets."""

    async def emptied(self) -> None:
        """Every connection closed on the server's side (its count released)."""
        began = time.monotonic()
        while self.server.connections:
            assert time.monotonic() - began < T, self.server.connections
            await asyncio.sleep(0.01)


@pytest.fixture
async def front() -> AsyncIterator[Callable[..., Awaitable[Front]]]:
    fronts: list[Front] = []

    async def start(handler: Any = echo_body, **bounds: Any) -> Front:
        server = Server(handler, Limits(**{"max_body": 64 * 1024, **bounds}))
        listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
        fronts.append(Front(server, listener))
        return fronts[-1]

    yield start
    for f in fronts:
        await f.stop()


class Upstream:
    """A host that answers every request with `{}` and keeps what it received: the proof that
    a refused request was never forwarded."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                self.received.append(head + await reader.readexactly(length))
                writer.write(OK)
        writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def fleet(start_edge: Any) -> AsyncIterator[tuple[Any, Upstream]]:
    """An edge (no health probes: the host sees only forwarded requests) and its one host."""
    upstream = Upstream()
    url = await upstream.start()
    edge = await start_edge({"m": [url]}, health__enabled=False)
    yield edge, upstream
    upstream.close()


async def raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


def port_of(edge: Any) -> int:
    return int(edge.url.rsplit(":", 1)[1])


def chunked_post(path: str, extra: str = "") -> bytes:
    return get(path, f"Transfer-Encoding: chunked\r\n{extra}", method="POST")


async def settled(server: Server) -> None:
    """The edge's side of every connection is gone: no socket, no handler task left."""
    began = time.monotonic()
    while server.connections:
        assert time.monotonic() - began < T, server.connections
        await asyncio.sleep(0.01)


# --- 1. a malformed chunked body ------------------------------------------------------------

BAD_CHUNKS = {
    "overlong-size": b"1" * 20 + b"\r\n",  # past 64 bits
    "cr-in-extension": b"5;a=b\rc\r\nhello\r\n0\r\n\r\n",
    "non-hex-size": b"zz\r\nhello\r\n",
    "no-crlf-after-data": b"5\r\nhelloXX0\r\n\r\n",
}
DIALECTS = {
    "/v1/chat/completions": lambda d: (
        d["error"]["type"] == "invalid_request_error" and d["detail"] == d["error"]["message"]
    ),
    "/v1/messages": lambda d: (
        d["type"] == "error" and d["error"]["type"] == "invalid_request_error"
    ),
    "/v1beta/models/m:generateContent": lambda d: (
        d["error"]["status"] == "INVALID_ARGUMENT" and d["error"]["code"] == 400
    ),
}


@pytest.mark.parametrize("bad", list(BAD_CHUNKS), ids=list(BAD_CHUNKS))
@pytest.mark.parametrize("path", list(DIALECTS), ids=["openai", "anthropic", "gemini"])
async def test_malformed_chunked_body_gets_400_in_the_dialect_and_nothing_forwarded(
    fleet, path, bad
):
    edge, upstream = fleet
    reader, writer = await raw(port_of(edge))
    # The head first: the handler is already waiting for the body when the bad chunk comes.
    writer.write(chunked_post(path) + b"5\r\n" + CHAT[:5] + b"\r\n")
    await asyncio.sleep(0.05)
    writer.write(BAD_CHUNKS[bad])
    status, headers, body = await read_response(reader)
    assert status == "HTTP/1.1 400 Bad Request" and headers["connection"] == "close"
    doc = json.loads(body)
    assert DIALECTS[path](doc), doc
    assert "malformed" in json.dumps(doc)
    assert await rest(reader) == b""
    writer.close()
    await settled(edge.web)
    assert upstream.received == []
    assert all(h.inflight == 0 for h in edge.view.fleet.models["m"])


async def test_malformed_chunked_body_fails_the_read_of_a_waiting_handler(front):
    seen: list[BaseException] = []

    async def handler(request: Request) -> None:
        try:
            await request.read()
        except Exception as exc:
            seen.append(exc)
            raise

    f = await front(handler)
    reader, writer = await f.connect()
    writer.write(chunked_post("/") + b"3\r\nabc\r\n")
    await asyncio.sleep(0.05)
    writer.write(b"3;x\ry\r\nabc\r\n")
    status, headers, body = await read_response(reader)
    assert status == "HTTP/1.1 400 Bad Request" and headers["connection"] == "close"
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert [type(e).__name__ for e in seen] == ["BadRequest"]
    assert await rest(reader) == b""
    await f.emptied()


async def test_a_pipelined_request_with_a_malformed_body_is_answered_in_its_turn(front):
    async def handler(request: Request) -> None:
        if request.path == "/slow":
            await asyncio.sleep(0.1)
        await echo_body(request)

    f = await front(handler)
    reader, writer = await f.connect()
    writer.write(get("/slow") + chunked_post("/bad") + b"3\r\nabc\r\nxyz\r\n")
    assert (await read_response(reader))[0] == "HTTP/1.1 200 OK"
    status, headers, _ = await read_response(reader)
    assert status == "HTTP/1.1 400 Bad Request" and headers["connection"] == "close"
    assert await rest(reader) == b""


async def test_a_client_that_half_closes_after_a_bad_chunk_still_gets_its_answers(front):
    async def handler(request: Request) -> None:
        if request.path == "/slow":
            await asyncio.sleep(0.1)
        await echo_body(request)

    f = await front(handler)
    reader, writer = await f.connect()
    writer.write(get("/slow") + chunked_post("/") + b"3\r\nabc\r\n-1\r\n")
    writer.write_eof()  # a FIN otherwise ends the connection (and cancels its handler) at once
    assert (await read_response(reader))[0] == "HTTP/1.1 200 OK"
    status, headers, _ = await read_response(reader)
    assert status == "HTTP/1.1 400 Bad Request" and headers["connection"] == "close"
    assert await rest(reader) == b""
    await f.emptied()


async def test_chunked_framing_that_outgrows_its_body_gets_400(front):
    """Trailer fields and chunk extensions are held (httptools joins a field's pieces) or
    skipped unseen by the parser: without a bound, a 27-byte body could bring megabytes."""
    f = await front(echo_body, max_head_bytes=4096)
    reader, writer = await f.connect()
    writer.write(chunked_post("/") + b"1b\r\n" + CHAT[:27] + b"\r\n0\r\nX-Trailer: ")
    with contextlib.suppress(ConnectionError):
        for _ in range(40):  # 640 kB of one trailer field's value
            writer.write(b"t" * 16384)
            await writer.drain()
    status, headers, body = await read_response(reader)
    assert status == "HTTP/1.1 400 Bad Request" and headers["connection"] == "close"
    assert b"chunked framing" in body


REFUSED_HEADS = {
    "te-gzip": b"POST /te HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "te-identity": b"POST /te HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\nabc",
    "te-chunked-gzip": b"POST /te HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\nabc",
    "upgrade": b"POST /up HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: x\r\n"
    b"Content-Length: 3\r\n\r\nabc",
    # Found by the fuzzing: a tunnel, and chunked framing an HTTP/1.0 hop may not know.
    "connect": b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n\r\n",
    "http10-chunked": b"POST /te HTTP/1.0\r\nConnection: keep-alive\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
}


@pytest.mark.parametrize(
    "line",
    [b"POST / HTTP/0.9", b"POST /", b"POST / HTTP/2.0"],
    ids=["0.9", "no-version", "2.0"],
)
async def test_versions_other_than_1_0_and_1_1_are_refused_with_505(front, line):
    """Found by coverage-guided fuzzing: a request line read as HTTP/0.9 reached the handler as
    keep-alive. Only HTTP/1.0 and 1.1 are served; nothing else reaches a handler."""
    seen: list[str] = []

    async def handler(request: Request) -> None:
        seen.append(request.path)
        await echo_body(request)

    f = await front(handler)
    reader, writer = await f.connect()
    writer.write(line + b"\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nab")
    status, headers, _ = await read_response(reader)
    assert status == "HTTP/1.1 505 HTTP Version Not Supported" and headers["connection"] == "close"
    assert await rest(reader) == b""
    assert seen == []


@pytest.mark.parametrize("head", list(REFUSED_HEADS), ids=list(REFUSED_HEADS))
async def test_heads_llhttp_refuses_late_never_reach_the_handler(front, head):
    """llhttp refuses these after the head's callback: the handler (which could forward the
    body) must not get them first."""
    seen: list[str] = []

    async def handler(request: Request) -> None:
        seen.append(request.path)
        await echo_body(request)

    f = await front(handler)
    reader, writer = await f.connect()
    writer.write(REFUSED_HEADS[head])
    status, headers, _ = await read_response(reader)
    assert status == "HTTP/1.1 400 Bad Request" and headers["connection"] == "close"
    assert await rest(reader) == b""
    assert seen == []


async def slow_first(request: Request) -> None:
    if request.path == "/slow":
        await asyncio.sleep(0.1)
    await echo_path(request)


async def test_requests_before_refused_bytes_are_all_answered_then_the_refusal(front):
    f = await front(slow_first)
    reader, writer = await f.connect()
    writer.write(get("/slow") + get("/b") + b"\x00 not http\r\n\r\n")
    assert (await read_response(reader))[2] == b'{"path":"/slow"}'
    assert (await read_response(reader))[2] == b'{"path":"/b"}'
    status, headers, _ = await read_response(reader)
    assert status == "HTTP/1.1 400 Bad Request" and headers["connection"] == "close"
    assert await rest(reader) == b""


async def test_requests_up_to_a_connection_close_are_all_answered(front):
    f = await front(slow_first)
    reader, writer = await f.connect()
    writer.write(get("/slow") + get("/b", "Connection: close\r\n") + get("/after"))
    assert (await read_response(reader))[2] == b'{"path":"/slow"}'
    status, headers, body = await read_response(reader)
    assert body == b'{"path":"/b"}' and headers["connection"] == "close"
    assert await rest(reader) == b""  # what came after the close is not answered


# --- 2. lingering close -----------------------------------------------------------------------


async def send_body(writer: asyncio.StreamWriter, size: int, piece: int = 16 * 1024) -> None:
    """Send `size` bytes in pieces, as a client that writes its whole body before reading."""
    with contextlib.suppress(ConnectionError):
        for _ in range(size // piece):
            writer.write(b"x" * piece)
            await writer.drain()
            await asyncio.sleep(0.001)


async def test_413_reaches_a_client_still_sending_its_body(front):
    """Closed at once, the socket would be reset by the bytes still coming, and the client's
    kernel would drop the 413 it had not read yet: about half the time on loopback."""
    f = await front(echo_body, max_body=64 * 1024)
    size = 512 * 1024
    for _ in range(8):
        reader, writer = await f.connect()
        writer.write(get("/", f"Content-Length: {size}\r\n", method="POST"))
        await send_body(writer, size)
        status, headers, body = await read_response(reader)
        assert status == "HTTP/1.1 413 Payload Too Large"
        assert headers["connection"] == "close" and body == b'{"error":"too large"}'
        assert await rest(reader) == b""  # the edge's FIN after the answer
        writer.close()
    await f.emptied()


async def test_413_through_the_edge_reaches_a_client_still_sending(fleet, start_edge):
    _, upstream = fleet
    edge = await start_edge({"m": [f"http://127.0.0.1:{upstream_port(upstream)}"]},
                            health__enabled=False, server__max_body_bytes=64 * 1024)  # fmt: skip
    size = 768 * 1024
    for _ in range(4):
        reader, writer = await raw(port_of(edge))
        writer.write(chunked_post("/v1/chat/completions"))
        with contextlib.suppress(ConnectionError):
            for _ in range(size // 8192):
                writer.write(b"2000\r\n" + b"x" * 8192 + b"\r\n")
                await writer.drain()
        status, headers, body = await read_response(reader)
        assert status == "HTTP/1.1 413 Payload Too Large" and headers["connection"] == "close"
        assert "65536" in json.loads(body)["error"]["message"]
        writer.close()
    assert upstream.received == []


def upstream_port(upstream: Upstream) -> int:
    assert upstream.server is not None
    return int(upstream.server.sockets[0].getsockname()[1])


async def test_lingering_ends_at_max_discard_bytes(front):
    f = await front(echo_body, max_body=1024, max_discard_bytes=64 * 1024, linger_s=5.0)
    reader, writer = await f.connect()
    writer.write(get("/", "Content-Length: 100000000\r\n", method="POST"))
    assert (await read_response(reader))[0] == "HTTP/1.1 413 Payload Too Large"
    began = time.monotonic()
    with pytest.raises(ConnectionError):
        for _ in range(1000):  # 16 MB: the edge stops reading long before
            writer.write(b"x" * 16384)
            await asyncio.wait_for(writer.drain(), T)
    assert time.monotonic() - began < 4.0
    await f.emptied()


async def test_lingering_ends_at_linger_s(front):
    f = await front(echo_body, max_body=1024, linger_s=0.3)
    reader, writer = await f.connect()
    writer.write(get("/", "Content-Length: 100000\r\n", method="POST"))
    assert (await read_response(reader))[0] == "HTTP/1.1 413 Payload Too Large"
    began = time.monotonic()
    await f.emptied()  # the client neither sends nor closes: cut when linger_s is over
    assert 0.25 < time.monotonic() - began < 2.0


# --- 3. slow heads and bodies -----------------------------------------------------------------


async def trickle(writer: asyncio.StreamWriter, data: bytes, every_s: float) -> None:
    with contextlib.suppress(ConnectionError):
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(every_s)


async def test_slow_head_gets_408_from_its_first_byte(front):
    f = await front(echo_path, header_timeout_s=0.3)
    reader, writer = await f.connect()
    began = time.monotonic()
    sender = asyncio.create_task(trickle(writer, get("/", "X-Slow: " + "a" * 200 + "\r\n"), 0.02))
    status, headers, body = await read_response(reader)
    elapsed = time.monotonic() - began
    assert status == "HTTP/1.1 408 Request Timeout" and headers["connection"] == "close"
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert 0.25 < elapsed < 1.5  # every byte came in time; the head as a whole did not
    assert await rest(reader) == b""
    sender.cancel()


async def test_idle_keepalive_is_its_own_bound_not_the_head_timeout(front):
    f = await front(echo_path, header_timeout_s=0.2, keepalive_timeout_s=5.0)
    reader, writer = await f.connect()
    writer.write(get("/a"))
    await read_response(reader)
    await asyncio.sleep(0.6)  # idle between requests: past header_timeout_s, within keep-alive
    writer.write(get("/b"))
    assert (await read_response(reader))[2] == b'{"path":"/b"}'


@pytest.mark.parametrize("length", [1000, 200_000], ids=["read-eagerly", "read-by-handler"])
async def test_slow_body_gets_408(front, length):
    f = await front(echo_body, max_body=1 << 20, body_grace_s=0.3, body_min_rate=2000)
    reader, writer = await f.connect()
    writer.write(get("/", f"Content-Length: {length}\r\n", method="POST"))
    began = time.monotonic()
    sender = asyncio.create_task(trickle(writer, b"x" * length, 0.02))  # ~50 bytes/s
    status, headers, body = await read_response(reader)
    assert status == "HTTP/1.1 408 Request Timeout" and headers["connection"] == "close"
    assert "slowly" in json.loads(body)["error"]["message"]
    assert 0.25 < time.monotonic() - began < 1.5
    assert await rest(reader) == b""
    sender.cancel()


async def test_a_body_at_the_minimum_rate_is_read(front):
    f = await front(echo_body, max_body=1 << 20, body_grace_s=0.2, body_min_rate=20_000)
    reader, writer = await f.connect()
    writer.write(get("/", "Content-Length: 30000\r\n", method="POST"))
    for _ in range(10):  # 3000 bytes every 50 ms: 60 kB/s, for half a second
        writer.write(b"y" * 3000)
        await asyncio.sleep(0.05)
    status, _, body = await read_response(reader)
    assert status == "HTTP/1.1 200 OK" and body == b"y" * 30000


async def test_the_body_clock_starts_at_100_continue(front):
    async def handler(request: Request) -> None:
        await asyncio.sleep(0.5)  # deciding (a key, a route) past body_grace_s
        await echo_body(request)

    f = await front(handler, body_grace_s=0.2, body_min_rate=1_000_000)
    reader, writer = await f.connect()
    writer.write(get("/", "Content-Length: 5\r\nExpect: 100-continue\r\n", method="POST"))
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), T) == (
        b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    writer.write(b"hello")
    assert (await read_response(reader))[2] == b"hello"


# --- 4. unwanted bodies -----------------------------------------------------------------------


async def unauthorized(request: Request) -> None:
    request.conn.respond(request, 401, b'{"error":"no key"}')


async def test_an_unwanted_body_too_large_to_drop_is_answered_with_close(front):
    f = await front(unauthorized, max_body=1 << 30, max_discard_bytes=64 * 1024, linger_s=0.5)
    reader, writer = await f.connect()
    writer.write(get("/", "Content-Length: 50000000\r\n", method="POST"))
    status, headers, _ = await read_response(reader)
    assert status == "HTTP/1.1 401 Unauthorized" and headers["connection"] == "close"
    began = time.monotonic()
    with pytest.raises(ConnectionError):
        while time.monotonic() - began < 5:  # a client that sends on, slowly
            writer.write(b"x" * 1024)
            await writer.drain()
            await asyncio.sleep(0.01)
    assert time.monotonic() - began < 2.0
    await f.emptied()


async def test_an_unwanted_body_dropped_slowly_is_cut_at_linger_s(front):
    f = await front(unauthorized, max_body=1 << 20, linger_s=0.3)
    reader, writer = await f.connect()
    writer.write(get("/", "Content-Length: 100000\r\n", method="POST"))
    status, headers, _ = await read_response(reader)
    assert status == "HTTP/1.1 401 Unauthorized" and "connection" not in headers  # may go on
    began = time.monotonic()
    sender = asyncio.create_task(trickle(writer, b"x" * 1000, 0.01))
    await f.emptied()
    assert 0.25 < time.monotonic() - began < 1.5
    sender.cancel()


async def test_an_unwanted_body_dropped_in_time_keeps_the_connection(front):
    f = await front(unauthorized, max_body=1 << 20)
    reader, writer = await f.connect()
    writer.write(get("/", "Content-Length: 300000\r\n", method="POST"))
    assert (await read_response(reader))[0] == "HTTP/1.1 401 Unauthorized"
    writer.write(b"x" * 300000 + get("/next", "Content-Length: 2\r\n", method="POST") + b"ab")
    status, headers, _ = await read_response(reader)
    assert status == "HTTP/1.1 401 Unauthorized" and "connection" not in headers


async def test_an_unwanted_chunked_body_is_answered_with_close_and_lingered(front):
    f = await front(unauthorized, linger_s=1.0)
    reader, writer = await f.connect()
    writer.write(chunked_post("/") + b"3\r\nabc\r\n")
    status, headers, _ = await read_response(reader)
    assert status == "HTTP/1.1 401 Unauthorized" and headers["connection"] == "close"
    writer.write(b"3\r\ndef\r\n0\r\n\r\n")  # dropped, not parsed, no reset
    assert await rest(reader) == b""


# --- 5. the named bounds ----------------------------------------------------------------------


async def test_too_many_header_fields_get_431(front):
    f = await front(echo_path, max_header_fields=20)
    reader, writer = await f.connect()
    writer.write(get("/", "".join(f"X-F{i}: v\r\n" for i in range(18))))
    assert (await read_response(reader))[0] == "HTTP/1.1 200 OK"
    writer.write(get("/", "".join(f"X-F{i}: v\r\n" for i in range(25))))
    status, headers, body = await read_response(reader)
    assert status == "HTTP/1.1 431 Request Header Fields Too Large"
    assert headers["connection"] == "close" and b"20 header fields" in body
    assert await rest(reader) == b""


async def test_max_head_bytes_is_the_configured_one(front):
    f = await front(echo_path, max_head_bytes=4096)
    reader, writer = await f.connect()
    writer.write(get("/", f"X-Big: {'a' * 3000}\r\n"))
    assert (await read_response(reader))[0] == "HTTP/1.1 200 OK"
    writer.write(get("/", f"X-Big: {'a' * 5000}\r\n"))
    status, _, body = await read_response(reader)
    assert status == "HTTP/1.1 431 Request Header Fields Too Large" and b"4 KB" in body
    # A head that never ends is cut once its bytes could not be under the limit.
    reader, writer = await f.connect()
    writer.write(b"GET / HTTP/1.1\r\nX-Endless: " + b"a" * 20000)
    assert (await read_response(reader))[0] == "HTTP/1.1 431 Request Header Fields Too Large"


async def test_one_connection_past_max_connections_gets_503_and_its_slot_comes_back(front):
    f = await front(echo_path, max_connections=2)
    held = [await f.connect(), await f.connect()]
    for reader, writer in held:
        writer.write(get("/"))
        assert (await read_response(reader))[0] == "HTTP/1.1 200 OK"
    reader, writer = await f.connect()
    writer.write(get("/"))
    status, headers, body = await read_response(reader)
    assert status == "HTTP/1.1 503 Service Unavailable" and headers["connection"] == "close"
    error = json.loads(body)
    assert error["error"]["type"] == "service_unavailable" and set(error) == {"error", "detail"}
    assert await rest(reader) == b""
    writer.close()
    held[0][1].close()  # one slot freed: the next connection is served
    began = time.monotonic()
    while len(f.server.connections) > 1:
        assert time.monotonic() - began < T
        await asyncio.sleep(0.01)
    reader, writer = await f.connect()
    writer.write(get("/again"))
    assert (await read_response(reader))[2] == b'{"path":"/again"}'


@pytest.mark.parametrize("on", [True, False])
async def test_client_sockets_have_tcp_keepalive(start_edge, on):
    edge = await start_edge({}, server__tcp_keepalive=on)
    reader, writer = await raw(port_of(edge))
    writer.write(get("/health"))
    await read_response(reader)
    (conn,) = edge.web.connections
    assert conn.transport is not None
    sock = conn.transport.get_extra_info("socket")
    assert bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)) is on
    if on and hasattr(socket, "TCP_KEEPIDLE"):
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
    writer.close()


def test_every_server_bound_reaches_the_front_door():
    settings = ServerSettings(
        max_body_bytes=5000, header_timeout_s=1.5, body_grace_s=2.5, body_min_rate=7,
        max_head_bytes=3000, max_header_fields=9, keepalive_timeout_s=4.5, max_connections=11,
        linger_s=0.7, max_discard_bytes=1234,
    )  # fmt: skip
    assert limits(settings) == Limits(
        max_body=5000, max_head_bytes=3000, max_header_fields=9, header_timeout_s=1.5,
        body_grace_s=2.5, body_min_rate=7, keepalive_timeout_s=4.5, max_connections=11,
        linger_s=0.7, max_discard_bytes=1234,
    )  # fmt: skip
    assert limits(ServerSettings()) == Limits()  # the same defaults on both sides


# --- 6. paths that could leave /v1/ -----------------------------------------------------------

UNSAFE_PATHS = [
    "/v1/../admin/reset",
    "/v1/%2e%2e/admin/reset",
    "/v1/%2E%2e/admin/reset",
    "/v1/.%2e/admin/reset",
    "/v1/chat/../../admin",
    "/v1/./chat/completions",
    "/v1/..;/admin/reset",
    "/v1/..%2fadmin",
    "/v1/x%2Fy",
    "/v1/..%5cadmin",
    "/v1/..\\admin",
    "/v1//admin",
    "/v1/%252e%252e/admin",
    "/v1/admin%00",
    "/api/0123456789abcdef01234567/v1/../../admin",
    "/v1beta/models/../../admin:generateContent",
    "/v1/messages/../../admin",
]


@pytest.mark.parametrize("path", UNSAFE_PATHS)
async def test_paths_that_could_leave_v1_are_refused_and_not_forwarded(fleet, path):
    edge, upstream = fleet
    reader, writer = await raw(port_of(edge))
    writer.write(get(path, f"Content-Length: {len(CHAT)}\r\n", method="POST") + CHAT)
    status, _, body = await read_response(reader)
    assert status == "HTTP/1.1 400 Bad Request", body
    doc = json.loads(body)
    if "/v1/messages" in path:
        assert doc["type"] == "error"  # Anthropic's shape: the path says the dialect
    elif path.startswith("/v1beta/"):
        assert doc["error"]["status"] == "INVALID_ARGUMENT"
    else:
        assert "segments" in doc["error"]["message"]
    writer.close()
    assert upstream.received == []


@pytest.mark.parametrize(
    "path",
    ["/v1/echo", "/v1/audio/speech?x=%2e%2e", "/v1/.well-known/x", "/v1/a..b/c", "/v1/x%41y"],
)
async def test_other_paths_are_forwarded_byte_for_byte(fleet, path):
    edge, upstream = fleet
    reader, writer = await raw(port_of(edge))
    writer.write(get(path, f"Content-Length: {len(CHAT)}\r\n", method="POST") + CHAT)
    status, _, _ = await read_response(reader)
    assert status == "HTTP/1.1 200 OK"
    assert upstream.received[-1].startswith(b"POST " + path.encode() + b" HTTP/1.1\r\n")
    writer.close()


# --- the well-behaved client, unchanged -------------------------------------------------------


async def test_keepalive_pipelining_continue_and_http10_together(front):
    f = await front(echo_body)
    reader, writer = await f.connect()
    writer.write(
        get("/", "Content-Length: 2\r\n", method="POST") + b"ab"
        + chunked_post("/") + b"2\r\ncd\r\n0\r\n\r\n"
        + get("/", "Content-Length: 2\r\nExpect: 100-continue\r\n", method="POST")
    )  # fmt: skip
    assert (await read_response(reader))[2] == b"ab"
    assert (await read_response(reader))[2] == b"cd"
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), T) == (
        b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    writer.write(b"ef")
    status, headers, body = await read_response(reader)
    assert (status, body) == ("HTTP/1.1 200 OK", b"ef") and "connection" not in headers
    reader, writer = await f.connect()
    writer.write(get("/", "Content-Length: 2\r\n", method="POST", version="1.0") + b"gh")
    status, headers, body = await read_response(reader)
    assert body == b"gh" and headers["connection"] == "close"
    assert await rest(reader) == b""


async def test_a_reply_handler_is_unchanged(front):
    async def handler(request: Request) -> None:
        request.conn.reply(request, Reply(b"{}", 201))

    f = await front(handler)
    reader, writer = await f.connect()
    writer.write(get("/") * 3)
    for _ in range(3):
        status, headers, _ = await read_response(reader)
        assert status == "HTTP/1.1 201 Created" and "connection" not in headers
