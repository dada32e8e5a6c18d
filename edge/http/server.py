"""The front door: HTTP/1.1 server connections on httptools (llhttp), one protocol per socket.

Why not aiohttp's web.Server: measured side by side on one core, a handler that only answers
costs about 120 us of CPU per request behind aiohttp's server and about 17 us behind this
protocol; the proxy's whole budget (the Rust routers' cost per request) is about 150-180 us.
What aiohttp spends it on (a request object with lazy properties, a StreamReader per request,
a payload writer, a task loop per connection, three writes per response) the proxy never needs:
it reads small bodies whole, answers in one write, and relays streams straight from the upstream
socket. aiohttp stays the HTTP client for the edge's own calls and the mock model server.

Theory of operation: the parser calls back as bytes arrive. A request whose body is small and
announced by Content-Length is handed to the handler once complete (the common case: its body is
already in memory); any other (large, chunked, `Expect: 100-continue`) is handed over at the end
of its head, and `Request.read()` waits for the body, refusing it with 413 past the limit. One
handler task runs per request; pipelined requests queue behind it and are answered in order. A
response is framed here: Content-Length when the length is known, chunked otherwise (or
close-delimited for an HTTP/1.0 client). A client that goes away cancels its handler task, which
is how the proxied path learns to close its upstream at once. `pause_writing` from the transport
reaches whoever feeds the response (`Connection.source`), so a slow client slows its upstream.

Bounds (`Limits`, from config's [server]). What the client sends is in one state at a time; the
sweep (one timer per worker, ticking at most every second) ends a phase past its bound, and the
two rare phases (after an early answer) have a timer of their own:

  state  the client is sending            bound                                 past it
  IDLE   nothing yet (keep-alive)         keepalive_timeout_s, with no handler  close
  HEAD   a request head                   header_timeout_s from its first byte  408
                                          max_head_bytes, max_header_fields     431
  BODY   a request body                   body_grace_s, then body_min_rate      408
         (chunked: framing and trailers)  2 x max_head_bytes + the body's size  400
  WAIT   nothing: a body behind `Expect: 100-continue`, not asked for yet   (the handler's)
  DRAIN  an answered body's unread rest   linger_s, max_discard_bytes           close
  DROP   anything: nothing more parsed    max_discard_bytes; then linger_s      close
  EOF    nothing more: its FIN came while refused input is answered     close after the answer

A failed request (a malformed chunked body, a body too slow or over max_body_bytes) is still its
handler's to answer: `Request.read()` raises the error, and the handler renders it in the dialect
the client speaks. Input outside any request (a bad head) is answered here, in OpenAI's shape
(edge/dialects/errors.py renders every error body).
A connection closed while the client may still be sending (an answer given before the body was
read, refused input) closes as nginx's lingering_close does: FIN after the answer, then what
still arrives is read and dropped for at most linger_s and max_discard_bytes, so that the
client's kernel does not reset the connection and destroy the answer before it was read.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Final, Protocol, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import httptools
from multidict import CIMultiDict

from edge.dialects.errors import error_json
from edge.dialects.paths import OPENAI, dialect_of
from edge.errors import BadRequest, EdgeError, PayloadTooLarge, RequestTimeout
from edge.http.heads import Seen

log = logging.getLogger("edge.http")

_EAGER_BODY: Final = 64 * 1024  # bodies announced up to this size are read before the handler runs
_MAX_QUEUED = 8  # pipelined requests waiting before the socket stops being read
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_REASONS = {
    200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    413: "Payload Too Large", 422: "Unprocessable Entity", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}  # fmt: skip
_NO_BODY: Final = frozenset({204, 304})
# What the client is sending (`Connection._state`, the table above); ordered: from DROP on,
# nothing is parsed.
#   IDLE -> HEAD -> BODY | WAIT -> IDLE   a request (WAIT -> BODY when its body is asked for)
#   BODY -> DRAIN -> IDLE                 answered before its body was read: the rest dropped
#   any -> DROP -> EOF                    input refused, or a lingering close; then the
#                                         client's FIN while a refused request is still
#                                         answered (the close follows the answer, no lingering)
_IDLE: Final = 0
_HEAD: Final = 1
_BODY: Final = 2
_WAIT: Final = 3
_DRAIN: Final = 4
_DROP: Final = 5
_EOF: Final = 6
_STATES: Final = ("IDLE", "HEAD", "BODY", "WAIT", "DRAIN", "DROP", "EOF")  # for repr
# The response being written (`Connection._response`), reset at each request's turn:
#   NONE -> SIZED | CHUNKED | UNTIL_CLOSE (`start`: the head and the framing of the body that
#   follows) -> ENDED (`end`); NONE -> ENDED (`respond`: a whole answer in one write, or `start`
#   with a status that has no body). A handler that returns before ENDED gets its connection
#   aborted (`_next`): the client could not tell a cut answer from a whole one otherwise.
_NONE: Final = 0
_SIZED: Final = 1  # Content-Length: nothing may follow the body's last byte
_CHUNKED: Final = 2  # `write` frames each piece; `write_raw` takes pieces framed already
_UNTIL_CLOSE: Final = 3  # an HTTP/1.0 client: the body ends where the connection does
_ENDED: Final = 4
_RESPONSES: Final = ("NONE", "SIZED", "CHUNKED", "UNTIL_CLOSE", "ENDED")
# The connection (`Connection._life`): OPEN -> CLOSING -> CLOSED, or OPEN -> CLOSED.
_OPEN: Final = 0  # requests go on after each answer (keep-alive)
_CLOSING: Final = 1  # the answer being written said `Connection: close`: none follows it
_CLOSED: Final = 2  # the transport is gone (connection_lost): writes are dropped
_LIVES: Final = ("OPEN", "CLOSING", "CLOSED")
_NO_CAP: Final = 1 << 62  # a Content-Length body: llhttp counts it, nothing to bound here


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client connection may hold or take (config's [server] names; app.py builds it)."""

    max_body: int = 32 * 1024 * 1024
    max_head_bytes: int = 64 * 1024
    max_header_fields: int = 100
    header_timeout_s: float = 10.0
    body_grace_s: float = 10.0
    body_min_rate: int = 1024  # bytes/s averaged since the body began; 0: no bound
    keepalive_timeout_s: float = 75.0
    max_connections: int = 10000
    linger_s: float = 2.0
    max_discard_bytes: int = 1024 * 1024

    @property
    def tick_s(self) -> float:
        """How often the sweep looks: a quarter of the shortest bound it keeps, at most 1 s."""
        shortest = min(self.keepalive_timeout_s, self.header_timeout_s, self.body_grace_s)
        return max(0.01, min(1.0, shortest / 4))


class BodySource(Protocol):
    """What feeds a response from elsewhere (an upstream socket), paused while the client lags."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def stop(self) -> None:
        """End the feed early; whoever writes the response ends it in its own terms."""


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole response of the edge's own (its endpoints, its errors): written in one piece."""

    body: bytes
    status: int = 200
    content_type: str = "application/json"
    headers: bytes = b""  # extra "Name: value\r\n" lines, rendered by heads.render


class Fields:
    """The header fields of a request but its Content-Length, shared by every request that sent
    the same ones. A client sends the same headers request after request (an SDK's, a
    gateway's), so they are decoded once, and what other modules derive from them (the block
    sent upstream) is kept in `memo` instead of being rebuilt per request."""

    __slots__ = ("raw", "headers", "memo", "expect", "chunked", "refused", "proto")

    def __init__(self, raw: tuple[tuple[bytes, bytes], ...]) -> None:
        self.raw = raw
        self.headers: CIMultiDict[str] = CIMultiDict(
            [(n.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for n, v in raw]
        )
        self.memo: dict[str, bytes] = {}
        self.expect = self.headers.get("Expect", "").lower() == "100-continue"
        self.chunked = "Transfer-Encoding" in self.headers
        self.refused = _refused_fields(self.headers)  # why such a request is refused, or ""
        # The edge never terminates TLS; a terminator in front of it says what the client used.
        # Believing a client that claims https costs only that client: its cookie gets Secure.
        said = self.headers.get("X-Forwarded-Proto", "").partition(",")[0].strip().lower()
        self.proto = "https" if said == "https" else "http"

    def __repr__(self) -> str:
        return f"<Fields {len(self.raw)} memo={sorted(self.memo)}>"


class Request:
    """One request as the client sent it. `headers` are decoded (Content-Length left out: it
    is `content_length`); `raw_headers` are the bytes."""

    __slots__ = (
        "method", "target", "path", "query_string", "fields", "headers", "raw_headers",
        "version", "keep_alive", "conn", "body", "_chunks", "_size", "_complete", "_waiter",
        "_limit", "_too_large", "_expect", "_length", "_dropping", "_error", "_dispatched",
    )  # fmt: skip

    def __init__(
        self, conn: Connection, method: str, target: str, fields: Fields, length: bytes | None,
        version: str, keep_alive: bool, limit: int,
    ) -> None:  # fmt: skip
        self.conn = conn
        self.method = method
        self.fields = fields
        self.raw_headers = fields.raw
        self.headers = fields.headers
        self.version = version
        self.keep_alive = keep_alive
        self.target, path, self.query_string = _split_target(target)
        self.path = unquote(path) if "%" in path else path
        self.body = b""
        self._chunks: list[bytes] = []
        self._size = 0  # body bytes received (dropped ones included)
        self._complete = False
        self._waiter: asyncio.Future[None] | None = None
        self._limit = limit
        if length is not None:
            length = length.strip(b" \t")  # RFC 9110 5.5: whitespace around a value is allowed
        self._length = int(length) if length is not None and length.isdigit() else None
        self._too_large = self._length is not None and self._length > limit
        self._expect = fields.expect
        self._dropping = False
        self._error: EdgeError | None = None  # the body failed: read() raises it
        self._dispatched = False  # handed to its handler (or queued for it)

    @property
    def remote(self) -> str:
        return self.conn.peer

    @property
    def secure(self) -> bool:
        return self.fields.proto == "https"

    @property
    def content_length(self) -> int | None:
        return self._length

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(self.query_string, keep_blank_values=True))

    async def read(self) -> bytes:
        """The whole body; PayloadTooLarge as soon as it is known to pass the limit, and the
        EdgeError of a body that failed (malformed, too slow) when it does."""
        if self._complete and not self._too_large:
            return self.body
        self._check()
        if self._expect:
            self._expect = False
            self.conn._continue(self)
        while not self._complete:
            self._waiter = self.conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
            self._check()
        return self.body

    def _check(self) -> None:
        """Raise what failed the body (over the limit, malformed, too slow), if anything did.
        A call, not an inline test, on purpose: mypy keeps an attribute's narrowing across an
        await, so `self._error is not None` tested before `await` and again after it compiles
        (mypyc) to a check that it is still None, which fails with a TypeError once it is not."""
        if self._too_large:
            self._refuse()
        error = self._error
        if error is not None:
            raise error

    def _refuse(self) -> None:
        self.keep_alive = False  # the rest of the body is not read: this connection cannot go on
        raise PayloadTooLarge(f"The request body is over the limit of {self._limit} bytes.")

    # fed by the connection
    def _feed(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            self._over()
        if not self._dropping:
            self._chunks.append(data)

    def _over(self) -> None:
        """Past the limit: the parser stops here (see `_Refused`)."""
        if not self._too_large:
            self._too_large = True
            self._chunks.clear()
            self._wake()
        raise _Refused

    def _fail(self, error: EdgeError) -> None:
        self._error = error
        self.keep_alive = False
        self._chunks.clear()
        self._wake()

    def _drop_rest(self) -> None:
        # Read to the end and dropped, so the connection can go on to the next request: closing
        # with body bytes unread would reset it, and the client could lose the answer. Only a
        # body of known length, within max_discard_bytes, is dropped (`Connection._can_drop`).
        self._dropping = True
        self._chunks.clear()

    def _done(self) -> None:
        chunks = self._chunks
        self.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._complete = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path} complete={self._complete}>"


Handler = Callable[[Request], Awaitable[None]]


def _refused_fields(headers: CIMultiDict[str]) -> str:
    """What makes a head unacceptable whatever its request: a protocol upgrade (the edge
    speaks HTTP/1.1 only), or a body not framed chunked last (RFC 9112 6.3: its end unknown)."""
    connection = ",".join(headers.getall("Connection", ())).lower().split(",")
    if "Upgrade" in headers and "upgrade" in (token.strip() for token in connection):
        return "Protocol upgrades are not supported."
    codings = ",".join(headers.getall("Transfer-Encoding", ())).rsplit(",", 1)
    if "Transfer-Encoding" in headers and codings[-1].strip().lower() != "chunked":
        return "Transfer-Encoding must end in chunked."
    return ""


def _split_target(target: str) -> tuple[str, str, str]:
    """(path and query as sent, raw path, query string) of a request target."""
    if not target.startswith("/"):  # absolute-form (a client that takes us for a proxy) or '*'
        if "://" not in target:
            return target, target, ""
        parts = urlsplit(target)
        path = parts.path or "/"
        return (path + "?" + parts.query if parts.query else path), path, parts.query
    path, _, query = target.partition("?")
    return target, path, query


class Server:
    """The protocol factory for one worker: its handler, its connections, and the drain."""

    def __init__(self, handler: Handler, limits: Limits) -> None:
        self.handler = handler
        self.limits = limits
        self.connections: set[Connection] = set()
        self.closing = False
        self.requests = 0
        self.fields: Seen[tuple[tuple[bytes, bytes], ...], Fields] = Seen(Fields, 256)
        # Derived once: bytes a head may take on the wire before it is measured exactly (the
        # fields' framing adds to what is measured), and what a refused head is told.
        self.head_cap = 2 * limits.max_head_bytes
        self.head_too_large = (
            f"The request line and headers are over {_size(limits.max_head_bytes)}."
        )
        self._date = ("", -1.0)
        self._sweeper: asyncio.TimerHandle | None = None
        self._emptied: asyncio.Event | None = None  # set by the last connection of a drain

    def __call__(self) -> Connection:
        if self._sweeper is None:
            self._schedule_sweep()
        return Connection(self)

    def date(self) -> str:
        """The Date header value, formatted once per second."""
        now = time.time()
        text, at = self._date
        if int(now) != int(at):
            text = formatdate(now, usegmt=True)
            self._date = (text, now)
        return text

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if self._emptied is not None and not self.connections:
            self._emptied.set()

    def _schedule_sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(self.limits.tick_s, self._sweep)

    def _sweep(self) -> None:
        """Each connection past the bound of its phase is ended (see the table above): one
        timer per worker instead of one per request."""
        now = time.monotonic()
        for conn in list(self.connections):
            conn._expire(now)
        self._schedule_sweep()

    async def shutdown(self, timeout_s: float) -> None:
        """Idle connections close now, busy ones after their response; at the deadline the
        rest are cut (their handlers are cancelled, so every request is still accounted)."""
        self.closing = True
        for conn in list(self.connections):
            if conn.idle:
                conn.close()
        if self.connections:
            self._emptied = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._emptied.wait(), timeout_s)
        if self.connections:
            log.warning("drain: %d connection(s) still busy at the deadline; cut",
                        len(self.connections))  # fmt: skip
            # A relayed stream is ended by its relay (an SSE client gets an error event and a
            # clean end, not a connection reset); the rest are cut.
            fed = [c.task for c in self.connections if c.source is not None and c.task]
            for conn in list(self.connections):
                if conn.source is not None:
                    conn.source.stop()
            if fed:
                await asyncio.wait(fed, timeout=1.0)
            tasks = [c.task for c in self.connections if c.task is not None]
            for conn in list(self.connections):
                conn.abort()
            if tasks:
                await asyncio.wait(tasks, timeout=5.0)
        if self._sweeper is not None:
            self._sweeper.cancel()

    def __repr__(self) -> str:
        return f"<Server connections={len(self.connections)} requests={self.requests}>"


class Connection(asyncio.Protocol):
    """One client socket: parse, dispatch one request at a time, frame the responses."""

    def __init__(self, server: Server) -> None:
        self.server = server
        # Cached: asyncio.get_running_loop() makes a getpid() system call each time.
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = ""
        self.task: asyncio.Task[None] | None = None
        self.queue: collections.deque[Request] = collections.deque()
        self.request: Request | None = None  # the one being parsed
        self.source: BodySource | None = None  # what feeds the current response, if anything
        self.last_active = time.monotonic()
        self._url = b""
        self._raw: list[tuple[bytes, bytes]] = []
        self._length: bytes | None = None  # the Content-Length field, apart from the others
        self._since = 0  # bytes received since the current message began (or more)
        self._cap = server.head_cap  # `_since` past this: the message is looked at closer
        self._state = _IDLE  # what the client is sending (the table above)
        self._response = _NONE  # the response being written
        self._life = _OPEN
        self._at = 0.0  # when the current phase (HEAD, BODY) began
        self._dropped = 0  # bytes dropped since parsing stopped (DROP)
        self._timer: asyncio.TimerHandle | None = None  # DRAIN's or the lingering close's end
        self._refusal: tuple[int, str] | None = None  # answered once the requests before it are
        # Flow control, two dimensions apart from the states: the edge stopped reading the
        # client (requests queued), and the client's socket buffer is full (writes wait).
        self._paused_reading = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None

    @property
    def idle(self) -> bool:
        return self.task is None and not self.queue and self.request is None

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but speak the same API.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        server = self.server
        full = len(server.connections) >= server.limits.max_connections
        server.connections.add(self)  # a refused one too, while it lingers: it holds a socket
        if full:
            self._answer(503, "This server has too many connections; retry.", "service_unavailable")
            self._linger()

    def data_received(self, data: bytes) -> None:
        now = self.last_active = time.monotonic()
        state = self._state
        if state >= _DROP:
            self._discard(len(data))
            return
        if state == _IDLE:
            self._state = _HEAD
            self._at = now
        self._since += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "Protocol upgrades are not supported.")
            return
        except httptools.HttpParserError as exc:
            self._refused(exc)
            return
        if self._since > self._cap:
            self._over_cap()

    def eof_received(self) -> bool:
        # A client's FIN ends the connection (as aiohttp has it): a stream it no longer reads
        # must free its upstream now, and clients that half-close and still read are rare. One
        # exception: refused input whose answer (400, 413) is still on its way gets it.
        if self._state == _DROP and self.task is not None:
            self._state = _EOF
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._life = _CLOSED
        self.server.forget(self)
        if self._timer is not None:
            self._timer.cancel()
        if self.task is not None:
            self.task.cancel()  # the handler's upstream closes now, not at its next write
        if self.request is not None:
            self.request._wake()
        self._wake_drain()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.source is not None:
            self.source.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.source is not None:
            self.source.resume_reading()
        self._wake_drain()

    # --- httptools callbacks ----------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self._url += url
        if self._state == _IDLE:  # a head that began in the read that ended the previous one
            self._state = _HEAD
            self._at = self.last_active

    def on_header(self, name: bytes, value: bytes) -> None:
        # Called per field: little else here. The head's size is judged from the bytes that
        # arrived (`_since`), and measured exactly only when those could exceed the limit.
        if len(name) == 14 and name.lower() == b"content-length":
            self._length = value  # kept apart: the other fields then repeat (see Fields)
        else:
            self._raw.append((name, value))

    def on_headers_complete(self) -> None:
        limits = self.server.limits
        if self._since > limits.max_head_bytes or len(self._raw) > limits.max_header_fields:
            self._measure_head()
        parser = self.parser
        fields = self.server.fields.get(tuple(self._raw))
        if fields.refused:  # llhttp refuses these too, but after this callback: too late
            raise _HeadRefused(400, fields.refused)
        method, version = parser.get_method(), parser.get_http_version()
        if version != "1.1" and version != "1.0":
            # HTTP/0.9 (a request line with no version) has no headers or keep-alive to speak
            # of, and 2.0 is not spoken on this port: refused, not guessed at.
            raise _HeadRefused(505, f"HTTP/{version} is not supported: use HTTP/1.1.")
        if method == b"CONNECT":  # a tunnel, which llhttp would hand over as an upgrade
            raise _HeadRefused(400, "CONNECT is not supported: the edge is not a forward proxy.")
        if fields.chunked and version == "1.0":
            # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding is faulty framing (a
            # 1.0 hop in front may read it by Content-Length or to the close): refused, closed.
            raise _HeadRefused(400, "Transfer-Encoding is not allowed in an HTTP/1.0 request.")
        request = Request(
            self, method.decode("ascii", "replace"), self._url.decode("utf-8", "surrogateescape"),
            fields, self._length, version, parser.should_keep_alive(), limits.max_body,
        )  # fmt: skip
        self._length = None
        self.request = request
        self._state = _WAIT if request._expect else _BODY
        self._at = self.last_active
        self._cap = self.server.head_cap if fields.chunked else _NO_CAP
        length = request._length
        eager = length is not None and length <= _EAGER_BODY and not request._expect
        eager = eager and not request._too_large  # over the limit: 413 without reading it
        if not eager and (length is not None or fields.chunked):
            self._dispatch(request)  # the handler decides before a large body is read

    def on_body(self, body: bytes) -> None:
        if self.request is not None:
            self.request._feed(body)

    def on_message_complete(self) -> None:
        # The next message's state starts here (no on_message_begin: one Python call less).
        self._url = b""
        self._raw = []
        self._since = 0
        self._cap = self.server.head_cap
        self._state = _IDLE
        request = self.request
        if request is None:
            return
        self.request = None
        request._done()
        if request._dropping:
            self._drained()
        if not request._dispatched:
            self._dispatch(request)

    # --- dispatch ---------------------------------------------------------------------------

    def _dispatch(self, request: Request) -> None:
        request._dispatched = True
        self.server.requests += 1
        if self.task is None:
            self._start(request)
            return
        self.queue.append(request)
        if len(self.queue) >= _MAX_QUEUED and not self._paused_reading and self.transport:
            self._paused_reading = True
            self.transport.pause_reading()

    def _start(self, request: Request) -> None:
        self._response = _NONE
        self.task = self.loop.create_task(self._run(request))

    async def _run(self, request: Request) -> None:
        try:
            await self.server.handler(request)
        except asyncio.CancelledError:
            self.task = None
            self.abort()
            raise
        except EdgeError as err:  # one its handler let through (the proxy renders its own)
            if self._response == _NONE:
                dialect = dialect_of(request.path)
                body = error_json(err.status, err.message, err.kind, dialect, err.param, err.code)
                self.respond(request, err.status, body)
            else:
                self.abort()
        except Exception:
            log.exception("unhandled error in a request handler")
            if self._response == _NONE:
                body = error_json(500, "Internal error.", "server_error", dialect_of(request.path))
                self.respond(request, 500, body)
            else:
                self.abort()
        self.task = None
        self._next(request)

    def _next(self, done: Request) -> None:
        if self._response != _ENDED:
            self.abort()  # the handler left its response unfinished
            return
        if not (done.keep_alive and self._life == _OPEN) or self.server.closing:
            self._end()
            return
        if not done._complete:  # answered without reading all of its body: it is dropped
            self._start_drain(done)
        self.last_active = time.monotonic()
        if self.queue:
            if self._paused_reading and self.transport is not None and self._life != _CLOSED:
                self._paused_reading = False
                self.transport.resume_reading()
            self._start(self.queue.popleft())
        elif self._refusal is not None:
            self._answer(*self._refusal)
            self._linger()

    # --- responses --------------------------------------------------------------------------

    def reply(self, request: Request, reply: Reply) -> None:
        self.respond(request, reply.status, reply.body, reply.content_type, reply.headers)

    def respond(
        self, request: Request, status: int, body: bytes, content_type: str = "application/json",
        headers: bytes = b"",
    ) -> None:  # fmt: skip
        """A whole response in one write. `headers`: extra "Name: value\\r\\n" lines (rendered
        by heads.render: nothing here looks inside them)."""
        head = (
            b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nDate: %s\r\n%b"
            % (status, _reason(status).encode(), content_type.encode("latin-1"), len(body),
               self.server.date().encode(), headers)
        )  # fmt: skip
        self._response = _ENDED
        if not self._goes_on(request):
            self._life = _CLOSING
            head += b"Connection: close\r\n"
        if request.method == "HEAD":
            body = b""
        self.write_raw(head + b"\r\n" + body)

    def start(
        self, request: Request, status: int, reason: str, headers: bytes, length: int | None,
        first: bytes,
    ) -> None:  # fmt: skip
        """The head and the first piece of a relayed body, in one write. `length` None frames
        the body chunked (or by closing, for an HTTP/1.0 client); `end()` finishes it."""
        head = b"HTTP/1.1 %d %s\r\n%b" % (status, reason.encode("latin-1", "replace"), headers)
        keep = self._goes_on(request)
        if status in _NO_BODY:
            self._response = _ENDED
        elif length is not None:
            self._response = _SIZED
            head += b"Content-Length: %d\r\n" % length
        elif request.version == "1.1":
            self._response = _CHUNKED
            head += b"Transfer-Encoding: chunked\r\n"
            if first:
                first = b"%x\r\n%b\r\n" % (len(first), first)
        else:
            self._response = _UNTIL_CLOSE
            keep = False
        if not keep:
            self._life = _CLOSING
            head += b"Connection: close\r\n"
        self.write_raw(head + b"\r\n" + first)

    def _goes_on(self, request: Request) -> bool:
        """Whether the connection goes on after this request's answer: the client wants it, the
        worker is not draining, and the body was read, or its unread rest can be dropped."""
        if not (request.keep_alive and self._life == _OPEN) or self.server.closing:
            return False
        return request._complete or self._can_drop(request)

    def _can_drop(self, request: Request) -> bool:
        # The client is sending a body of known length (not waiting for a 100 Continue that
        # will not come), and what is left of it is within the discard budget. A chunked rest
        # is of unknown length: closed (after lingering) instead.
        length = request._length
        return (
            length is not None
            and not request._expect
            and request._error is None
            and not request._too_large
            and length - request._size <= self.server.limits.max_discard_bytes
        )

    def write(self, data: bytes) -> None:
        """A piece of the body, framed as `start` chose; dropped once the client is gone."""
        if self._life == _CLOSED or not data:
            return
        if self._response == _CHUNKED:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        assert self.transport is not None
        self.transport.write(data)

    def end(self) -> None:
        if self._response == _CHUNKED and self._life != _CLOSED:
            self.write_raw(b"0\r\n\r\n")
        self._response = _ENDED

    def write_raw(self, data: bytes) -> None:
        if self._life != _CLOSED and self.transport is not None:
            self.transport.write(data)

    @property
    def paused(self) -> bool:
        """The client's socket buffer is full: whoever feeds the response should wait."""
        return self._write_paused

    @property
    def chunked(self) -> bool:
        """The body `start` began is chunked: `write_raw` takes pieces framed already."""
        return self._response == _CHUNKED

    @property
    def sized(self) -> bool:
        """The body `start` began has a Content-Length: nothing may follow its last byte."""
        return self._response == _SIZED

    async def drain(self) -> None:
        """Wait while the client's socket buffer is above its high-water mark."""
        while self._write_paused and self._life != _CLOSED:
            self._drain = self.loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    def _wake_drain(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def _continue(self, request: Request) -> None:
        """The handler asks for a body behind `Expect: 100-continue`: its time starts now."""
        self.write_raw(_CONTINUE)
        if self.request is request and self._state == _WAIT:
            self._state = _BODY
            self._at = time.monotonic()

    # --- bounds -----------------------------------------------------------------------------

    def _expire(self, now: float) -> None:
        """The sweep's look: the phase past its bound ends (see the table above)."""
        state = self._state
        limits = self.server.limits
        if state == _IDLE:
            if self.idle and now - self.last_active > limits.keepalive_timeout_s:
                self.close()
        elif self._paused_reading:
            return  # the edge stopped reading (requests queued): not the client's slowness
        elif state == _HEAD:
            if now - self._at > limits.header_timeout_s:
                self._fail(408, "The request head was not received in time.")
        elif state == _BODY and limits.body_min_rate:
            elapsed = now - self._at
            request = self.request
            if (
                elapsed > limits.body_grace_s
                and request is not None
                and request._size < limits.body_min_rate * elapsed
            ):
                self._fail(408, "The request body arrived too slowly.")

    def _measure_head(self) -> None:
        """The head may be over a bound: measured exactly (the bytes that arrived count the
        framing too); `_HeadRefused` stops the parser."""
        limits = self.server.limits
        if len(self._raw) > limits.max_header_fields:
            fields = limits.max_header_fields
            raise _HeadRefused(431, f"The request has over {fields} header fields.")
        size = len(self._url) + sum(len(n) + len(v) for n, v in self._raw)
        if size > limits.max_head_bytes:
            raise _HeadRefused(431, self.server.head_too_large)

    def _over_cap(self) -> None:
        """More bytes arrived for this message than its parts explain: a head over the limit
        (431), or a chunked body whose framing (size lines, extensions, trailer fields, which
        llhttp and httptools hold or skip unseen) outgrows the body itself (400)."""
        request = self.request
        if request is None:
            self._fail(431, self.server.head_too_large)
            return
        allowed = 2 * self.server.head_cap + 2 * request._size
        if self._since > allowed:
            self._fail(400, "The chunked framing of the request body is over its limit.")
        else:
            self._cap = allowed

    def _refused(self, exc: httptools.HttpParserError) -> None:
        # httptools wraps an exception raised in a callback (HttpParserCallbackError).
        cause = exc.__context__
        request = self.request
        if isinstance(cause, _Refused):
            self._drop_input()  # over max_body: its handler answers 413
        elif isinstance(cause, _HeadRefused):
            self._fail(cause.status, cause.message)
        elif request is not None:
            self._fail(400, f"The request body is malformed: {exc}.")
        else:
            self._fail(400, "Malformed HTTP request.")

    def _fail(self, status: int, message: str) -> None:
        """The client's input is refused (malformed, over a bound, too slow): nothing more of it
        is parsed. The request it belongs to fails with it, and its handler answers (in the
        client's dialect); input outside any request is answered here. Then a lingering close."""
        request = self.request
        self._drop_input()
        if request is not None:
            if request._dropping:  # answered already
                self._linger()
                return
            error = RequestTimeout(message) if status == 408 else BadRequest(message)
            request._fail(error)
            if not request._dispatched:
                self._dispatch(request)
            return
        if self.task is None:
            self._answer(status, message)
            self._linger()
        else:  # after the answers to the requests before it, in order
            self._refusal = (status, message)

    # --- the rare phases: dropping, lingering -----------------------------------------------

    def _start_drain(self, request: Request) -> None:
        request._drop_rest()
        self._state = _DRAIN
        # Past linger_s the client has had its answer long enough: cut (a close would wait for
        # a client that does not read to take the rest of the answer).
        self._timer = self.loop.call_later(self.server.limits.linger_s, self.abort)

    def _drained(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.server.closing:
            self.close()

    def _drop_input(self) -> None:
        """Stop parsing: whatever the client still sends is read and dropped, up to a budget."""
        self.request = None
        if self._state < _DROP:
            self._state = _DROP
            self._dropped = 0

    def _discard(self, size: int) -> None:
        self._dropped += size
        if self._dropped > self.server.limits.max_discard_bytes:
            self.abort()

    def _end(self) -> None:
        """Close after an answer; lingering when the client may still be sending."""
        if self._state == _IDLE and not self.queue:
            self.close()
        else:
            self._linger()

    def _linger(self) -> None:
        """nginx's lingering close: FIN once the answer is out, then read and drop whatever
        still comes, for at most linger_s and max_discard_bytes; then close."""
        transport = self.transport
        if transport is None or self._life == _CLOSED or transport.is_closing():
            return
        self._drop_input()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._state == _EOF or not self.server.limits.linger_s or not transport.can_write_eof():
            self.close()
            return
        if self._paused_reading:
            self._paused_reading = False
            transport.resume_reading()
        try:
            transport.write_eof()
        except OSError:  # the client is gone already (reset, ENOTCONN): nothing to linger for
            self.abort()
            return
        self._timer = self.loop.call_later(self.server.limits.linger_s, self.abort)

    def _answer(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        """An answer of the connection's own, outside any request: then it closes."""
        body = error_json(status, message, kind, OPENAI)
        self.write_raw(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%b" % (status, _reason(status).encode(), len(body), body)
        )  # fmt: skip

    def close(self) -> None:
        if self.transport is not None and self._life != _CLOSED:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and self._life != _CLOSED:
            self.transport.abort()

    def __repr__(self) -> str:
        return (
            f"<Connection {self.peer} {_LIVES[self._life]} reading={_STATES[self._state]}"
            f" response={_RESPONSES[self._response]} busy={self.task is not None}"
            f" queued={len(self.queue)}>"
        )


class _HeadRefused(Exception):
    """Raised in a parser callback: the head is refused with `status`; `message` says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Refused(Exception):
    """Raised in a parser callback: a body past max_body stops the parser there."""


def _size(limit: int) -> str:
    return f"{limit // 1024} KB" if limit % 1024 == 0 else f"{limit} bytes"


def _reason(status: int) -> str:
    return _REASONS.get(status, "Unknown")
