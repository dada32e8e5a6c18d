"""Property-based fuzzing of the front door (edge/http/server.py): valid requests, the same requests
broken on purpose, and random bytes, each delivered in random pieces, to a `Server` whose handler
answers (read the body or not, whole replies or streamed ones). Most examples go through the
protocol object with a fake transport on a real event loop (exact pieces, fast); some through a
loopback socket; some through the whole edge to a recording host.

What must hold for every input, compared with a reference parser written from RFC 9112
(tests/fuzzing/reference.py):
- the handler sees only requests the reference accepts, as the reference reads them (method,
  target, fields, Content-Length, keep-alive, body); of a request whose body is cut or broken
  it may see the head, never a body;
- the edge's output is well-formed HTTP/1.1: one response per handled request, in order, then
  at most one refusal of its own, nothing after a Connection: close;
- a stream the reference calls complete, closed or malformed ends, without the client doing
  anything, in answers (and a close where the reference says so) within a second: no hang;
- no exception reaches the loop's exception handler, no error is logged, and once the client
  has gone every connection and handler is gone too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from edge.errors import EdgeError
from edge.http.server import Limits, Request, Server
from tests.fuzzing import (
    FakeTransport,
    Harness,
    ModelHost,
    Parsed,
    Reply,
    Wire,
    cut,
    cuts,
    edge_responses,
    fuzz,
    mutate,
    parse_requests,
    settle,
    soup,
    start_worker,
    talk,
)

ENDS = st.sampled_from(["wait", "wait", "close", "reset"])  # what the client does once it sent all
PLANS = ("read", "read", "ignore", "stream", "sized", "yield")
SETTLE_S = 1.0  # the handler does no I/O: a second without an answer is a hang
GONE_S = 0.5  # after the client's close, well below linger_s (the bound of a lingering close)


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.close()


# --- what a client sends ---------------------------------------------------------------------

NAMES = (b"Host", b"User-Agent", b"Accept", b"X-Request-Id", b"Content-Type", b"Authorization")
VALUES = (b"a", b"", b"application/json", b"Bearer k-1", b"x y\tz", b"caf\xc3\xa9", b"1, 2")
EXTS = (b"", b"", b";a=b", b';name="v a l"', b";x", b";a=1;b")
TRAILERS = (b"", b"", b"X-Trailer: t\r\n", b"A: 1\r\nB: 2\r\n")


METHODS = st.sampled_from([b"GET", b"POST", b"POST", b"POST", b"HEAD", b"PUT"])
TARGETS = st.sampled_from([b"/", b"/v1/chat/completions", b"/a?b=c&d", b"/%41b", b"*"])
BODIES = st.one_of(st.binary(max_size=40), st.sampled_from([b"x" * 65_537, b"y" * 300]))


@st.composite
def request(
    draw: st.DrawFn, methods: st.SearchStrategy[bytes] = METHODS,
    targets: st.SearchStrategy[bytes] = TARGETS, bodies: st.SearchStrategy[bytes] = BODIES,
) -> bytes:  # fmt: skip
    """One valid request: any method, target and version the edge meets, a few fields, and a
    body sent with Content-Length or chunked (random chunks, extensions, trailers), maybe with
    Expect: 100-continue or Connection: close."""
    method, target = draw(methods), draw(targets)
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.1", b"1.0"]))
    fields = draw(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)), max_size=4))
    head = b"%s %s HTTP/%s\r\n" % (method, target, version)
    head += b"".join(b"%s: %s\r\n" % f for f in fields)
    head += draw(st.sampled_from([b"", b"Connection: close\r\n", b"Connection: keep-alive\r\n"]))
    body = draw(bodies)
    chunked = version == b"1.1" and draw(st.integers(0, 2)) == 0
    if not body and not chunked and draw(st.booleans()):
        return head + b"\r\n"
    if draw(st.integers(0, 4)) == 0:
        head += b"Expect: 100-continue\r\n"
    if not chunked:
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    return head + b"Transfer-Encoding: chunked\r\n\r\n" + draw(chunked_body(body))


@st.composite
def chunked_body(draw: st.DrawFn, body: bytes) -> bytes:
    """`body` in random chunks (sizes in either case, leading zeros, extensions), the last
    chunk, maybe trailer fields."""
    out = b""
    for piece in cut(body, draw(st.lists(st.integers(0, len(body)), max_size=4))):
        size = draw(st.sampled_from([b"%x", b"%X", b"0%x"])) % len(piece)
        out += size + draw(st.sampled_from(EXTS)) + b"\r\n" + piece + b"\r\n"
    last = b"0" + draw(st.sampled_from(EXTS)) + b"\r\n"
    return out + last + draw(st.sampled_from(TRAILERS)) + b"\r\n"


def requests() -> st.SearchStrategy[bytes]:
    """One to four requests, pipelined."""
    return st.lists(request(), min_size=1, max_size=4).map(lambda r: Wire(b"".join(r)))


def broken() -> st.SearchStrategy[bytes]:
    return requests().flatmap(mutate).map(Wire)


def plans() -> st.SearchStrategy[tuple[str, ...]]:
    return st.lists(st.sampled_from(PLANS), min_size=1, max_size=4).map(tuple)


# --- the server side --------------------------------------------------------------------------


@dataclass
class Seen:
    """A request as the handler got it."""

    method: str
    target: str
    version: str
    raw_headers: tuple[tuple[bytes, bytes], ...]
    content_length: int | None
    keep_alive: bool
    body: bytes | None = None
    refused: int = 0  # the status of the EdgeError read() raised
    streamed: bool = False  # answered with a body of unknown length


class Example:
    """The handler of one example and what it saw. Request i follows plans[i % len(plans)]:
    read its body or not, answer whole or streamed (chunked or sized), at once or after a few
    loop turns. Every answer carries X-Seq: i."""

    def __init__(self, plans: tuple[str, ...]) -> None:
        self.plans = plans
        self.seen: list[Seen] = []
        self.active = 0

    async def handle(self, request: Request) -> None:
        self.active += 1
        try:
            await self._handle(request)
        finally:
            self.active -= 1

    async def _handle(self, request: Request) -> None:
        seq = len(self.seen)
        plan = self.plans[seq % len(self.plans)]
        seen = Seen(
            request.method, request.target, request.version, request.raw_headers,
            request.content_length, request.keep_alive,
        )  # fmt: skip
        self.seen.append(seen)
        conn, extra = request.conn, b"X-Seq: %d\r\n" % seq
        if plan == "yield":
            for _ in range(3):
                await asyncio.sleep(0)
        if plan != "ignore":
            try:
                seen.body = await request.read()
            except EdgeError as exc:
                seen.refused = exc.status
                conn.respond(request, exc.status, b'{"error":{}}', headers=extra)
                return
        if plan in ("stream", "sized") and request.method != "HEAD":
            length = 3 if plan == "sized" else None
            seen.streamed = length is None
            conn.start(request, 200, "OK", b"Content-Type: text/plain\r\n" + extra, length, b"a")
            await asyncio.sleep(0)
            conn.write(b"bc")
            conn.end()
        else:
            conn.respond(request, 200, b"%d" % seq, headers=extra)


def make_server(handler: Example, max_body: int, **limits: float) -> Server:
    return Server(handler.handle, Limits(max_body=max_body, **limits))  # type: ignore[arg-type]


@dataclass
class Outcome:
    """What one exchange came to, before the client closed."""

    delivered: bytes
    out: bytes
    closed: bool  # by the server
    settled: bool  # nothing left to do (closed, or idle, or waiting for the client)


async def over_fake_transport(
    server: Server, example: Example, pieces: list[bytes], end: str, to_the_end: bool = False
) -> Outcome:
    """Deliver `pieces` one by one (a few loop turns between them, none while reading is
    paused), then (`end`) "wait" for the server to finish (`to_the_end`: until it ends the
    connection), or let the client "close" (a FIN) or "reset" (an RST) at once."""
    conn = server()
    transport = FakeTransport(conn)
    conn.connection_made(transport)
    delivered = bytearray()
    for i, piece in enumerate(pieces):
        if transport.paused:
            await settle(lambda: not transport.paused or transport.closing, SETTLE_S)
        if transport.closing or transport.paused:
            break  # the server stopped reading: the rest stays in the client's buffer
        conn.data_received(piece)
        delivered += piece
        for _ in range(i % 3):
            await asyncio.sleep(0)
    settled = True
    if to_the_end:
        settled = await settle(lambda: transport.ended, SETTLE_S)
    elif end == "wait":
        settled = await settle(lambda: transport.ended or conn.idle, SETTLE_S)
    outcome = Outcome(bytes(delivered), bytes(transport.out), transport.ended, settled)
    if end == "reset":
        transport.peer_reset()
    else:
        transport.client_closes()
    gone = await settle(
        lambda: transport.lost and not server.connections and not example.active, GONE_S
    )
    if not gone:
        transport.abort()  # cleans up for the next example, then fails this one
        await settle(lambda: transport.lost)
    assert gone, f"still open after the client closed: {server!r} active={example.active}"
    assert not transport.misuse, transport.misuse
    await server.shutdown(0.1)
    return outcome


def check(outcome: Outcome, example: Example, max_body: int, wait: bool) -> list[Reply]:
    """The properties of the module docstring, for one exchange."""
    ref = parse_requests(outcome.delivered)
    seen = example.seen
    for i, got in enumerate(seen):
        check_seen(got, i, ref, max_body)
    cut_ok = not (wait and outcome.settled)  # the client left before the server was done
    replies = edge_responses(
        outcome.out, lambda i: i < len(seen) and seen[i].method == "HEAD", cut_ok
    )
    check_replies(replies, seen, ref)
    if wait and ref.end != "partial":
        where = f"reference: {ref.end} {ref.reason} at {ref.at}; seen {len(seen)}"
        assert outcome.settled, f"no answer and no close within {SETTLE_S} s ({where})"
        if ref.end in ("closed", "error"):
            assert outcome.closed, f"the connection stays open ({where})"
        if not outcome.closed:
            assert len(seen) == len(ref.messages), where
            assert len(replies) == len(seen), "a handled request without an answer"
    return replies


def check_seen(got: Seen, i: int, ref: Parsed, max_body: int) -> None:
    complete = i < len(ref.messages)
    message = ref.messages[i] if complete else ref.pending if i == len(ref.messages) else None
    assert message is not None, (
        f"the handler got request {i} ({got.method} {got.target!r}), which the reference "
        f"refuses: {ref.end} at {ref.at} ({ref.reason})"
    )
    assert got.method == message.method.decode()
    if message.target.startswith(b"/"):
        assert got.target == message.target.decode("utf-8", "surrogateescape")
    assert got.version == message.version
    sent = tuple((n, v) for n, v in message.fields if n.lower() != b"content-length")
    assert got.raw_headers == sent
    assert got.content_length == message.length, (got.content_length, message.fields)
    # The edge may end a connection the client would keep (a body it refused), never keep one
    # that the request ends (Connection: close, HTTP/1.0, a chunked HTTP/1.0 body).
    assert message.keep_alive or not got.keep_alive, (got.version, message.fields)
    if got.body is not None:
        assert complete, f"request {i}: a body that the reference says is {ref.end}"
        assert got.body == message.body
    if got.refused == 413:
        assert len(message.body) > max_body or not complete, "413 for a body within the limit"
    else:  # a body cut or broken, or refused by a parser stricter than the reference
        assert got.refused in (0, 400, 408), got.refused


def check_replies(replies: list[Reply], seen: list[Seen], ref: Parsed) -> None:
    """One answer per handled request, in order; then at most one of the edge's own, which
    answers a request no handler got (one answer per request: a second would be taken for the
    answer to the client's next request)."""
    seqs = [int(r.headers["x-seq"]) for r in replies if "x-seq" in r.headers]
    assert seqs == list(range(len(seqs))), f"answers out of order: {seqs}"
    own = [r for r in replies if "x-seq" not in r.headers]
    assert len(own) <= 1 and (not own or own[0] is replies[-1]), "the edge's own answer, not last"
    if own:
        assert own[0].closes and own[0].status in (400, 408, 413, 431, 503, 505), own[0]
        sent = len(ref.messages) + (ref.end in ("error", "partial"))
        assert len(seen) < sent, f"a second answer ({own[0].status}) to a handled request"
    assert len(seqs) <= len(seen)


# --- the properties ---------------------------------------------------------------------------


def run_example(
    harness: Harness, data: bytes, points: list[int], todo: tuple[str, ...], max_body: int,
    end: str,
) -> tuple[Outcome, list[Reply], list[Seen]]:  # fmt: skip
    example = Example(todo)
    server = make_server(example, max_body)
    outcome = harness.run(over_fake_transport(server, example, cut(data, points), end))
    return outcome, check(outcome, example, max_body, end == "wait"), example.seen


# Pipelined requests after one that says Connection: close: llhttp refuses the bytes after it
# ("Data after Connection: close"); the valid requests before them must still all be answered
# (they were not: the first answer said close, and the connection waited for linger_s).
AFTER_CLOSE = Wire(
    b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n"
)


@fuzz(300)
@given(data=requests(), points=cuts(), todo=plans(), big=st.booleans())
@example(data=AFTER_CLOSE, points=[], todo=("read",), big=False)
def test_valid_requests_are_served_as_sent(harness, data, points, todo, big):
    ref = parse_requests(data)
    assert ref.end in ("complete", "closed")  # the generator's own check
    outcome, replies, seen = run_example(
        harness, data, points, todo, 1 << 20 if big else 64, "wait"
    )
    assert all("x-seq" in r.headers and r.status in (200, 413) for r in replies), replies
    assert outcome.delivered == data or outcome.closed
    for i, reply in enumerate(replies):  # the connection ends only where it has to
        message, got = ref.messages[i], seen[i]
        unread = got.body is None and (message.body or message.chunked) or got.refused
        delimited = got.streamed and message.version != "1.1"  # HTTP/1.0: ends at the close
        assert not reply.closes or not message.keep_alive or unread or delimited, f"{i} closes"
    assert len(replies) == len(ref.messages) or replies[-1].closes


@fuzz(600)
@given(data=broken(), points=cuts(), todo=plans(), end=ENDS)
@example(  # the hang of issue 15: a malformed chunked body while the handler reads it
    data=b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n",
    points=[],
    todo=("read",),
    end="wait",
)
@example(  # llhttp refuses this Transfer-Encoding only after the head's callback
    data=b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    points=[],
    todo=("ignore",),
    end="wait",
)
@example(  # a protocol upgrade: its handler got it, without its body, and it was answered twice
    data=b"POST /v1/chat/completions HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: x\r\n"
    b"Content-Length: 3\r\n\r\nabc", points=[], todo=("read",), end="wait",
)  # fmt: skip
@example(  # CONNECT: llhttp ends the message at its head and stops (HttpParserUpgrade) after it
    data=b"CONNECT a:1 HTTP/1.1\r\n\r\n", points=[], todo=("read",), end="wait"
)
@example(  # a chunked HTTP/1.0 body: its connection must close after it (RFC 9112 6.1)
    data=b"POST / HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n", points=[], todo=("read",), end="wait",
)  # fmt: skip
@example(  # the client resets while its early answer is written: the lingering close's
    # write_eof() raises ENOTCONN on asyncio's socket transport, inside the handler's task
    data=b"POST / HTTP/1.1\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n",
    points=[],
    todo=("ignore",),
    end="reset",
)
@example(  # a body that breaks while its handler waits in read(): compiled by mypyc, read()
    # checked self._error against the None it was narrowed to before its await (a TypeError)
    data=b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n",
    points=[1, 47],
    todo=("read",),
    end="wait",
)
@example(  # Content-Length with trailing whitespace (OWS, RFC 9110 5.5): llhttp frames the body
    # by it, and Request.content_length must say so (it was None: b"3 ".isdigit() is False)
    data=b"POST / HTTP/1.1\r\nContent-Length: 3 \r\n\r\nabc",
    points=[],
    todo=("read",),
    end="wait",
)
def test_broken_requests_never_reach_the_handler(harness, data, points, todo, end):
    run_example(harness, data, points, todo, 1 << 20, end)


@fuzz(500)
@given(data=soup().map(Wire), points=cuts(), todo=plans(), end=ENDS)
def test_random_bytes(harness, data, points, todo, end):
    run_example(harness, data, points, todo, 1 << 20, end)


BOUNDS = {
    "header_timeout_s": 0.1, "body_grace_s": 0.1, "body_min_rate": 1 << 20,
    "keepalive_timeout_s": 0.1, "linger_s": 0.1,
}  # fmt: skip


@fuzz(30)
@given(data=requests(), stop=st.integers(0, 1 << 20), points=cuts(), todo=plans())
@example(  # a 408 while the handler waits in read(): the same, compiled by mypyc
    data=b"GET / HTTP/1.1\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    stop=68, points=[], todo=("read",),
)  # fmt: skip
def test_a_client_that_stops_midway_is_answered_or_closed_in_time(
    harness, data, stop, points, todo
):
    """Every bound of the front door ends a connection whose client stopped sending, wherever it
    stopped (in a head, a body, between requests): 408 or the handler's answer, then a close,
    within a second (the bounds here are 0.1 s)."""
    example = Example(todo)
    server = make_server(example, 1 << 20, **BOUNDS)
    pieces = cut(data[: stop % (len(data) + 1)], points)
    outcome = harness.run(over_fake_transport(server, example, pieces, "wait", to_the_end=True))
    assert outcome.closed, "the connection outlived every bound"
    check(outcome, example, 1 << 20, wait=True)


async def over_socket(server: Server, example: Example, pieces: list[bytes]) -> Outcome:
    """The same over loopback TCP: pieces written one by one (TCP may join them), then read
    until the server closes or has been quiet for a while."""
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        delivered, out, closed = await _exchange(reader, writer, pieces)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        gone = await settle(lambda: not server.connections and not example.active, GONE_S)
        assert gone, f"still open after the client closed: {server!r} active={example.active}"
        return Outcome(delivered, out, closed, True)
    finally:
        writer.close()
        for conn in list(server.connections):
            conn.abort()
        listener.close()
        await server.shutdown(0.1)
        await listener.wait_closed()


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pieces: list[bytes]
) -> tuple[bytes, bytes, bool]:
    delivered, out = bytearray(), bytearray()
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            delivered += piece
            await asyncio.sleep(0)
    except ConnectionError:
        pass  # the server closed while the client was still sending
    with contextlib.suppress(ConnectionError):
        while True:
            try:  # (no wait_for: its inner task's exception would go unretrieved)
                async with asyncio.timeout(0.15):
                    data = await reader.read(65536)
            except TimeoutError:
                return bytes(delivered), bytes(out), False
            if not data:
                return bytes(delivered), bytes(out), True
            out += data
    return bytes(delivered), bytes(out), True  # reset


@fuzz(50)
@given(data=st.one_of(requests(), broken(), soup()), points=cuts(), todo=plans())
@example(data=AFTER_CLOSE, points=[], todo=("read",))
def test_over_loopback_sockets(harness, data, points, todo):
    example = Example(todo)
    server = make_server(example, 1 << 20)
    pieces = cut(data, points)
    pieces = pieces[:63] + [b"".join(pieces[63:])]  # a socket write each: a few are enough
    outcome = harness.run(over_socket(server, example, [p for p in pieces if p]))
    ref = parse_requests(outcome.delivered)
    for i, got in enumerate(example.seen):
        check_seen(got, i, ref, 1 << 20)
    seen = example.seen
    head = lambda i: i < len(seen) and seen[i].method == "HEAD"  # noqa: E731
    # (not closed: the last answer may still be on its way, the client having stopped reading)
    replies = edge_responses(outcome.out, head, cut_ok=not outcome.closed)
    check_replies(replies, seen, ref)


# --- through the whole edge ---------------------------------------------------------------------

PROXIED = st.sampled_from([b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings"])
DOCS = st.builds(
    lambda text, stream: orjson.dumps(
        {"model": "m", "stream": stream, "messages": [{"role": "user", "content": text}]}
    ),
    st.text(max_size=12), st.booleans(),
)  # fmt: skip


def proxied() -> st.SearchStrategy[bytes]:
    """One to three requests the edge forwards (a model it serves), maybe broken on purpose."""
    one = request(st.just(b"POST"), PROXIED, DOCS)
    sent = st.lists(one, min_size=1, max_size=3).map(b"".join)
    return st.one_of(sent, sent.flatmap(mutate)).map(Wire)


@pytest.fixture(scope="module")
def edge(harness):
    """A whole edge worker in front of a host that answers every request with `{}`."""
    host = ModelHost()
    worker, port = harness.run(start_worker(harness.run(host.start())))
    yield worker, port, host
    harness.run(worker.drain())
    harness.run(host.close())


@fuzz(60)
@given(data=proxied(), points=cuts())
@example(data=AFTER_CLOSE, points=[])
def test_through_the_whole_edge_only_whole_requests_reach_the_host(harness, edge, data, points):
    """What the host gets is always well-framed, and each body one the client sent whole."""
    worker, port, host = edge
    start = len(host.requests)
    pieces = cut(data, points)
    pieces = pieces[:31] + [b"".join(pieces[31:])]
    delivered, out, _ = harness.run(talk(port, [p for p in pieces if p], quiet_s=0.05))
    gone = harness.run(settle(lambda: not worker.web.connections, GONE_S))
    assert gone, f"still open after the client closed: {worker.web!r}"
    assert not host.refused, host.refused
    bodies = {m.body for m in parse_requests(delivered).messages}
    for message in host.requests[start:]:
        assert message.body in bodies, (
            f"the host got a body the client did not send whole: {message}"
        )
        assert message.method == b"POST" and message.target.startswith(b"/v1/"), message
    edge_responses(out, lambda i: False, cut_ok=True)
