"""Upstream body -> client, as it arrives, with the client's flow control reaching the upstream.

Nothing is parsed per piece. A body the first read already holds whole (most non-streaming
answers) goes out with its head in one write. Any other is piped: the upstream connection's
parser hands each piece straight to the client connection's transport (a `BodyPipe`, from
`UpstreamResponse.pipe`), with no task switch and no buffer in between; when the client's socket
backs up, the upstream socket stops being read. A chunked stream to an HTTP/1.1 client (the usual
SSE answer) keeps the framing it came with: each piece read goes out as it is, in whole chunks,
once edge/http/chunked.py checked it (the part of a chunk that a read ends inside waits for the
rest).
The relay keeps references to the first piece and the last two, and only after the last byte
went out does it look there for `usage` (OpenAI's usage object or `include_usage` chunk,
Anthropic's message_start/message_delta, Gemini's usageMetadata).

After the status is committed, an upstream that fails cannot be retried: an SSE stream ends with
an error event in the client's dialect and a clean end, wherever the upstream stopped (the
client is always between chunks, so the event can follow; the one exception is a chunk over
chunked.HOLD_MAX, passed on as it arrives: dying inside one, the upstream gets the client's
connection cut); any other body is cut off (the client sees a truncated response, never a
well-formed wrong one), the error event rendered by edge/dialects/errors.py. A client that goes
away cancels the handler (edge/http/server.py), and the caller closes the upstream.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from time import monotonic as _now
from typing import Final

import orjson

from edge.dialects.errors import STREAM_FAILED, error_event
from edge.dialects.paths import ANTHROPIC
from edge.http.chunked import unframe
from edge.http.client import (
    BodyPipe,
    Malformed,
    PastDeadline,
    Stopped,
    UpstreamError,
    UpstreamResponse,
)
from edge.http.server import Connection, Request
from edge.observe.record import Usage
from edge.observe.tracing import trace_id_of
from edge.proxy.continuation import (
    ERROR_EVENT,
    ERROR_KEY,
    Resumed,
    received,
    resume,
    whole_events,
)
from edge.proxy.forward import Upstream
from edge.proxy.native import broken_anthropic, broken_gemini
from edge.proxy.splice import broken
from edge.proxy.translate import MAX_ANSWER_BYTES, Events, Translation

_PROMPT_KEYS: Final = ("prompt_tokens", "input_tokens", "promptTokenCount")
_COMPLETION_KEYS: Final = ("completion_tokens", "output_tokens", "candidatesTokenCount")


class Relayed:
    """What the relay saw, for the observation recorded after it."""

    __slots__ = ("status", "bytes_out", "usage", "outcome", "first_sent_at", "ended_at")

    def __init__(
        self, status: int, bytes_out: int, usage: Usage | None, outcome: str,
        first_sent_at: float = 0.0, ended_at: float = 0.0,
    ) -> None:  # fmt: skip
        self.status = status
        self.bytes_out = bytes_out
        self.usage = usage
        self.outcome = outcome
        # Monotonic times: the first byte went out to the client; the upstream body ended.
        # Between them the relay mostly waits on the upstream (the edge's overhead excludes it).
        self.first_sent_at = first_sent_at
        self.ended_at = ended_at

    def __repr__(self) -> str:
        return f"<Relayed {self.status} {self.outcome} bytes={self.bytes_out}>"


async def relay(request: Request, up: Upstream, dialect: str, extra: bytes) -> Relayed:
    """`extra`: the edge's own response headers, rendered, added after the upstream's."""
    upstream, conn, first = up.response, request.conn, up.first
    status = upstream.status
    head = upstream.head.relayed + extra
    if upstream.complete:
        conn.start(request, status, upstream.reason, head, len(first), first)
        conn.end()
        now = time.monotonic()
        return Relayed(status, len(first), read_usage(first, first), "ok", now, now)
    conn.start(request, status, upstream.reason, head, upstream.content_length, first)
    first_sent_at = time.monotonic()
    keep = up.resume.keep if up.resume is not None and status == 200 else 0
    refuse = ERROR_EVENT if dialect == ANTHROPIC else ERROR_KEY
    pipe = upstream.pipe(conn.write, conn.write_raw if conn.chunked else None, keep, refuse)
    # The client's flow control reaches the upstream socket through the pipe from now on; a
    # pause that came before (the head, what was buffered) is passed on here.
    conn.source = pipe
    if conn.paused:
        pipe.pause_reading()
    # Nothing is awaited inside an `except` block here: compiled by mypyc, a coroutine suspended
    # there leaves its exception as the thread's current one, and every exception raised
    # meanwhile anywhere on the loop gets it as its __context__ (the HTTP server reads that).
    failure: UpstreamError | None = None
    try:
        await pipe.ended
    except UpstreamError as exc:
        failure = exc
    finally:
        conn.source = None
    if failure is not None:
        stopped = isinstance(failure, Stopped)
        message = STOPPED if stopped else STREAM_FAILED
        # The edge's drain, or the request's total time spent: not continued.
        final = stopped or isinstance(failure, PastDeadline)
        got = received(first, pipe) if keep and not final else None
        sent = len(first) + pipe.body_piped
        trace_id = trace_id_of(request.headers)  # the error event names the request's trace
        if got is not None:  # edge/proxy/continuation.py: on from another host
            done = await _resumed(conn, up, dialect, got, message, trace_id)
            if done is not None:
                usage = read_usage(got, b"".join(done.added[-3:])) if done.ok else None
                outcome = "ok" if done.ok else "stream_error"
                return Relayed(status, sent + done.sent, usage, outcome, first_sent_at, _now())
        ended_at = time.monotonic()
        _broken(request, upstream, pipe, dialect, first, message, trace_id)
        return Relayed(status, sent, None, "stream_error", first_sent_at, ended_at)
    ended_at = time.monotonic()
    conn.end()
    prev, last = pipe.prev, pipe.last
    tail = prev + last if prev else first + last
    usage = read_usage(first, unframe(tail) if pipe.raw else tail)
    return Relayed(status, len(first) + pipe.body_piped, usage, "ok", first_sent_at, ended_at)


async def _resumed(
    conn: Connection, up: Upstream, dialect: str, got: bytes, message: str, trace_id: str | None
) -> Resumed | None:
    """A stream that broke, continued from another host (edge/proxy/continuation.py), and the
    client's stream ended: whole, or with the error event. None: the client holds half an event,
    nothing was done (the caller ends the stream as it can)."""
    plan = up.resume
    if plan is None:
        return None
    if plan.foreign is None:  # OpenAI's stream, passed through
        had = broken(got, plan.chat)
        done = await resume(conn, up, had, conn.write, len(got))
        if done.ok:
            conn.end()
        elif had is not None:  # the client is between two whole events
            conn.write(error_event(dialect, message, trace_id))
            conn.end()
        else:
            return None
        return done
    # Anthropic's or Gemini's own stream: the continuation, from OpenAI's API, goes through the
    # dialect's translator, resumed where the client's stream stands.
    native = broken_anthropic(got) if dialect == ANTHROPIC else broken_gemini(got)
    if native is None:
        return None
    events = native.events(plan.preq.model)
    done = await resume(conn, up, native.had, lambda data: conn.write(events.feed(data)), len(got))
    conn.write(events.end() if done.ok else events.fail(message, trace_id))
    conn.end()
    return done


def _broken(
    request: Request, upstream: UpstreamResponse, pipe: BodyPipe, dialect: str, first: bytes,
    message: str, trace_id: str | None,
) -> None:  # fmt: skip
    conn = request.conn
    if conn.sized or not upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
        # An event after a Content-Length body would be read as part of it, or as the answer
        # to the client's next request: the cut is the only honest end.
        conn.abort()
        return
    last = pipe.last or first
    if pipe.raw:
        chunks = pipe.chunks
        if chunks is None or not chunks.at_boundary:
            # Inside a chunk over chunked.HOLD_MAX, passed on as it came: the client holds
            # part of it, and no event can follow.
            conn.abort()
            return
        if pipe.last:
            last = last[:-2]  # the CRLF that ended the chunk
    lead = b"" if last.endswith((b"\n\n", b"\r\n\r\n")) or not last else b"\n\n"
    conn.write(lead + error_event(dialect, message, trace_id))
    conn.end()


STOPPED = "The edge stopped while streaming this response; send the request again."


def read_usage(head: bytes, tail: bytes) -> Usage | None:
    """Token counts from the last usage object in `tail`, completed from `head` (Anthropic sends
    input tokens in message_start, at the head of the stream)."""
    found = _last_usage(tail)
    if found is None:
        return None
    prompt = _first_int(found, _PROMPT_KEYS)
    if prompt is None and head is not tail:
        prompt = _first_int(_last_usage(head) or {}, _PROMPT_KEYS)
    completion = _first_int(found, _COMPLETION_KEYS)
    if prompt is None and completion is None:
        return None
    return Usage(prompt or 0, completion or 0)


def _last_usage(data: bytes) -> dict[str, object] | None:
    """The last usage object in `data`, found from the end with rfind and cut out by counting
    braces, both at C speed; a regex that matched the nested object cost more than the rest of
    the request's work in this module together."""
    at = data.rfind(b'"usage')
    while at >= 0:
        start = _object_start(data, at)
        if start >= 0:
            end = _object_end(data, start)
            if end >= 0:
                try:
                    doc = orjson.loads(data[start:end])
                except orjson.JSONDecodeError:
                    return None
                return doc if isinstance(doc, dict) else None
        at = data.rfind(b'"usage', 0, at)  # `"usage": null` in a chunk, or a key in a prompt
    return None


def _object_start(data: bytes, at: int) -> int:
    """Where the object opens after the `"usage"` or `"usageMetadata"` key at `at`, or -1."""
    if data.startswith(b'"usage"', at):
        i = at + 7
    elif data.startswith(b'"usageMetadata"', at):
        i = at + 15
    else:
        return -1
    n = len(data)
    while i < n and data[i] in b" \t\r\n":
        i += 1
    if i >= n or data[i] != 58:  # ':'
        return -1
    i += 1
    while i < n and data[i] in b" \t\r\n":
        i += 1
    return i if i < n and data[i] == 123 else -1  # '{'


def _object_end(data: bytes, start: int) -> int:
    """One past the brace that closes the object opening at `start`, or -1 if it is cut off.
    Braces inside strings are not told apart: a usage object's strings hold none, and orjson
    refuses a slice that came out wrong."""
    depth, at = 0, start
    while True:
        close = data.find(b"}", at)
        if close < 0:
            return -1
        depth += data.count(b"{", at, close) - 1
        if depth == 0:
            return close + 1
        at = close + 1


def _first_int(doc: dict[str, object], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = doc.get(key)
        if value is None:
            continue
        if type(value) is int and value >= 0:  # not a bool, not a float
            return value
    return None


# --- the answer's way back --------------------------------------------------------------------


async def relay_translated(
    request: Request, up: Upstream, translation: Translation, extra: bytes
) -> Relayed:
    """The host's OpenAI answer -> the client, translated: a whole answer (or an error) at once,
    a stream event by event as the host sends it. `usage` is read from the host's own bytes."""
    upstream, conn = up.response, request.conn
    status = upstream.status
    head = (
        _without_content_type(upstream.head.relayed)
        + b"Content-Type: %b\r\n"
        % (translation.content_type if status < 300 else b"application/json")
        + extra
    )
    if status >= 300 or not translation.stream:
        body = await _whole(upstream, up.first)
        try:
            out = translation.answer(body) if status < 300 else translation.error(status, body)
        except ValueError:  # the host's answer is not what OpenAI's API sends
            conn.abort()
            now = time.monotonic()
            return Relayed(status, 0, None, "stream_error", now, now)
        conn.start(request, status, upstream.reason, head, len(out), out)
        conn.end()
        now = time.monotonic()
        usage = read_usage(body, body) if status < 300 else None
        return Relayed(status, len(out), usage, "ok", now, now)
    events = translation.events()
    sink = _Translating(events, conn.write)
    first = up.first
    conn.start(request, status, upstream.reason, head, None, sink.translate(first))
    first_sent_at = time.monotonic()
    keep = up.resume.keep if up.resume is not None and status == 200 else 0
    pipe = upstream.pipe(sink, None, keep, ERROR_KEY)
    sink.pipe = pipe
    conn.source = pipe
    if conn.paused:
        pipe.pause_reading()
    failure: UpstreamError | None = None  # handled outside the `except`: see `relay`
    try:
        await pipe.ended
        if sink.failed:
            raise Malformed("the model server's stream could not be translated")
    except UpstreamError as exc:
        failure = exc
    finally:
        conn.source = None
    if failure is not None:
        message = STOPPED if isinstance(failure, Stopped) else STREAM_FAILED
        final = isinstance(failure, Stopped | PastDeadline) or sink.failed
        got = received(first, pipe) if keep and not final else None
        if got is not None:  # edge/proxy/continuation.py: on from another host
            # The translator holds the half event the client never saw: continued instead.
            events.drop_partial()
            done = await resume(conn, up, broken(whole_events(got), True), sink, len(got))
            if done.ok and not sink.failed:
                return _translated_end(conn, events, sink, status, got, done.added, first_sent_at)
        conn.write(events.fail(message, trace_id_of(request.headers)))
        conn.end()
        return Relayed(status, sink.sent, None, "stream_error", first_sent_at, _now())
    prev, last = pipe.prev, pipe.last
    tail = [prev, last] if prev else [first, last]
    return _translated_end(conn, events, sink, status, first, tail, first_sent_at)


def _translated_end(
    conn: Connection, events: Events, sink: _Translating, status: int, head: bytes,
    tail: list[bytes], first_sent_at: float,
) -> Relayed:  # fmt: skip
    """A translated stream ended cleanly: the dialect's closing events, and the record."""
    ended_at = time.monotonic()
    try:
        out = events.end()
    except ValueError:  # the host's last line was no OpenAI event
        out = events.fail(STREAM_FAILED)
    conn.write(out)
    conn.end()
    usage = read_usage(head, b"".join(tail[-3:]))
    return Relayed(status, sink.sent, usage, "ok", first_sent_at, ended_at)


class _Translating:
    """The pipe's sink: each piece of the host's stream, translated, to the client."""

    __slots__ = ("events", "write", "pipe", "sent", "failed")

    def __init__(self, events: Events, write: Callable[[bytes], None]) -> None:
        self.events = events
        self.write = write
        self.pipe: BodyPipe | None = None
        self.sent = 0
        self.failed = False

    def translate(self, data: bytes) -> bytes:
        try:
            out = self.events.feed(data)
        except ValueError:  # a line past the translator's bound: not an OpenAI stream
            self.failed = True
            if self.pipe is not None:
                self.pipe.settle(None)
            return b""
        self.sent += len(out)
        return out

    def __call__(self, data: bytes) -> None:
        if not self.failed:
            self.write(self.translate(data))

    def __repr__(self) -> str:
        return f"<Translating sent={self.sent} failed={self.failed}>"


async def _whole(upstream: UpstreamResponse, first: bytes) -> bytes:
    """The rest of a non-streamed answer, bounded by MAX_ANSWER_BYTES."""
    if upstream.complete:
        return first
    parts, size = [first], len(first)
    while piece := await upstream.readany():
        size += len(piece)
        if size > MAX_ANSWER_BYTES:
            raise Malformed("the model server's answer is too large to translate")
        parts.append(piece)
    return b"".join(parts)


def _without_content_type(block: bytes) -> bytes:
    lines = block.split(b"\r\n")
    return b"".join(
        line + b"\r\n"
        for line in lines
        if line and line.partition(b":")[0].strip().lower() != b"content-type"
    )
