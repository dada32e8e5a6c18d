"""Upstream body -> client, as it arrives: every read is written at once, with backpressure.

Nothing is parsed per chunk. The relay keeps references to the first chunk and the last two, and
only after the last byte went out does it look there for `usage` (OpenAI's usage object or
`include_usage` chunk, Anthropic's message_start/message_delta, Gemini's usageMetadata).

After the status is committed, an upstream that fails cannot be retried: an SSE stream ends with
an error event in the client's dialect and a clean close; any other body is cut off (the client
sees a truncated response, never a well-formed wrong one).
"""

from __future__ import annotations

import re
import time

import orjson
from aiohttp import web

from edge.forward import Upstream, client_headers
from edge.metrics import Usage
from edge.route import ANTHROPIC, GEMINI
from edge.upstream import UpstreamError, UpstreamResponse

_USAGE = re.compile(rb'"(?:usage|usageMetadata)"\s*:\s*(\{(?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*\})')
_PROMPT_KEYS = ("prompt_tokens", "input_tokens", "promptTokenCount")
_COMPLETION_KEYS = ("completion_tokens", "output_tokens", "candidatesTokenCount")


CLIENT_GONE = 499  # nginx's code for a request the client closed before the answer ended


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


async def relay(
    request: web.BaseRequest, up: Upstream, dialect: str, extra: dict[str, str]
) -> tuple[web.StreamResponse, Relayed]:
    upstream = up.response
    headers = client_headers(upstream)
    for name, value in extra.items():
        # The affinity cookie joins the upstream's own cookies; the edge's other headers win.
        if name == "Set-Cookie":
            headers.add(name, value)
        else:
            headers[name] = value
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    try:
        return response, await _pump(request, response, up, dialect)
    except ConnectionResetError:
        # The client hung up mid-answer: not an error of the edge's, so no traceback. The caller
        # closes the upstream at once (the server frees its slot); aiohttp's own final write on
        # this closed connection is a ConnectionError it already handles quietly.
        now = time.monotonic()
        return response, Relayed(CLIENT_GONE, 0, None, "client_disconnect", now, now)


async def _pump(
    request: web.BaseRequest, response: web.StreamResponse, up: Upstream, dialect: str
) -> Relayed:
    upstream = up.response
    await response.prepare(request)
    first = up.first
    prev = last = first
    sent = len(first)
    if first:
        await response.write(first)
    first_sent_at = time.monotonic()
    while True:
        try:
            chunk = await upstream.readany()
        except UpstreamError:
            ended_at = time.monotonic()
            await _broken(request, response, upstream, dialect, last)
            return Relayed(upstream.status, sent, None, "stream_error", first_sent_at, ended_at)
        if not chunk:
            break
        await response.write(chunk)
        sent += len(chunk)
        prev, last = last, chunk
    ended_at = time.monotonic()
    await response.write_eof()
    tail = last if prev is last else prev + last
    usage = read_usage(first, tail)
    return Relayed(upstream.status, sent, usage, "ok", first_sent_at, ended_at)


async def _broken(
    request: web.BaseRequest,
    response: web.StreamResponse,
    upstream: UpstreamResponse,
    dialect: str,
    last: bytes,
) -> None:
    if not upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
        if request.transport is not None:
            request.transport.close()
        return
    lead = b"" if last.endswith((b"\n\n", b"\r\n\r\n")) or not last else b"\n\n"
    await response.write(lead + error_event(dialect))
    await response.write_eof()


def error_event(dialect: str) -> bytes:
    """The final SSE event that tells a streaming client its upstream failed mid-answer."""
    message = "The model server failed while streaming this response."
    if dialect == ANTHROPIC:
        doc = {"type": "error", "error": {"type": "api_error", "message": message}}
        return b"event: error\ndata: " + orjson.dumps(doc) + b"\n\n"
    if dialect == GEMINI:
        body = {"error": {"code": 502, "message": message, "status": "UNAVAILABLE"}}
        return b"data: " + orjson.dumps(body) + b"\n\n"
    err = {"message": message, "type": "server_error", "param": None, "code": "upstream_error"}
    return b"data: " + orjson.dumps({"error": err}) + b"\n\n"


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
    found = None
    for found in _USAGE.finditer(data):  # noqa: B007 - the last match is the one wanted
        pass
    if found is None:
        return None
    try:
        doc = orjson.loads(found.group(1))
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def _first_int(doc: dict[str, object], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = doc.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None
