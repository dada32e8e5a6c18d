"""What the edge adds to a proxied request on its way upstream: the request id, the client's
end-to-end header fields (hop-by-hop and client keys dropped), X-Forwarded-*.

W3C trace context: the client's `traceparent` and `tracestate` go upstream as they came, so an
engine that traces joins the client's trace, unless the edge traces the request itself
(`traced`): then both are left out here and each attempt adds its own `traceparent`, whose
parent is the attempt's span, with the client's `tracestate` (edge/observe/tracing.py).
"""

from __future__ import annotations

import itertools
import os
from typing import Final

from edge.http.heads import HOP_BY_HOP, render
from edge.http.server import Request

# Set by the edge itself on the upstream request (the body may have been decoded by the server).
_REQUEST_OWNED = frozenset(
    {"host", "content-length", "content-encoding", "x-forwarded-for", "x-forwarded-proto",
     "x-request-id"}
)  # fmt: skip
# Where clients put API keys; not sent upstream when the edge checks keys itself.
_CLIENT_KEYS = frozenset({"authorization", "x-api-key", "x-goog-api-key"})
_DROP_UP = frozenset(n.encode() for n in HOP_BY_HOP | _REQUEST_OWNED)
_DROP_UP_KEYED = _DROP_UP | frozenset(n.encode() for n in _CLIENT_KEYS)
_TRACE_CONTEXT = frozenset({b"traceparent", b"tracestate"})  # a traced request's: per attempt
# The memo's key for each kind of block -> the client's fields it leaves out.
_DROPS: Final[dict[str, frozenset[bytes]]] = {
    "upstream": _DROP_UP, "upstream-keyed": _DROP_UP_KEYED,
    "upstream-traced": _DROP_UP | _TRACE_CONTEXT,
    "upstream-keyed-traced": _DROP_UP_KEYED | _TRACE_CONTEXT,
}  # fmt: skip


def upstream_headers(
    request: Request, request_id: str, credentials: list[tuple[str, str]] | None = None,
    traced: bool = False,
) -> bytes:  # fmt: skip
    """The header block sent upstream (llhttp refused any CR, LF or line fold in the client's).
    `credentials` None passes the client's key on (passthrough); a list (maybe empty) replaces
    every client key header with it (the edge checked the key itself). `traced`: the edge
    traces this request, and each attempt sends its own trace context."""
    memo = request.fields.memo  # shared by the requests that sent the same fields
    if not traced:
        mode = "upstream" if credentials is None else "upstream-keyed"
    else:
        mode = "upstream-traced" if credentials is None else "upstream-keyed-traced"
    kept = memo.get(mode)
    if kept is None:
        kept = memo[mode] = _end_to_end(request, _DROPS[mode])
    prior = request.headers.get("X-Forwarded-For")
    peer = request.remote
    forwarded = f"{prior}, {peer}" if prior else peer
    # request_id is printable (checked) and the peer an address: nothing here breaks a line.
    block = kept + (
        b"X-Forwarded-For: %b\r\nX-Request-ID: %b\r\n"
        % (forwarded.encode("utf-8", "surrogateescape"), request_id.encode("utf-8", "replace"))
    )
    if credentials:
        block += render(credentials)
    return block


def _end_to_end(request: Request, drop: frozenset[bytes]) -> bytes:
    """The client's fields that go upstream as they came: not hop-by-hop, not the edge's own."""
    listed = request.headers.get("Connection")
    if listed:
        drop = drop | {t.strip().lower().encode() for t in listed.split(",")}
    kept = [n + b": " + v + b"\r\n" for n, v in request.raw_headers if n.lower() not in drop]
    kept.append(b"X-Forwarded-Proto: %b\r\n" % request.fields.proto.encode())
    return b"".join(kept)


class RequestIds:
    """A request's id: the client's X-Request-ID when sane, else a fresh one made of a random
    per-process prefix and a counter (os.urandom per request is a system call)."""

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._next = itertools.count(1)

    def __call__(self, request: Request) -> str:
        rid = request.headers.get("X-Request-ID")
        if rid and len(rid) <= 128 and rid.isprintable():
            return rid
        return f"{self._prefix}{next(self._next):012x}"

    def __repr__(self) -> str:
        return f"<RequestIds {self._prefix}>"
