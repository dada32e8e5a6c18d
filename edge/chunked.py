"""An upstream's chunked body (RFC 9112 7.1), checked as it streams, handed on decoded or as the
very bytes that arrived.

A relayed stream is chunked on both sides when the client speaks HTTP/1.1: re-framing each
event (parse the upstream's framing, frame the piece again) is work for nothing when the framing
that arrived is already what the client should get. So once the relay starts piping
(`UpstreamResponse.pipe` with a raw sink), each piece read from the socket goes to the client
as it is, after a check of its framing here, and only the terminating chunk (with any trailer
fields) is left for the edge to write. Until then, and for any reader that wants the body
itself, the chunk data are cut out of the framing, as a parser would.

Nothing an upstream sends reaches the client before its framing is checked: a size line or the
CRLF after a chunk's data is held back until it is whole, so what was passed on is always a
well-framed prefix that the edge can end (with an error event) or cut off.
"""

from __future__ import annotations

from typing import Final

# Reader states. Final: compiled, a constant is inlined instead of looked up in a dict.
SIZE: Final = 0
DATA: Final = 1
CRLF: Final = 2
TRAILER: Final = 3
DONE: Final = 4
_MAX_LINE: Final = 4096  # a size line (with extensions) or trailer field
_MAX_TRAILER: Final = 16384


class Malformed(ValueError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.good = b""  # what came before the bad framing: checked, still to hand on


class Chunks:
    """The state of one chunked body being read: `feed` takes each piece from the socket and
    returns what to hand on. No callbacks: a plain state machine the caller drives."""

    __slots__ = ("state", "left", "held", "framing", "trailer", "extra")

    def __init__(self) -> None:
        self.state = SIZE
        self.left = 0  # data bytes of the current chunk still to come
        self.held = b""  # the start of a line (or CRLF) not whole yet: neither checked nor sent
        self.framing = 0  # bytes of framing handed on raw (the body is the rest of them)
        self.trailer = 0  # bytes of trailer fields so far
        self.extra = False  # bytes came after the body ended: the connection is not reusable

    @property
    def at_boundary(self) -> bool:
        """Between chunks (or past the last): raw passing may start or stop here."""
        return self.state == SIZE or self.state >= TRAILER

    @property
    def done(self) -> bool:
        return self.state == DONE

    def feed(self, data: bytes, raw: bool) -> bytes:
        """What of `data` to hand on: `raw`, the bytes as they came (framing and all) up to the
        last chunk; else the chunk data alone. Raises Malformed, with the good part before the
        bad framing in `good`; nothing of the bad part is ever returned."""
        if len(self.held):
            data = self.held + data
            self.held = b""
        n = len(data)
        i = 0
        last_at = -1  # raw: where the last chunk's size line began, when it is in this piece
        first = b""  # decoded: the chunk data (the usual piece holds one chunk) ...
        more: list[bytes] | None = None  # ... or all of them, when it holds several
        try:
            while i < n:
                state = self.state
                if state == DATA:
                    take = n - i if n - i < self.left else self.left
                    if not raw:
                        piece = data if take == n else data[i : i + take]
                        if more is not None:
                            more.append(piece)
                        elif len(first):
                            more = [first, piece]
                        else:
                            first = piece
                    i += take
                    self.left -= take
                    if self.left == 0:
                        self.state = CRLF
                elif state == CRLF:
                    if n - i < 2:
                        break  # hold the CR back until its LF is here
                    if data[i] != 13 or data[i + 1] != 10:
                        raise Malformed("no CRLF after a chunk's data")
                    i += 2
                    if raw:
                        self.framing += 2
                    self.state = SIZE
                elif state == SIZE:
                    eol, size = _size_line(data, i)
                    if eol < 0:
                        if n - i > _MAX_LINE:
                            raise Malformed("chunk size line too long")
                        break
                    if size == 0:
                        last_at = i
                        self.state = TRAILER
                    else:
                        if raw:
                            self.framing += eol + 2 - i
                        self.left = size
                        self.state = DATA
                    i = eol + 2
                elif state == TRAILER:
                    eol = data.find(b"\r\n", i)
                    if eol < 0:
                        if n - i > _MAX_LINE:
                            raise Malformed("trailer field too long")
                        break
                    if eol == i:  # the empty line: the body is over
                        self.state = DONE
                        self.extra = i + 2 < n
                        return self._handed(data, raw, i, last_at, first, more)
                    self.trailer += eol + 2 - i
                    if self.trailer > _MAX_TRAILER or b":" not in data[i:eol]:
                        raise Malformed("bad trailer section")
                    i = eol + 2
                else:  # DONE
                    self.extra = True
                    return b""
        except Malformed as exc:
            exc.good = self._handed(data, raw, i, last_at, first, more)
            raise
        if i < n:
            self.held = data[i:]
        return self._handed(data, raw, i, last_at, first, more)

    def _handed(
        self, data: bytes, raw: bool, i: int, last_at: int, first: bytes, more: list[bytes] | None
    ) -> bytes:
        """What `feed` hands on, read up to `i`: raw, one slice from the piece's start (nothing
        is handed on from the last chunk's size line on); decoded, the chunk data."""
        if not raw:
            return first if more is None else b"".join(more)
        stop = last_at if last_at >= 0 else i if self.state < TRAILER else 0
        return data if stop == len(data) else data[:stop]


def _size_line(data: bytes, start: int) -> tuple[int, int]:
    """(where the CRLF ending the size line at `start` is, the size), or (-1, 0) while the line
    is not whole. Hex digits, then optional extensions; raises Malformed."""
    n = len(data)
    size, i = 0, start
    while i < n:
        digit = _hex(data[i])
        if digit < 0:
            break
        size = size * 16 + digit
        i += 1
    if i - start > 16:
        raise Malformed("bad chunk size")
    if i >= n:
        return -1, 0
    if i == start:
        raise Malformed("bad chunk size")
    if data[i] == 13:  # the usual line: just the size
        if i + 1 >= n:
            return -1, 0
        if data[i + 1] != 10:
            raise Malformed("bad chunk size")
        return i, size
    eol = data.find(b"\r\n", i)
    if eol < 0:
        return -1, 0
    # chunk-ext: BWS ";" ...; nothing a lenient client could read as a line end
    while i < eol and (data[i] == 32 or data[i] == 9):
        i += 1
    if i == eol or data[i] != 59:  # ';'
        raise Malformed("bad chunk size")
    for k in range(i, eol):
        c = data[k]
        if (c < 32 and c != 9) or c > 126:
            raise Malformed("bad chunk extension")
    return eol, size


def _hex(c: int) -> int:
    if 48 <= c <= 57:
        return c - 48
    if 97 <= c <= 102:
        return c - 87
    if 65 <= c <= 70:
        return c - 55
    return -1


def unframe(data: bytes) -> bytes:
    """`data` (raw chunked bytes, from anywhere in a body) with the size lines taken out, for a
    look at the last events after the fact (the usage object). Chunk data never hold a bare CRLF
    followed by hex and CRLF in the places that matter here (JSON strings escape CR and LF), so
    a search for framing lines is enough."""
    out: list[bytes] = []
    at = 0
    while True:
        crlf = data.find(b"\r\n", at)
        if crlf < 0:
            break
        eol = data.find(b"\r\n", crlf + 2)
        line = data[crlf + 2 : eol] if eol > 0 else b""
        if eol > 0 and 0 < len(line) <= 16 and all(_hex(c) >= 0 for c in line):
            out.append(data[at:crlf])
            at = eol + 2
        else:
            out.append(data[at : crlf + 2])
            at = crlf + 2
    out.append(data[at:])
    return b"".join(out)
