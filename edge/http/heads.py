"""HTTP/1.1 response heads kept as the bytes that arrived, and what the relay needs from them.

An upstream response's head is relayed to the client nearly as it came (hop-by-hop fields
out, the edge's own framing in). Decoding each field into Python strings and back costs a
Python call per field on every response; instead the head's block of "Name: value\\r\\n" lines
is kept as bytes and read once per distinct block: a server answers with the same head over and
over (only its Date moves, once a second), so a `Seen` cache makes the usual response a single
dictionary lookup. The parser (llhttp) has already validated every head these helpers see.

`retry_after_s` reads a Retry-After value (a 429's or 503's), for routing to hold the host.

The other way, `render` is the one renderer of header fields the edge makes up itself (keys sent
upstream, an answer's extra fields): it refuses what would break a line, so that no value,
whoever supplied it, can smuggle a header field or a second message.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Final, Generic, TypeVar

from multidict import CIMultiDict

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# RFC 9110 7.6.1 connection-specific fields, plus those that describe one hop's framing.
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
        "upgrade", "proxy-authorization", "proxy-authenticate",
    }
)  # fmt: skip
# The client gets the edge's own framing: Content-Length, or chunked (a chunked upstream body's
# checked framing passes through, edge/http/chunked.py), never the upstream's framing fields; and
# the edge's own X-Request-ID and X-Edge-Server (edge/proxy/handler.py), never a server's claim to
# them: relayed, a server could name another as the one that served, or send a second id.
# Dropped here, once per distinct head (`Seen`), they cost nothing per response.
EDGE_OWN = frozenset({"x-request-id", "x-edge-server", "x-edge-model"})
_NOT_RELAYED = frozenset(n.encode() for n in HOP_BY_HOP | EDGE_OWN | {"content-length"})
_OPTIONS = frozenset({b"close", b"keep-alive", b""})  # Connection values that name no field


class Head:
    """What the relay needs from one response head."""

    __slots__ = ("relayed", "length", "framed", "chunked")

    def __init__(
        self, relayed: bytes, length: int | None, framed: bool, chunked: bool = False
    ) -> None:
        self.relayed = relayed  # the end-to-end header lines, as the server sent them
        self.length = length  # Content-Length, if any
        # Content-Length, or Transfer-Encoding ending in chunked; else the body ends at close
        # (RFC 9112 6.3: "Transfer-Encoding: identity" or "gzip" alone is read until close too)
        self.framed = framed
        # Transfer-Encoding ending in chunked, and no Content-Length (edge/http/chunked.py reads it)
        self.chunked = chunked

    def __repr__(self) -> str:
        return f"<Head length={self.length} framed={self.framed} chunked={self.chunked}>"


def read(block: bytes) -> Head:
    lines = block.split(b"\r\n")
    kept: list[tuple[bytes, bytes]] = []
    listed: set[bytes] = set()
    length: int | None = None
    chunked = sized = False
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        lowered = name.strip().lower()
        if lowered in _NOT_RELAYED:
            value = value.strip()
            if lowered == b"content-length":
                sized = True
                length = int(value) if value.isdigit() else None
            elif lowered == b"transfer-encoding":
                chunked = value.rpartition(b",")[2].strip().lower() == b"chunked"
            elif lowered == b"connection":
                listed.update(t.strip().lower() for t in value.split(b","))
        else:
            kept.append((lowered, line))
    listed -= _OPTIONS
    relayed = b"".join([line + b"\r\n" for lowered, line in kept if lowered not in listed])
    return Head(relayed, length, sized or chunked, chunked and not sized)


class Seen(Generic[K, V]):
    """key -> build(key), for the keys seen lately: heads (here) and request fields
    (edge/http/server.py) repeat request after request. Cleared whole when full: a bound, not an
    LRU; the keys that matter come back within a second."""

    def __init__(self, build: Callable[[K], V], size: int) -> None:
        self.build = build
        self.size = size
        self._seen: dict[K, V] = {}
        self.misses = 0

    def get(self, key: K) -> V:
        value = self._seen.get(key)
        if value is None:
            self.misses += 1
            if len(self._seen) >= self.size:
                self._seen.clear()
            value = self._seen[key] = self.build(key)
        return value

    def __repr__(self) -> str:
        return f"<Seen entries={len(self._seen)} misses={self.misses}>"


def split(raw: bytes) -> bytes:
    """The block of header lines (each ending in CRLF) of the head at the start of `raw`. The
    parser (strict llhttp) accepted the head, so its lines end in CRLF and none is folded."""
    end = raw.find(b"\r\n\r\n")
    line_end = raw.find(b"\r\n")
    return b"" if line_end == end else raw[line_end + 2 : end + 2]


def decode(block: bytes) -> CIMultiDict[str]:
    """The fields of `block` as strings, for code that looks them up by name (not the relay)."""
    fields: CIMultiDict[str] = CIMultiDict()
    for line in block.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep:
            fields.add(name.strip().decode("latin-1"), value.strip().decode("utf-8", "replace"))
    return fields


# RFC 9110 5.1 field-name = token (tchar: "!#$%&'*+-.^_`|~", digits, letters).
_TOKEN: Final = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")


class BadField(ValueError):
    """A header field that `render` refuses: its name is not a token, or its name or value holds
    CR, LF or NUL."""


def render(fields: Iterable[tuple[str, str]]) -> bytes:
    """ "Name: value\r\n" lines, UTF-8. A name that is not a token, or a CR, LF or NUL anywhere,
    is refused (BadField): it would smuggle a field, or a second message, past the line it is in.
    Checked on the whole block at C speed (one count of each) plus a match per name."""
    lines = []
    for name, value in fields:
        if _TOKEN.fullmatch(name) is None:
            raise BadField(f"a header field name is not a token: {name!r}")
        lines.append(f"{name}: {value}\r\n")
    block = "".join(lines).encode("utf-8", "surrogateescape")
    n = len(lines)
    if block.count(b"\n") != n or block.count(b"\r") != n or b"\0" in block:
        raise BadField("a header field value contains CR, LF or NUL")
    return block


# Retry-After (RFC 9110 10.2.3): delta-seconds, or an HTTP-date (5.6.7) in one of its three forms.
# A delay longer than this is no plan a server has but a broken value (a date in the wrong
# century, a counter sent as seconds): read as no Retry-After at all.
MAX_RETRY_AFTER_S: Final = 86_400.0
_DELTA_DIGITS: Final = 10  # more digits than this is past any bound, and int() of it costs
_MONTHS: Final = {
    m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep",
                                "Oct", "Nov", "Dec"), 1)
}  # fmt: skip
_DAY: Final = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_MONTH: Final = r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME: Final = r"(\d\d):(\d\d):(\d\d)"
# IMF-fixdate, "Sun, 06 Nov 1994 08:49:37 GMT", the one a sender must use.
_IMF: Final = re.compile(rf"{_DAY}, (\d\d) {_MONTH} (\d{{4}}) {_TIME} GMT", re.ASCII)
# Obsolete RFC 850, "Sunday, 06-Nov-94 08:49:37 GMT", and asctime, "Sun Nov  6 08:49:37 1994".
_RFC850: Final = re.compile(
    rf"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), "
    rf"(\d\d)-{_MONTH}-(\d\d) {_TIME} GMT",
    re.ASCII,
)
_ASCTIME: Final = re.compile(rf"{_DAY} {_MONTH} ([ \d]\d) {_TIME} (\d{{4}})", re.ASCII)


def retry_after_s(value: str, now_wall: float) -> float | None:
    """The delay a Retry-After field value asks for, in seconds from `now_wall` (time.time()):
    its delta-seconds, or its HTTP-date less now (0.0 for a date past). None for anything else:
    unparsable, negative, or over MAX_RETRY_AFTER_S."""
    value = value.strip(" \t")
    if value.isascii() and value.isdigit():
        if len(value) > _DELTA_DIGITS:
            return None
        delay = float(int(value))
    else:
        when = _http_date(value, now_wall)
        if when is None:
            return None
        delay = max(when - now_wall, 0.0)
    return delay if delay <= MAX_RETRY_AFTER_S else None


def _http_date(value: str, now_wall: float) -> float | None:
    """An HTTP-date as seconds since the epoch, or None."""
    if (m := _IMF.fullmatch(value)) is not None:
        day, month, year, hh, mm, ss = m.groups()
    elif (m := _ASCTIME.fullmatch(value)) is not None:
        month, day, hh, mm, ss, year = m.groups()
    elif (m := _RFC850.fullmatch(value)) is not None:
        day, month, yy, hh, mm, ss = m.groups()
        year = str(_century(int(yy), now_wall))
    else:
        return None
    d, h, mi, s = int(day), int(hh), int(mm), int(ss)
    y, mo = int(year), _MONTHS[month]
    if not (1 <= d <= calendar.monthrange(y, mo)[1] and h < 24 and mi < 60 and s <= 60):
        return None
    return float(calendar.timegm((y, mo, d, h, mi, min(s, 59), 0, 0, 0)))  # 60: a leap second


def _century(yy: int, now_wall: float) -> int:
    """RFC 850's two-digit year (RFC 9110 5.6.7): a date more than 50 years in the future is read
    as the most recent past year with those digits."""
    this = time.gmtime(now_wall).tm_year
    year = this - this % 100 + yy
    return year - 100 if year > this + 50 else year
