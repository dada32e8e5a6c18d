"""A request in Anthropic's or Gemini's dialect, sent to a host that speaks only OpenAI's API.

Where a host speaks the client's dialect (edge/routing/speaks.py), nothing here runs: the bytes
pass through. Otherwise the request goes to the host's /v1/chat/completions as the dialect module
translated it (edge/dialects/anthropic.py, gemini.py), with the client's key moved to where
OpenAI's API reads it, and the answer comes back translated: a JSON answer whole, a stream event
by event as it arrives (`Translation.events`), an upstream error in the dialect's error shape.
Only the generating calls translate; the dialects' other calls (token counting) answer 501 on
such a host.
"""

from __future__ import annotations

from typing import Any, Final, Protocol
from urllib.parse import parse_qsl

import orjson

from edge.dialects import anthropic as to_anthropic
from edge.dialects import gemini as to_gemini
from edge.dialects.errors import error_json
from edge.dialects.paths import ANTHROPIC, GEMINI
from edge.errors import BadRequest, Unsupported
from edge.proxy.route import ProxyRequest

TARGET: Final = "/v1/chat/completions"
# Bounds: a translated answer is read whole before it is translated (a non-streamed one).
MAX_ANSWER_BYTES: Final = 64 * 1024 * 1024
# Client key fields that OpenAI's API does not read; the key moves to Authorization.
_KEY_FIELDS: Final = (b"x-api-key", b"x-goog-api-key")
_DROPPED: Final = frozenset(
    {b"x-api-key", b"x-goog-api-key", b"anthropic-version", b"anthropic-beta"}
)
_TRANSLATED_ROUTES: Final = frozenset({"messages", "gemini"})


class Events(Protocol):
    """A dialect module's `Stream`: OpenAI stream bytes in, the dialect's bytes out."""

    def feed(self, data: bytes) -> bytes: ...
    def end(self) -> bytes: ...
    def fail(self, message: str, trace_id: str | None = None) -> bytes: ...
    def drop_partial(self) -> None: ...


class Translation:
    """One request's translation: the OpenAI body it sends, and its answer's way back."""

    __slots__ = ("dialect", "model", "stream", "sse", "body")

    def __init__(self, preq: ProxyRequest) -> None:
        if preq.route not in _TRANSLATED_ROUTES:
            raise Unsupported(
                "This call is not available here: the model's servers speak only OpenAI's API, "
                "and only message generation is translated to it."
            )
        self.dialect = preq.dialect
        self.model = preq.model
        self.stream = preq.stream
        query = preq.target.partition("?")[2]
        # Gemini streams as SSE with ?alt=sse, else as one JSON array written as it grows.
        self.sse = preq.dialect != GEMINI or ("alt", "sse") in parse_qsl(query)
        module = to_anthropic if preq.dialect == ANTHROPIC else to_gemini
        doc = module.request(preq.doc, preq.model, preq.stream)
        self.body = orjson.dumps(doc)

    @property
    def content_type(self) -> bytes:
        if self.stream and self.sse:
            return b"text/event-stream"
        return b"application/json"

    def events(self) -> Events:
        if self.dialect == ANTHROPIC:
            return to_anthropic.Stream(self.model)
        return to_gemini.Stream(self.model, self.sse)

    def answer(self, body: bytes) -> bytes:
        """A whole OpenAI chat.completion as the dialect's answer."""
        doc = _json(body)
        module = to_anthropic if self.dialect == ANTHROPIC else to_gemini
        return orjson.dumps(module.response(doc, self.model))

    def error(self, status: int, body: bytes) -> bytes:
        """An upstream error answer (OpenAI's shape, or anything) in the dialect's shape."""
        message = f"The model server answered HTTP {status}."
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, dict):
            err = doc.get("error")
            found = err.get("message") if isinstance(err, dict) else doc.get("detail")
            if isinstance(found, str) and found:
                message = found[:2000]
        kind = "invalid_request_error" if status < 500 else "server_error"
        return error_json(status, message, kind, self.dialect)

    def headers(self, block: bytes, query: str, passthrough: bool = True) -> bytes:
        """The header block for the translated request. In passthrough mode the client's key,
        from a dialect's own field or Gemini's ?key=, moves to Authorization; in the keyed modes
        the edge already replaced every client key (`block` has none) and ?key= stays behind."""
        kept: list[bytes] = []
        key = b"" if passthrough else b"-"
        for line in block.split(b"\r\n"):
            name = line.partition(b":")[0].strip().lower()
            if name in _KEY_FIELDS and not key:
                key = line.partition(b":")[2].strip()
            if name == b"authorization":
                key = b"-"  # the client sent OpenAI's field itself: keep it as it is
            if line and name not in _DROPPED:
                kept.append(line + b"\r\n")
        if not key:
            key = _query_key(query)
        if key and key != b"-":
            kept.append(b"Authorization: Bearer " + key + b"\r\n")
        return b"".join(kept)

    def __repr__(self) -> str:
        return f"<Translation {self.dialect} -> openai stream={self.stream} sse={self.sse}>"


def _query_key(query: str) -> bytes:
    for name, value in parse_qsl(query):
        if name == "key" and value:
            if not value.isprintable() or " " in value or len(value) > 512:
                raise BadRequest("The key= query parameter is not a valid API key.")
            return value.encode()
    return b""


def _json(body: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict):
        raise ValueError("the model server's answer is not a JSON object")
    return doc
