"""Mid-stream continuation: a stream whose host breaks after the first byte goes on from another
host, and the client sees one stream.

Theory of operation: while a continuable stream is relayed (OpenAI's chat or legacy completions,
one choice, as sent to the host: translated Anthropic and Gemini requests included; Anthropic's
and Gemini's own streams from hosts that speak them, edge/proxy/native.py), the bytes the client
got are kept, bounded (`BodyPipe.kept`); nothing is parsed. When it breaks
(the connection reset or closed early, bad framing, a stall past upstream.stall_timeout_s, or an
error event, which the pipe holds back instead of relaying), `resume` parses what the client has
(edge/proxy/splice.py: `broken`), sends the request to another routable host with that text
appended as the start of the answer (`continuation_body`: the assistant prefill that vLLM,
SGLang and llama.cpp continue; the prompt plus the text for completions) and splices that
host's stream into the client's (`Splice`: the first stream's id, created, model and
fingerprint; no second role delta; one [DONE]; usage summed). A continuation that breaks is
continued again, up to routing.max_continuations per request; every one goes through the
forwarder's plan, so the retry budget, health and the pool's bounds apply as to any retry.

The client's stream is whole or ends with the edge's error event, never passed off as complete:
what cannot be continued soundly (tool calls, several choices, reasoning deltas, a half event in
the client's hands, a stream longer than the kept bound) ends as it did before continuation.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, Final

import orjson

from edge.dialects import OPENAI
from edge.errors import EdgeError
from edge.http.client import BodyPipe, Malformed, UpstreamError, UpstreamResponse
from edge.http.server import Connection
from edge.proxy.forward import Upstream
from edge.proxy.route import ProxyRequest
from edge.proxy.splice import Broken, Splice, broken, closing, continuation_body
from edge.routing.attempt import OK, STREAM_ERROR

# The key of an error event in an OpenAI stream: a piece that holds it is not relayed while the
# stream can still be continued (BodyPipe.refuse). JSON-escaped text never holds it: a quote in
# a string is escaped.
ERROR_KEY: Final = b'"error":'
# Anthropic's: every error event is named so (llama.cpp's carries no "error" key).
ERROR_EVENT: Final = b"event: error"
_DONE: Final = b"data: [DONE]\n\n"


class Resumed:
    """What `resume` did: whether the client's stream now ends whole, and the bytes it added."""

    __slots__ = ("ok", "added", "sent")

    def __init__(self) -> None:
        self.ok = False
        self.added: list[bytes] = []  # client-visible OpenAI SSE, as emitted
        self.sent = 0

    def __repr__(self) -> str:
        return f"<Resumed ok={self.ok} sent={self.sent}>"


def received(first: bytes, pipe: BodyPipe) -> bytes | None:
    """What the client got of a broken stream, un-chunked (`first` went out with the head);
    None when it was not kept (past the bound) or its framing cannot be read back exactly."""
    kept = pipe.kept_bytes()
    if kept is None:
        return None
    if not pipe.raw:
        return first + kept
    body = dechunk(kept[pipe.plain :])
    if body is None:
        return None
    return first + kept[: pipe.plain] + body


def dechunk(data: bytes) -> bytes | None:
    """Whole chunks (size line, data, CRLF; the last chunk ends it) -> their data; None for
    anything else."""
    out: list[bytes] = []
    at, n = 0, len(data)
    while at < n:
        eol = data.find(b"\r\n", at)
        if eol < 0:
            return None
        size_line = data[at:eol].partition(b";")[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            return None
        if size == 0:
            break
        start = eol + 2
        end = start + size
        if data[end : end + 2] != b"\r\n":
            return None
        out.append(data[start:end])
        at = end + 2
    return b"".join(out)


def whole_events(data: bytes) -> bytes:
    """`data` up to its last complete event (a translated stream's client never saw the rest:
    the translator holds a partial line)."""
    lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
    # Each end only where its separator was found: rfind's -1 plus 4 would cut at byte 3.
    cut = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
    return data[:cut]


async def resume(
    conn: Connection, up: Upstream, had: Broken | None, emit: Callable[[bytes], None], kept: int
) -> Resumed:
    """Continue `up`'s broken stream (`had`: what the client has of it, read back; None: it
    cannot be continued) on other hosts. What the continuations send (OpenAI's SSE, spliced)
    goes through `emit`: to the client, or to the translator of its dialect. `kept`: the bytes
    held of the stream so far (the continuations' count against routing.continuation_keep_bytes
    too). `up` is left holding the last attempt (the exchange records and closes it)."""
    plan = up.resume
    result = Resumed()
    if plan is None:
        return result
    forwarder = plan.forwarder
    metrics, model = forwarder.metrics, plan.preq.model
    while True:
        up.attempt.finish(STREAM_ERROR, time.monotonic())
        up.response.close()
        plan.tried.append(up.host)
        sent = plan.sent()
        if had is None or sent is None or plan.count >= plan.limit:
            metrics.continued(model, "refused" if had is None or sent is None else "failed")
            return result
        doc = _doc(sent)
        body = continuation_body(doc, had, plan.chat) if doc is not None else None
        if body is None:
            if doc is not None and _limit_met(doc, had):
                _emit(result, emit, closing(had, plan.chat, "length", _include_usage(doc)))
                result.ok = True
                metrics.continued(model, OK)
            else:
                metrics.continued(model, "refused")
            return result
        plan.count += 1
        again = ProxyRequest(OPENAI, sent.route, model, True, body, sent.target, doc or {})
        try:
            nxt = await forwarder.open(again, plan.hosts, plan.headers, None, plan.tried)
        except EdgeError:
            metrics.continued(model, "failed")
            return result
        up.attempt, up.response, up.first = nxt.attempt, nxt.response, nxt.first
        up.tries += nxt.tries
        if nxt.response.status != 200:
            # The host refused the continuation itself (a 4xx: it cannot prefill, say): no
            # other host would take it better.
            up.attempt.finish(OK, time.monotonic())
            metrics.continued(model, "failed")
            return result
        metrics.continued(model, OK)
        splice = Splice(had, plan.chat)
        before = len(result.added)
        if await _splice(conn, nxt.response, nxt.first, splice, result, emit):
            result.ok = True
            return result
        added = b"".join(result.added[before:])
        kept += len(added)
        if kept > plan.keep:
            had = None  # too long to continue again
        elif added:
            had = extended(had, added, plan.chat)


def extended(had: Broken, added: bytes, chat: bool) -> Broken | None:
    """`had` with what a continuation added since (whole events, spliced: the same id); None
    when the whole can no longer be continued."""
    more = broken(added, chat)
    if more is None:
        return None
    return dataclasses.replace(
        had,
        text=had.text + more.text,
        tokens=had.tokens + more.tokens,
        finish_reason=more.finish_reason,
        usage=more.usage or had.usage,
    )


async def _splice(
    conn: Connection,
    response: UpstreamResponse,
    first: bytes,
    splice: Splice,
    result: Resumed,
    emit: Callable[[bytes], None],
) -> bool:
    """Relay one continuation through `splice`; True when it ended whole."""
    sink = _Spliced(splice, result, emit)
    sink(first)
    if splice.failed:
        return False
    pipe = response.pipe(sink)
    sink.pipe = pipe
    conn.source = pipe
    if conn.paused:
        pipe.pause_reading()
    try:
        await pipe.ended
    except UpstreamError:
        return False
    finally:
        conn.source = None
    _emit(result, emit, splice.end())
    if splice.failed:
        return False
    if not splice.done:
        if splice.finish_reason is None:
            return False  # a clean end with the answer unfinished: a break like any other
        _emit(result, emit, _DONE)  # finished, only the [DONE] line was missing
    return True


class _Spliced:
    """A continuation's pipe sink: each piece rewritten into the client's stream."""

    __slots__ = ("splice", "result", "emit", "pipe")

    def __init__(self, splice: Splice, result: Resumed, emit: Callable[[bytes], None]) -> None:
        self.splice = splice
        self.result = result
        self.emit = emit
        self.pipe: BodyPipe | None = None

    def __call__(self, data: bytes) -> None:
        splice = self.splice
        if splice.failed:
            return
        out = splice.feed(data)
        if out:
            _emit(self.result, self.emit, out)
        if splice.failed and self.pipe is not None:
            self.pipe.settle(Malformed("the server sent an error event mid-stream"))

    def __repr__(self) -> str:
        return f"<Spliced {self.result!r}>"


def _emit(result: Resumed, emit: Callable[[bytes], None], data: bytes) -> None:
    if data:
        result.added.append(data)
        result.sent += len(data)
        emit(data)


def _doc(sent: ProxyRequest) -> dict[str, Any] | None:
    """The request as sent (a translated one's body is parsed only now, on failure)."""
    if sent.doc:
        return sent.doc
    try:
        doc = orjson.loads(sent.body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(doc, dict):
        sent.doc = doc
        return doc
    return None


def _limit_met(doc: dict[str, Any], had: Broken) -> bool:
    for key in ("max_completion_tokens", "max_tokens"):
        limit = doc.get(key)
        if type(limit) is int:
            return had.tokens >= limit and had.finish_reason is None
    return False


def _include_usage(doc: dict[str, Any]) -> bool:
    options = doc.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


__all__ = [
    "ERROR_EVENT", "ERROR_KEY", "Resumed", "dechunk", "extended", "received", "resume",
    "whole_events",
]  # fmt: skip
