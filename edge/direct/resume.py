"""Mid-stream continuation in the library: a stream whose host breaks after its first byte goes on
from another host, and the SDK reads one stream, as through the edge (edge/proxy/continuation.py
does it for the server; both use edge/proxy/splice.py's pure parts).

Continued: OpenAI's chat and legacy completions, streamed, one choice, not pinned, on a model
with two hosts or more and `[routing] continuation` on (the default). While such a stream is
read, the bytes the client got are kept, up to routing.continuation_keep_bytes, and a piece that
holds an error event is held back. When the stream breaks (a reset, a stall past
upstream.stall_timeout_s, an error event), what the client has is parsed (`splice.broken`), the
request goes to another host with the answer so far as a prefill (`continuation_body`), through
the same plan rules (a retry paid from the budget, the broken hosts not asked again), and that
host's stream is rewritten into the client's (`Splice`), up to routing.max_continuations times.
What cannot be continued ends as it broke: the transport's error, or the host's error event.

Not continued here (the edge does them): Anthropic's and Gemini's dialects, translated streams.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from edge.proxy.splice import Broken, Splice, broken, closing, continuation_body

# The key of an error event in an OpenAI stream (vLLM, SGLang, llama.cpp): a piece holding it is
# held back while the stream can be continued. JSON-escaped text never holds it.
ERROR_KEY: Final = b'"error":'
DONE: Final = b"data: [DONE]\n\n"
ROUTES: Final = {"/v1/chat/completions": True, "/v1/completions": False}  # path -> chat


class Resumable:
    """One continuable stream: the request as parsed, the bytes the client got (bounded), the
    hosts whose streams broke, the continuations made."""

    __slots__ = ("doc", "chat", "keep", "limit", "count", "tried", "_parts", "_size", "_tail")

    def __init__(self, doc: Mapping[str, Any], chat: bool, keep: int, limit: int) -> None:
        self.doc = doc
        self.chat = chat
        self.keep = keep  # routing.continuation_keep_bytes
        self.limit = limit  # routing.max_continuations
        self.count = 0
        self.tried: list[Any] = []  # the hosts whose streams broke (routing Host objects)
        self._parts: list[bytes] | None = []  # None: past `keep`, no longer continuable
        self._size = 0
        self._tail = b""  # the host's bytes after the last whole event, not passed on yet

    def take(self, piece: bytes) -> bytes | None:
        """What of the host's `piece` goes to the client now: up to its last whole event (the
        rest waits for its event to complete, so that a break leaves the client whole events
        only: h11 hands on half a chunk as it comes); None when it holds an error event (not
        passed on while a continuation may replace it: `held` has it)."""
        if self._tail:
            piece, self._tail = self._tail + piece, b""
        if ERROR_KEY in piece:
            self._tail = piece
            return None
        lf, crlf = piece.rfind(b"\n\n"), piece.rfind(b"\r\n\r\n")
        cut = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
        if not cut:
            if len(piece) > self.keep:  # no event ends in sight: no longer continuable
                self._parts = None
                return piece
            self._tail = piece
            return b""
        out, self._tail = piece[:cut], piece[cut:]
        self.kept(out)
        return out

    def held(self) -> bytes:
        """The bytes not passed on yet: at the stream's end, or an error event that could not
        be replaced, they go to the client as the host sent them."""
        tail, self._tail = self._tail, b""
        return tail

    def kept(self, piece: bytes) -> None:
        """Bytes the client got (a continuation's, spliced, too)."""
        parts = self._parts
        if parts is not None and piece:
            self._size += len(piece)
            if self._size > self.keep:
                self._parts = None
            else:
                parts.append(piece)

    def next(self) -> tuple[Broken, bytes] | bytes | None:
        """After a break: (what the client has, the body for the next host); or the bytes that
        end the stream when its token limit ran out at the break; None: not continuable."""
        if self.count >= self.limit or self._parts is None:
            return None
        had = broken(b"".join(self._parts), self.chat)
        if had is None:
            return None
        body = continuation_body(self.doc, had, self.chat)
        if body is not None:
            self.count += 1
            return had, body
        if _limit_met(self.doc, had):
            options = self.doc.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
            return closing(had, self.chat, "length", usage)
        return None

    def __repr__(self) -> str:
        return f"<Resumable chat={self.chat} {self.count}/{self.limit} kept={self._size}>"


def continuable(
    target: str, doc: Mapping[str, Any], hosts: int, pinned: bool, headers: Mapping[str, str]
) -> bool | None:
    """chat (True) or completions (False) when a response to this request can be continued;
    None when not: another route, not streamed, n > 1, pinned, one host, an encoded body."""
    chat = ROUTES.get(target.partition("?")[0])
    if chat is None or doc.get("stream") is not True or hosts < 2 or pinned:
        return None
    n = doc.get("n")
    if (n is not None and n != 1) or headers.get("content-encoding"):
        return None
    return chat


def ending(splice: Splice, resume: Resumable) -> tuple[bytes, bool]:
    """A continuation's body ended: its last events for the client, and whether the answer is
    whole (else it broke again: an error, or a clean end with the answer unfinished)."""
    out = splice.end()
    resume.kept(out)
    if splice.failed or (not splice.done and splice.finish_reason is None):
        return out, False
    return (out if splice.done else out + DONE), True  # [DONE] only was missing: added


def _limit_met(doc: Mapping[str, Any], had: Broken) -> bool:
    for key in ("max_completion_tokens", "max_tokens"):
        limit = doc.get(key)
        if type(limit) is int:
            return had.tokens >= limit and had.finish_reason is None
    return False
