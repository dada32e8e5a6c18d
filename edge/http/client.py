"""A lean HTTP/1.1 client for the one request shape the edge sends: POST with a known body.

Why not aiohttp's ClientSession here: measured side by side, its per-request machinery (request
and response objects, tracing hooks, timers, payload wrappers, a StreamReader per response) costs
about three times what aiohttp's own server costs per request, and it sits on every proxied call.
This client keeps only what a proxy needs: keep-alive connections pooled per origin, one write per
request, a C parser (httptools, llhttp) for heads and sized bodies, a checking reader for chunked
ones (edge/http/chunked.py: the relay passes their framing through), and timers armed only while
someone actually waits.

Theory of operation: a `_Conn` is an asyncio Protocol owning one socket and one parser. `post()`
takes an idle connection (or opens one), writes the request, and waits for the response head. The
`UpstreamResponse` it returns buffers body pieces as the parser emits them; `readany()` hands
over everything buffered at once. Past `_HIGH_WATER` buffered bytes the socket stops being read
until the reader catches up. A relay hands the rest of a body on with `pipe()` instead: the
`BodyPipe` it returns gets each piece from the connection's parser and passes it to the client's
socket, and the client's flow control pauses the upstream socket through it, so a slow client
slows the upstream instead of growing memory.
A connection goes back to the pool only after its response was read to the end and both sides
allow keep-alive; any other ending closes it, and so do bytes past the end of a body (with it, or
while the connection idles in the pool): read later, they would pass for the next answer.

Bounds, each named in [upstream]: a head over `max_head_bytes` (interim 1xx heads included) is a
bad answer; a request waits at most `pool_timeout_s` for a slot of an origin whose
`max_connections_per_server` are all busy (PoolFull: the forwarder moves on, the server is not
blamed); a body gap over `read_timeout` fails the body, but only while the edge is reading: a
pause asked by a lagging client stops that clock (`BodyPipe.pause_reading`).

A pooled connection the server already closed (llama.cpp's server closes after each stream) fails
before a single response byte arrives: that is retried at once on a fresh connection and never
reported as a failure of the host.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import re
import socket
import ssl
import time
from collections.abc import Callable
from typing import ClassVar, Final, cast
from urllib.parse import urlsplit

import httptools
from aiohttp.abc import AbstractResolver
from multidict import CIMultiDict

from edge.http import chunked, heads

_HIGH_WATER: Final = 256 * 1024  # buffered body bytes before the socket stops being read
_DNS_TTL_S = 60.0
_now: Final = time.monotonic

log = logging.getLogger("edge.upstream")


class UpstreamError(Exception):
    """An attempt failed before or while reading the response. `reason` is client-safe text."""

    # ClassVar: compiled by mypyc, a plain class attribute of an exception class becomes an
    # instance attribute that nothing sets.
    outcome: ClassVar[str] = "connect_error"
    counts: ClassVar[bool] = True  # against the host's health (False: not the host's doing)

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConnectFailed(UpstreamError):
    pass


class Disconnected(UpstreamError):
    """The connection closed before the response was complete."""


class Stopped(UpstreamError):
    """The edge ended the body itself: its drain deadline passed with the response unfinished."""

    outcome: ClassVar[str] = "stream_error"  # it only happens mid-body


class TimedOut(UpstreamError):
    outcome: ClassVar[str] = "timeout"


class PastDeadline(TimedOut):
    """The response outlived upstream.total_timeout_s: a stream is not continued past it."""


class FirstByteLate(TimedOut):
    """No first byte (head or body) within the attempt's first-byte deadline."""


class Malformed(UpstreamError):
    outcome: ClassVar[str] = "malformed"


class PoolFull(UpstreamError):
    """Every connection slot of the origin stayed busy for `pool_timeout_s`: nothing was sent,
    and the server is only busy, not failing."""

    outcome: ClassVar[str] = "pool_full"
    counts: ClassVar[bool] = False


class _Origin:
    __slots__ = ("url", "key", "host", "port", "ssl", "server_hostname", "host_header", "ip")

    def __init__(self, base_url: str, ssl_context: ssl.SSLContext | None) -> None:
        self.url = base_url  # for log lines
        parts = urlsplit(base_url)
        secure = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if secure else 80)
        self.key = (parts.scheme, self.host, self.port)
        self.ssl = ssl_context if secure else None
        self.server_hostname = self.host if secure else None
        self.host_header = parts.netloc.rpartition("@")[2].encode("idna")
        self.ip = _is_ip(self.host)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class UpstreamResponse:
    """An upstream response: its head, and its body, read here (`readany`, buffered as the parser
    emits it) or handed on as it arrives through a `BodyPipe` (`pipe`). Owns the connection
    until `close`, and the timers that fail the body: a gap while read (`read_timeout`), the
    total (`set_deadline`)."""

    __slots__ = (
        "status", "reason", "_headers", "block", "head", "read_timeout", "chunks", "piping",
        "_conn", "_loop", "_buf", "_size", "_eof", "_exc", "_waiter", "_paused", "_deadline",
    )  # fmt: skip

    def __init__(
        self, conn: _Conn, status: int, reason: str, block: bytes, head: heads.Head
    ) -> None:
        self.status = status
        self.reason = reason
        self.block = block  # the header lines as received
        self.head = head  # what the relay needs of them (edge/http/heads.py)
        self._headers: CIMultiDict[str] | None = None
        self.read_timeout = 60.0
        self.chunks: chunked.Chunks | None = None  # the reader of a chunked body
        # The pipe, once `pipe` began: what went through it stays readable after a failure,
        # until `close`.
        self.piping: BodyPipe | None = None
        self._conn = conn
        self._loop = conn.loop
        self._buf: list[bytes] = []
        self._size = 0
        self._eof = False
        self._exc: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False  # reading stopped: `_buf` is over _HIGH_WATER
        self._deadline: asyncio.TimerHandle | None = None

    @property
    def headers(self) -> CIMultiDict[str]:
        """The head, decoded on first use: relaying a response never needs it."""
        if self._headers is None:
            self._headers = heads.decode(self.block)
        return self._headers

    @property
    def content_length(self) -> int | None:
        return self.head.length

    @property
    def complete(self) -> bool:
        return self._eof and not self._buf

    @property
    def buffered(self) -> bool:
        """Body bytes are waiting (`take` hands them over without a wait)."""
        return bool(self._buf)

    def take(self) -> bytes:
        return self._take()

    async def readany(self) -> bytes:
        """Everything buffered so far; b"" at the end. Raises UpstreamError on a broken body."""
        if not self._buf and not self._eof and self._exc is None:
            await self._wait()
        if self._buf:
            return self._take()
        if self._exc is not None:
            raise self._exc
        return b""

    async def read(self) -> bytes:
        chunks = []
        while chunk := await self.readany():
            chunks.append(chunk)
        return b"".join(chunks)

    def pipe(
        self,
        sink: Callable[[bytes], None],
        raw_sink: Callable[[bytes], None] | None = None,
        keep: int = 0,
        refuse: bytes = b"",
    ) -> BodyPipe:
        """From now on every body piece goes to `sink` as the parser emits it, with no task
        switch per piece: what was buffered at once, the rest through the `BodyPipe` returned,
        whose `ended` ends with the body (UpstreamError if it broke). A gap longer than
        `read_timeout` while reading fails the body; the pipe's `pause_reading` stops both.

        `raw_sink`, for a client whose body is chunked too: a chunked body (between chunks
        now) then goes there as the bytes that arrived, framing and all, in whole chunks (a
        chunk a read ends inside waits for the rest: edge/http/chunked.py), up to its last chunk
        (the pipe's `raw` tells which happened); what was buffered before goes to `sink`.

        `keep` > 0: the pieces handed on are kept (`BodyPipe.kept`) up to that many bytes, for
        a stream that may be continued elsewhere if it breaks (edge/proxy/continuation.py);
        past the bound nothing is kept. While pieces are kept, one that holds `refuse` (an
        error event's key) is not handed on: the body fails there (Malformed), so that the
        stream can be continued instead of ending with the server's error."""
        pipe = self.piping = BodyPipe(self, sink)
        if keep > 0:
            pipe.kept = []
            pipe.keep_left = pipe.keep = keep
            pipe.refuse = refuse
        if self._buf:
            pipe.feed(self._take())
        if self._exc is not None or self._eof:
            pipe.settle(self._exc)
            return pipe
        chunks = self.chunks
        if raw_sink is not None and chunks is not None and chunks.at_boundary:
            pipe.raw = True
            pipe.plain = pipe.keep - pipe.keep_left  # bytes kept before the framing went raw
            pipe.sink = raw_sink
        pipe.arm()
        self._conn.pipe = pipe
        return pipe

    def set_deadline(self, seconds: float) -> None:
        """Fail the body (and close the connection) `seconds` from now unless it ended."""
        self._deadline = self._loop.call_later(seconds, self._past_deadline)

    def stop(self) -> None:
        """End the body now, as if the server had failed mid-answer, and close the connection:
        the relay then ends the client's response in its dialect (an SSE error event)."""
        if not self._eof and self._conn is not None:
            self._fail(Stopped("the edge is shutting down"))
            self._conn.abort()

    def _expired(self, reason: str) -> None:
        if not self._eof:
            self._fail(TimedOut(reason))
            self._conn.abort()

    def _past_deadline(self) -> None:
        if not self._eof:
            self._fail(PastDeadline("the total timeout passed"))
            self._conn.abort()

    def close(self) -> None:
        """Give the connection back when the body was read to the end; otherwise close it."""
        if self._deadline is not None:
            self._deadline.cancel()
        pipe = self.piping
        if pipe is not None:
            pipe.cancel()
            self.piping = None  # the pipe refers back: no cycle left for the collector
        conn, self._conn = self._conn, None  # type: ignore[assignment]
        if conn is not None:
            conn.finish(reusable=self._eof and self._exc is None)

    async def _wait(self) -> None:
        loop = self._loop
        self._waiter = waiter = loop.create_future()
        timer = loop.call_later(self.read_timeout, self._timed_out)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _take(self) -> bytes:
        buf = self._buf
        data = buf[0] if len(buf) == 1 else b"".join(buf)
        buf.clear()
        self._size = 0
        if self._paused:
            self._paused = False
            self._conn.resume_reading()
        return data

    def _timed_out(self) -> None:
        self._expired("no data from the server within the read timeout")

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def feed(self, data: bytes) -> None:
        """A body piece while nobody pipes: buffered (a pipe gets its pieces from the
        connection directly, `_Conn.pipe`)."""
        self._buf.append(data)
        self._size += len(data)
        if self._size > _HIGH_WATER and not self._paused:
            self._paused = True
            self._conn.pause_reading()
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        if self.piping is not None:
            self.piping.settle(None)
        self._wake()

    def _fail(self, exc: UpstreamError) -> None:
        if not self._eof and self._exc is None:
            self._exc = exc
        if self.piping is not None:
            self.piping.settle(self._exc)
        self._wake()

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} buffered={self._size} eof={self._eof}>"


KEEP_BLOCK: Final = 64  # kept pieces joined into one block (BodyPipe.kept)
# Where a piece is searched for an error event (BodyPipe.refuse): a piece of one event, the usual
# case (an engine writes each event as it comes, and a failing one writes its error event after
# a pause), only at its start, past a chunk-size line; a longer one, where events may have come
# together, whole. A search of every piece whole cost more than the rest of keeping it.
REFUSE_HEAD: Final = 48
REFUSE_WHOLE: Final = 400


def _holds(data: bytes, refuse: bytes) -> bool:
    if len(data) <= REFUSE_WHOLE:
        return data.find(refuse, 0, REFUSE_HEAD) >= 0
    return refuse in data


class BodyPipe:
    """A response body on its way to a sink (the client's connection) as the parser emits it,
    made by `UpstreamResponse.pipe`. It is the client connection's `source` while it runs: the
    client's flow control pauses the upstream socket through it, and stops its idle clock too.
    What it handed on stays readable once it ended, for the relay's end of a failed stream: the
    bytes (`piped`, `body_piped`), the last two pieces, whether the framing went raw, and (when
    asked to keep them) every piece."""

    __slots__ = (
        "response", "sink", "ended", "raw", "chunks", "piped", "last", "prev", "timeout",
        "fed_at", "kept", "blocks", "keep", "keep_left", "plain", "refuse", "_idle", "_lagging",
    )  # fmt: skip

    def __init__(self, response: UpstreamResponse, sink: Callable[[bytes], None]) -> None:
        self.response = response
        self.sink = sink
        self.ended: asyncio.Future[None] = response._loop.create_future()  # with the body
        self.raw = False  # the sink gets the chunked framing as it came (see `pipe`)
        self.chunks = response.chunks
        self.piped = 0  # bytes handed to the sink
        self.last = self.prev = b""  # the last two pieces piped, where a stream's usage is
        self.timeout = response.read_timeout  # the longest gap while reading
        self.fed_at = 0.0  # when the server last sent bytes (the idle clock)
        # The pieces handed on, while they fit in `keep` bytes (None: not kept, or past the
        # bound): the latest as they came, the others joined KEEP_BLOCK at a time into `blocks`
        # (one growing buffer copied itself over and over as it grew; a piece each held one
        # small object per event alive). The first `plain` bytes came before the framing went
        # raw. `kept_bytes` joins them all.
        self.kept: list[bytes] | None = None
        self.blocks: list[bytes] = []
        self.keep = self.keep_left = 0
        self.plain = 0
        self.refuse = b""
        self._idle: asyncio.TimerHandle | None = None
        # The client's flow control paused reading (independent of whether the body goes on).
        self._lagging = False

    @property
    def body_piped(self) -> int:
        """Body bytes handed to the sink (raw pieces hold framing too)."""
        chunks = self.chunks
        return self.piped - chunks.framing if self.raw and chunks is not None else self.piped

    def feed(self, data: bytes) -> None:
        """A piece of the body, from the connection's parser (or chunked reader): the hot path."""
        kept = self.kept
        if kept is not None:
            refuse = self.refuse
            if refuse and _holds(data, refuse):
                self.response._fail(Malformed("the server sent an error event mid-stream"))
                return
            self.keep_left -= len(data)
            if self.keep_left >= 0:
                kept.append(data)
                if len(kept) == KEEP_BLOCK:
                    self.blocks.append(b"".join(kept))
                    kept.clear()
            else:
                self.kept = None  # too long to continue: the memory goes at once
        self.fed_at = _now()
        self.piped += len(data)
        self.prev, self.last = self.last, data
        self.sink(data)

    def kept_bytes(self) -> bytes | None:
        """Every byte handed on, when kept (None: not asked for, or past the bound)."""
        kept = self.kept
        if kept is None:
            return None
        return b"".join(self.blocks) + b"".join(kept)

    def arm(self) -> None:
        """Start the idle clock (unless the client lags already)."""
        self.fed_at = _now()
        if not self._lagging and self._idle is None:
            self._idle = self.response._loop.call_later(self.timeout, self._idle_check)

    def _idle_check(self) -> None:
        # One timer per gap instead of one per piece: re-armed for what is left of the gap.
        left = self.fed_at + self.timeout - _now()
        if left > 0:
            self._idle = self.response._loop.call_later(left, self._idle_check)
        else:
            self._idle = None
            self.response._timed_out()

    def pause_reading(self) -> None:
        """The client lags: stop reading the server, and stop the idle clock with it. Silence
        while the edge is not reading is the client's pause, not the server's stall; timed, it
        would fail a healthy stream and count against its server (aiohttp's client_proto stops
        its read timer the same way). The total deadline, if any, still runs."""
        self._lagging = True
        self._stop_clock()
        conn = self.response._conn
        if conn is not None:
            conn.pause_reading()

    def resume_reading(self) -> None:
        """The client caught up: read again, and the idle clock starts afresh."""
        self._lagging = False
        if not self.ended.done():
            self.arm()
        conn = self.response._conn
        if conn is not None:
            conn.resume_reading()

    def stop(self) -> None:
        """End the body now (the drain's deadline): see `UpstreamResponse.stop`."""
        self.response.stop()

    def settle(self, exc: UpstreamError | None) -> None:
        """The body ended (`exc` None) or broke: nothing more goes to the sink."""
        self._unhook()
        ended = self.ended
        if ended.done():
            return
        if exc is not None:
            ended.set_exception(exc)
        else:
            ended.set_result(None)

    def cancel(self) -> None:
        """The response is closed before the body ended: nobody waits for it any more."""
        self._unhook()
        if not self.ended.done():
            self.ended.cancel()

    def _unhook(self) -> None:
        self._stop_clock()
        conn = self.response._conn
        if conn is not None and conn.pipe is self:
            conn.pipe = None

    def _stop_clock(self) -> None:
        idle = self._idle
        if idle is not None:
            idle.cancel()
            self._idle = None

    def __repr__(self) -> str:
        return f"<BodyPipe piped={self.piped} raw={self.raw} ended={self.ended.done()}>"


class _Conn(asyncio.Protocol):
    """One upstream socket, its parser, and the response being read on it."""

    def __init__(self, pool: UpstreamPool, origin: _Origin) -> None:
        self.pool = pool
        # Cached: asyncio.get_running_loop() makes a getpid() system call each time.
        self.loop = asyncio.get_running_loop()
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.chunks: chunked.Chunks | None = None  # reading a chunked body (not the parser)
        self.response: UpstreamResponse | None = None
        self.pipe: BodyPipe | None = None  # where the body goes, while the response's pipe runs
        self.waiter: asyncio.Future[UpstreamResponse] | None = None
        # Bytes of the response head, gathered until the parser has it all: the piece that
        # brought it (the usual case, no copy), or a bytearray once it spans pieces.
        self.head: bytes | bytearray = b""
        self.chunky = False  # "chunked" was seen in the head being gathered
        self.reason = ""
        self.received = False  # any byte of the current response
        self.keep_alive = False
        self.close_delimited = False  # decided from the head, before anyone edits the headers
        self.closed = False
        self.paused = False  # reading, stopped for a lagging reader
        self.uses = 0
        self.idle_since = 0.0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but speak the same API.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received = True
        chunks = self.chunks
        if chunks is not None:
            self._chunk(chunks, data)
            return
        if self.response is not None:
            self._parse(data)
            return
        if self.waiter is None:
            # Bytes while the connection idles in the pool, answering no request: read later,
            # they would pass for the next request's answer (maybe another client's).
            self.abort()
            return
        self._head(data)

    def _head(self, data: bytes) -> None:
        """Bytes of a response head not yet whole (and maybe what follows it). The head is
        relayed from these bytes (edge/http/heads.py), so they are gathered; each byte is searched
        once (plus the 3 before a piece, for a CRLFCRLF across pieces) and appended in place,
        so a head that dribbles in costs what a whole one does; past `max_head_bytes` (1xx
        heads included) the answer is refused, instead of being gathered until a timeout."""
        start = len(self.head)
        head = self.head = data if start == 0 else self._gather(data)
        # One search tells most answers (sized ones) from a chunked one ("Chunked" or another
        # spelling goes the parser's way: correct, only not passed through).
        if not self.chunky and head.find(b"chunked", start - 6 if start > 6 else 0) >= 0:
            self.chunky = True
        if self.chunky:
            end = head.find(b"\r\n\r\n", start - 3 if start > 3 else 0)
            if end >= 0:
                # The parser gets the head alone: a chunked body is then read by chunked.py.
                cut = end + 4 - start
                if self._parse(data if cut >= len(data) else data[:cut]):
                    self._after_head(data[cut:])
                data = b""
        if len(data) and not self._parse(data):
            return
        if len(self.head) > self.pool.max_head_bytes and not self.closed:
            # Still no whole head (a whole one empties `head`).
            self._broken(Malformed(f"response head over {self.pool.max_head_bytes} bytes"))
            self.abort()

    def _gather(self, data: bytes) -> bytearray:
        head = self.head
        if isinstance(head, bytes):
            head = bytearray(head)  # a head in pieces: appended in place from now on
        head += data
        return head

    def _chunk(self, chunks: chunked.Chunks, data: bytes) -> None:
        response = self.response
        if response is None:  # bytes after a body that was read to its end
            self.abort()
            return
        pipe = self.pipe
        try:
            out = chunks.feed(data, pipe is not None and pipe.raw)
        except chunked.BadChunk as exc:
            if exc.good:
                self.on_body(exc.good)
            self._broken(Malformed("malformed chunked body from the server"))
            self.abort()
            return
        if len(out):
            if pipe is not None:
                pipe.feed(out)
            else:
                response.feed(out)
        elif pipe is not None:
            # Bytes came all the same (a chunk held until it is whole, a line not whole yet):
            # the server is not idle, so the idle clock starts again.
            pipe.fed_at = _now()
        if chunks.done:
            response.feed_eof()

    def _after_head(self, rest: bytes) -> None:
        """A head was parsed, and `rest` came after it: a chunked body goes to edge/http/chunked.py;
        anything else (a sized body, or what follows an interim 1xx) to the parser."""
        response = self.response
        if response is not None and response.head.chunked and not response._eof:
            self.chunks = response.chunks = chunks = chunked.Chunks()
            if rest:
                self._chunk(chunks, rest)
        elif rest:
            self._parse(rest)

    def _parse(self, data: bytes) -> bool:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._broken(Malformed("malformed response from the server"))
            self.abort()
            return False
        except httptools.HttpParserUpgrade:
            # A 101 to a POST that asked for no upgrade: what follows is not HTTP. A broken
            # server, not an edge failure: one line, no traceback, counted as a bad answer.
            log.warning(
                "upstream %s answered 101 Switching Protocols; connection closed", self.origin.url
            )
            self._broken(Malformed("the server switched protocols (HTTP 101)"))
            self.abort()
            return False
        return True

    def eof_received(self) -> bool:
        return False  # close our end too; a half-open upstream is of no use

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            reason = "connection closed before a response"
            self.waiter.set_exception(Disconnected(reason))
        response = self.response
        if response is not None and not response._eof:
            if exc is None and self.close_delimited:
                response.feed_eof()
            else:
                response._fail(Disconnected("connection closed in the middle of the response"))
        self.pool.forget(self)

    # httptools callbacks (no on_header: the parser then makes no Python call per field)
    def on_message_begin(self) -> None:
        if self.response is not None:
            # A second message after this request's answer: bytes past the end of its body.
            # Raising stops the parser before any of them is read as anyone's answer; the
            # answer already read stays whole, and the connection is closed (`_parse`).
            raise Malformed("bytes after the end of the response")

    def on_status(self, status: bytes) -> None:
        # llhttp lets any byte but CR and LF into a reason phrase; the client would get it as is.
        if _CONTROL.search(status) is not None:
            raise Malformed("control character in the status line")
        self.reason = status.decode("latin-1")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            if status < 100:  # llhttp takes any three digits: "099" would pass for interim
                raise Malformed("status below 100")
            return  # 1xx interim answers are not the response (101 raises in the parser)
        self.keep_alive = self.parser.should_keep_alive()
        raw = self.head
        block = _head_block(raw if isinstance(raw, bytes) else bytes(raw))
        if len(block) + len(self.reason) > self.pool.max_head_bytes:  # came whole in one read
            raise Malformed(f"response head over {self.pool.max_head_bytes} bytes")
        self.head = b""
        self.chunky = False
        head = self.pool.heads.get(block)
        self.close_delimited = not head.framed
        self.response = UpstreamResponse(self, status, self.reason, block, head)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(self.response)

    def on_body(self, body: bytes) -> None:
        # Straight to the pipe when one runs: no call in between on the per-piece path.
        pipe = self.pipe
        if pipe is not None:
            pipe.feed(body)
        elif self.response is not None:
            self.response.feed(body)

    def on_message_complete(self) -> None:
        if self.response is not None:
            self.response.feed_eof()

    # used by the pool and the response
    def _broken(self, exc: UpstreamError) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        if self.response is not None:
            self.response._fail(exc)

    def send(self, data: bytes) -> asyncio.Future[UpstreamResponse]:
        assert self.transport is not None
        self.waiter = self.loop.create_future()
        self.response = None
        self.pipe = None
        if self.chunks is not None:  # the parser stopped at the last head: a fresh one
            self.chunks = None
            self.parser = httptools.HttpResponseParser(self)
        self.head = b""
        self.received = False
        self.uses += 1
        self.transport.write(data)
        return self.waiter

    def finish(self, reusable: bool) -> None:
        self.waiter = None
        self.response = None
        self.pipe = None
        chunks = self.chunks
        if chunks is not None and chunks.extra:
            reusable = False  # bytes after the end of the body: this server is not to be trusted
        if reusable and self.keep_alive and not self.closed:
            # A relay paused by a slow client may have met the end of the body while paused:
            # the next request on this connection must find it reading.
            self.resume_reading()
            self.pool.release(self)
        else:
            self.abort()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed and self.paused:
            self.paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()
            # At once: connection_lost comes a loop turn later, and until then the pool must
            # not hand this connection out (nor `finish` keep it).
            self.closed = True

    def __repr__(self) -> str:
        return f"<_Conn {self.origin.key} uses={self.uses} closed={self.closed}>"


class UpstreamPool:
    """Keep-alive connections per origin, for one worker's event loop."""

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        keepalive_s: float,
        limit_per_origin: int,
        ssl_context: ssl.SSLContext | None,
        resolver: AbstractResolver | None = None,
        pool_timeout_s: float = 1.0,
        max_head_bytes: int = 64 * 1024,
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self.limit = limit_per_origin
        self.pool_timeout_s = pool_timeout_s  # the longest wait for a slot of a full origin
        self.max_head_bytes = max_head_bytes  # the largest response head (1xx heads included)
        self.ssl_context = ssl_context
        self.resolver = resolver
        self._origins: dict[str, _Origin] = {}
        self._idle: dict[tuple[str, str, int], list[_Conn]] = collections.defaultdict(list)
        self._open: dict[tuple[str, str, int], int] = collections.defaultdict(int)
        self._waiting: dict[tuple[str, str, int], collections.deque[asyncio.Future[None]]] = (
            collections.defaultdict(collections.deque)
        )
        self._dns: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self._conns: set[_Conn] = set()
        self.heads: heads.Seen[bytes, heads.Head] = heads.Seen(heads.read, 512)
        self.connects = 0
        self.stale_retries = 0
        self.pool_timeouts = 0  # waits for a slot that gave up (PoolFull)

    async def post(
        self,
        base_url: str,
        target: str,
        headers: bytes,
        body: bytes,
        head_timeout_s: float,
        connect_timeout_s: float | None = None,
    ) -> UpstreamResponse:
        """Send one POST and wait (up to `head_timeout_s`) for the response head. `headers`
        is a block of "Name: value\r\n" lines (`heads.render`)."""
        origin = self._origins.get(base_url)
        if origin is None:
            origin = self._origins[base_url] = _Origin(base_url, self.ssl_context)
        request = _request_bytes(origin, target, headers, body)
        conn = self._take_idle(origin)
        if conn is not None:
            # The usual case, inlined (a coroutine less per request): a pooled connection.
            waiter = conn.send(request)
            timer = conn.loop.call_later(head_timeout_s, _expire, conn, waiter)
            try:
                return await waiter
            except Disconnected:
                if conn.received:
                    raise
                self.stale_retries += 1  # the server had closed it while idle: not its fault
            except asyncio.CancelledError:
                conn.abort()
                raise
            finally:
                timer.cancel()
        conn = await self._connect(origin, connect_timeout_s or self.connect_timeout_s)
        return await self._exchange(conn, request, head_timeout_s)

    async def _exchange(self, conn: _Conn, request: bytes, timeout_s: float) -> UpstreamResponse:
        if conn.closed:  # it spoke before it was asked (data_received closed it)
            raise Disconnected("connection closed before a response")
        waiter = conn.send(request)
        timer = conn.loop.call_later(timeout_s, _expire, conn, waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            conn.abort()
            raise
        finally:
            timer.cancel()

    def _take_idle(self, origin: _Origin) -> _Conn | None:
        idle = self._idle.get(origin.key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive_s:
                return conn
            conn.abort()
        return None

    async def _connect(self, origin: _Origin, timeout_s: float) -> _Conn:
        key = origin.key
        if self._open[key] >= self.limit:
            reused = await self._wait_for_slot(origin)
            if reused is not None:
                return reused
        self._open[key] += 1
        try:
            conn = await self._open_connection(origin, timeout_s)
        except BaseException:
            self._open[key] -= 1
            self._wake_one(key)
            raise
        self._conns.add(conn)
        self.connects += 1
        return conn

    async def _wait_for_slot(self, origin: _Origin) -> _Conn | None:
        """Wait until the full origin has a free slot (None) or an idle connection, for at
        most `pool_timeout_s`: then PoolFull, and the forwarder tries another server instead
        of queueing behind a saturated one."""
        key = origin.key
        try:
            async with asyncio.timeout(self.pool_timeout_s):
                while self._open[key] >= self.limit:
                    await self._woken(key)
                    reused = self._take_idle(origin)
                    if reused is not None:
                        return reused
        except TimeoutError:
            self.pool_timeouts += 1
            raise PoolFull(f"pool full ({self.limit} connections busy)") from None
        return None

    async def _woken(self, key: tuple[str, str, int]) -> None:
        """Wait for a connection of this origin to close or go idle (`_wake_one`)."""
        waiting = self._waiting[key]
        while waiting and waiting[0].done():
            waiting.popleft()  # waiters that gave up, oldest first: the queue stays short
        waiter = asyncio.get_running_loop().create_future()
        waiting.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._wake_one(key)  # woken, then cancelled: the next in line gets the turn
            raise

    async def _open_connection(self, origin: _Origin, timeout_s: float) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                addresses = await self._resolve(origin)
                last: OSError | None = None
                for address in addresses:
                    try:
                        _, conn = await loop.create_connection(
                            lambda: _Conn(self, origin), address, origin.port, ssl=origin.ssl,
                            server_hostname=origin.server_hostname,
                        )  # fmt: skip
                        return conn
                    except ssl.SSLError:
                        raise
                    except OSError as exc:
                        last = exc
                raise ConnectFailed(f"connect failed ({_strerror(last)})")
        except TimeoutError:
            raise TimedOut("connect timed out") from None
        except ssl.SSLCertVerificationError:
            raise ConnectFailed("TLS certificate not trusted (upstream.ca_bundle?)") from None
        except ssl.SSLError:
            raise ConnectFailed("TLS handshake failed") from None

    async def _resolve(self, origin: _Origin) -> list[str]:
        if origin.ip or self.resolver is None:
            return [origin.host]
        key = (origin.host, origin.port)
        cached = self._dns.get(key)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            found = await self.resolver.resolve(origin.host, origin.port, socket.AF_UNSPEC)
        except OSError:
            raise ConnectFailed("DNS lookup failed") from None
        addresses = [r["host"] for r in found]
        self._dns[key] = (now + _DNS_TTL_S, addresses)
        return addresses

    def release(self, conn: _Conn) -> None:
        conn.idle_since = time.monotonic()
        self._idle[conn.origin.key].append(conn)
        self._wake_one(conn.origin.key)

    def forget(self, conn: _Conn) -> None:
        """A connection closed: free its slot under the per-origin limit."""
        if conn in self._conns:
            self._conns.discard(conn)
            self._open[conn.origin.key] -= 1
            self._wake_one(conn.origin.key)

    def _wake_one(self, key: tuple[str, str, int]) -> None:
        waiting = self._waiting.get(key)
        while waiting:
            waiter = waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        for conn in list(self._conns):
            conn.abort()
        self._idle.clear()
        await asyncio.sleep(0)  # let transports run connection_lost

    def __repr__(self) -> str:
        idle = sum(len(v) for v in self._idle.values())
        return (
            f"<UpstreamPool open={len(self._conns)} idle={idle} connects={self.connects} "
            f"stale_retries={self.stale_retries} pool_timeouts={self.pool_timeouts}>"
        )


_CONTROL: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _head_block(raw: bytes) -> bytes:
    """The header lines of the final response head at the start of `raw` (after any 1xx)."""
    while raw[9:10] == b"1" and raw.startswith(b"HTTP/"):  # interim: "HTTP/1.1 1xx ..."
        end = raw.find(b"\r\n\r\n")
        if end < 0:
            break
        raw = raw[end + 4 :]
    if raw[:5] != b"HTTP/":
        # llhttp skips empty lines before a status line; the head relayed from these bytes would
        # then start with the status line as if it were a header field.
        raise Malformed("response does not start with its status line")
    return heads.split(raw)


def _expire(conn: _Conn, waiter: asyncio.Future[UpstreamResponse]) -> None:
    if not waiter.done():
        waiter.set_exception(FirstByteLate("timed out before the first byte"))
        conn.abort()


def _strerror(exc: OSError | None) -> str:
    return (exc.strerror if exc is not None else None) or "error"


def _request_bytes(origin: _Origin, target: str, headers: bytes, body: bytes) -> bytes:
    if " " in target or "\n" in target or "\r" in target:
        raise Malformed("the request target contains a space or a line break")
    return (
        b"POST " + target.encode("utf-8", "surrogateescape") + b" HTTP/1.1\r\nHost: "
        + origin.host_header + b"\r\n" + headers + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )  # fmt: skip
