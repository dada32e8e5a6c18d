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

from edge.errors import PayloadTooLarge
from edge.heads import Seen

log = logging.getLogger("edge.http")

_EAGER_BODY: Final = 64 * 1024  # bodies announced up to this size are read before the handler runs
_MAX_HEAD: Final = 64 * 1024  # request line and headers, in bytes
_MAX_QUEUED = 8  # pipelined requests waiting before the socket stops being read
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_REASONS = {
    200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    413: "Payload Too Large", 422: "Unprocessable Entity", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout",
}  # fmt: skip
_NO_BODY: Final = frozenset({204, 304})


class Source(Protocol):
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
    headers: bytes = b""  # extra rendered "Name: value\r\n" lines


class Fields:
    """The header fields of a request but its Content-Length, shared by every request that sent
    the same ones. A client sends the same headers request after request (an SDK's, a
    gateway's), so they are decoded once, and what other modules derive from them (the block
    sent upstream) is kept in `memo` instead of being rebuilt per request."""

    __slots__ = ("raw", "headers", "memo", "expect", "chunked", "proto")

    def __init__(self, raw: tuple[tuple[bytes, bytes], ...]) -> None:
        self.raw = raw
        self.headers: CIMultiDict[str] = CIMultiDict(
            [(n.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for n, v in raw]
        )
        self.memo: dict[str, bytes] = {}
        self.expect = self.headers.get("Expect", "").lower() == "100-continue"
        self.chunked = "Transfer-Encoding" in self.headers
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
        "_limit", "_too_large", "_expect", "_length", "_dropping",
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
        self._size = 0
        self._complete = False
        self._waiter: asyncio.Future[None] | None = None
        self._limit = limit
        self._length = int(length) if length is not None and length.isdigit() else None
        self._too_large = self._length is not None and self._length > limit
        self._expect = fields.expect
        self._dropping = False

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
        """The whole body; PayloadTooLarge as soon as it is known to pass the limit."""
        if self._complete and not self._too_large:
            return self.body
        if self._too_large:
            self._refuse()
        if self._expect:
            self._expect = False
            self.conn.write_raw(_CONTINUE)
        while not self._complete:
            self._waiter = self.conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
            if self._too_large:
                self._refuse()
        return self.body

    def _refuse(self) -> None:
        self.keep_alive = False  # the rest of the body is not read: this connection cannot go on
        raise PayloadTooLarge(f"The request body is over the limit of {self._limit} bytes.")

    # fed by the connection
    def _feed(self, data: bytes) -> None:
        if self._too_large or self._dropping:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._too_large = True
            self._chunks.clear()
            self._wake()
            return
        self._chunks.append(data)

    def _unmet_expect(self) -> bool:
        """Answered without the 100 Continue its client waits for: the body will not come, and
        neither can a next request on this connection."""
        return self._expect and not self._complete

    def _drop_rest(self) -> None:
        # Read to the end and dropped, so the connection can go on to the next request: closing
        # with body bytes unread would reset it, and the client could lose the answer.
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

    def __init__(self, handler: Handler, max_body: int, keepalive_s: float = 75.0) -> None:
        self.handler = handler
        self.max_body = max_body
        self.keepalive_s = keepalive_s
        self.connections: set[Connection] = set()
        self.closing = False
        self.requests = 0
        self.fields: Seen[tuple[tuple[bytes, bytes], ...], Fields] = Seen(Fields, 256)
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
        self._sweeper = loop.call_later(min(5.0, self.keepalive_s), self._sweep)

    def _sweep(self) -> None:
        """Close connections idle past keep-alive (or stuck sending a request head): one timer
        per worker instead of one per request."""
        now = time.monotonic()
        for conn in list(self.connections):
            if conn.idle and now - conn.last_active > self.keepalive_s:
                conn.close()
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
        self.source: Source | None = None  # what feeds the current response, if anything
        self.closed = False
        self.last_active = time.monotonic()
        self._url = b""
        self._raw: list[tuple[bytes, bytes]] = []
        self._length: bytes | None = None  # the Content-Length field, apart from the others
        self._since = 0  # bytes received since the current message began (or more)
        self._dispatched = False
        self._paused_reading = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        # the response being written
        self._started = False
        self._chunked = False
        self._ended = False
        self._keep = True

    @property
    def idle(self) -> bool:
        return self.task is None and not self.queue and self.request is None

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but speak the same API.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        self._since += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(400, "Protocol upgrades are not supported.")
        except httptools.HttpParserError as exc:
            # httptools wraps an exception raised in a callback (HttpParserCallbackError).
            if isinstance(exc.__context__, _HeadTooLarge):
                self._reject(431, "The request line and headers are over 64 KB.")
            else:
                self._reject(400, "Malformed HTTP request.")
            return
        if self.request is None and self._since > 2 * _MAX_HEAD:
            # A head still incomplete after this much: refused before it grows any further.
            self._reject(431, "The request line and headers are over 64 KB.")

    def eof_received(self) -> bool:
        # A client's FIN ends the connection (as aiohttp has it): a stream it no longer reads
        # must free its upstream now, and clients that half-close and still read are rare.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.forget(self)
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

    def on_header(self, name: bytes, value: bytes) -> None:
        # Called per field: little else here. The head's size is judged from the bytes that
        # arrived (`_since`), and measured exactly only when those could exceed the limit.
        if len(name) == 14 and name.lower() == b"content-length":
            self._length = value  # kept apart: the other fields then repeat (see Fields)
        else:
            self._raw.append((name, value))

    def on_headers_complete(self) -> None:
        if self._since > _MAX_HEAD:
            size = len(self._url) + sum(len(n) + len(v) for n, v in self._raw)
            if size > _MAX_HEAD:
                raise _HeadTooLarge
        parser = self.parser
        fields = self.server.fields.get(tuple(self._raw))
        request = Request(
            self, parser.get_method().decode("ascii", "replace"),
            self._url.decode("utf-8", "surrogateescape"), fields, self._length,
            parser.get_http_version(), parser.should_keep_alive(), self.server.max_body,
        )  # fmt: skip
        self._length = None
        self.request = request
        length = request._length
        eager = length is not None and length <= _EAGER_BODY and not request._expect
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
        request = self.request
        if request is None:
            return
        self.request = None
        request._done()
        if not self._dispatched:
            self._dispatch(request)
        self._dispatched = False

    # --- dispatch ---------------------------------------------------------------------------

    def _dispatch(self, request: Request) -> None:
        self._dispatched = True
        self.server.requests += 1
        if self.task is None:
            self._start(request)
            return
        self.queue.append(request)
        if len(self.queue) >= _MAX_QUEUED and not self._paused_reading and self.transport:
            self._paused_reading = True
            self.transport.pause_reading()

    def _start(self, request: Request) -> None:
        self._started = self._chunked = self._ended = False
        self.task = self.loop.create_task(self._run(request))

    async def _run(self, request: Request) -> None:
        try:
            await self.server.handler(request)
        except asyncio.CancelledError:
            self.task = None
            self.abort()
            raise
        except Exception:
            log.exception("unhandled error in a request handler")
            if not self._started:
                body = b'{"error":{"message":"Internal error.","type":"server_error"}}'
                self.respond(request, 500, body)
            else:
                self.abort()
        self.task = None
        self._next(request)

    def _next(self, done: Request) -> None:
        if not self._ended:
            self.abort()  # the handler left its response unfinished
            return
        if not done._complete:  # answered without reading all of its body
            if done._unmet_expect():
                self.close()
                return
            done._drop_rest()
        if not (done.keep_alive and self._keep) or self.server.closing:
            self.close()
            return
        self.last_active = time.monotonic()
        if self.queue:
            if self._paused_reading and self.transport is not None and not self.closed:
                self._paused_reading = False
                self.transport.resume_reading()
            self._start(self.queue.popleft())

    # --- responses --------------------------------------------------------------------------

    def reply(self, request: Request, reply: Reply) -> None:
        self.respond(request, reply.status, reply.body, reply.content_type, reply.headers)

    def respond(
        self, request: Request, status: int, body: bytes, content_type: str = "application/json",
        headers: bytes = b"",
    ) -> None:  # fmt: skip
        """A whole response in one write. `headers`: extra rendered "Name: value\\r\\n" lines."""
        head = (
            b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nDate: %s\r\n%b"
            % (status, _reason(status).encode(), content_type.encode("latin-1"), len(body),
               self.server.date().encode(), headers)
        )  # fmt: skip
        self._started = self._ended = True
        if (
            not (request.keep_alive and self._keep)
            or self.server.closing
            or request._unmet_expect()
        ):
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
        self._started = True
        head = b"HTTP/1.1 %d %s\r\n%b" % (status, reason.encode("latin-1", "replace"), headers)
        keep = request.keep_alive and self._keep and not self.server.closing
        keep = keep and not request._unmet_expect()
        if status in _NO_BODY:
            self._ended = True
        elif length is not None:
            head += b"Content-Length: %d\r\n" % length
        elif request.version == "1.1":
            self._chunked = True
            head += b"Transfer-Encoding: chunked\r\n"
            if first:
                first = b"%x\r\n%b\r\n" % (len(first), first)
        else:
            keep = False
        if not keep:
            self._keep = False
            head += b"Connection: close\r\n"
        self.write_raw(head + b"\r\n" + first)

    def write(self, data: bytes) -> None:
        """A piece of the body, framed as `start` chose; dropped once the client is gone."""
        if self.closed or not data:
            return
        if self._chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        assert self.transport is not None
        self.transport.write(data)

    def end(self) -> None:
        if self._chunked and not self.closed:
            self.write_raw(b"0\r\n\r\n")
        self._ended = True

    def write_raw(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    @property
    def paused(self) -> bool:
        return self._write_paused

    @property
    def chunked(self) -> bool:
        """The body `start` began is chunked: `write_raw` takes pieces framed already."""
        return self._chunked

    async def drain(self) -> None:
        """Wait while the client's socket buffer is above its high-water mark."""
        while self._write_paused and not self.closed:
            self._drain = self.loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    def _wake_drain(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def _reject(self, status: int, message: str) -> None:
        """A request the parser refused: answer (if nothing else is being answered) and close."""
        self.request = None
        self._keep = False
        if self.task is None and not self.closed and self.transport is not None:
            body = b'{"error":{"message":"%s","type":"invalid_request_error"}}' % message.encode()
            self.write_raw(
                b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%b" % (status, _reason(status).encode(), len(body), body)
            )  # fmt: skip
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def __repr__(self) -> str:
        return f"<Connection {self.peer} busy={self.task is not None} queued={len(self.queue)}>"


class _HeadTooLarge(Exception):
    pass


def _reason(status: int) -> str:
    return _REASONS.get(status, "Unknown")
