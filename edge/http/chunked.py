"""An upstream's chunked body (RFC 9112 7.1), checked as it streams, handed on decoded or as the
very bytes that arrived.

A relayed stream is chunked on both sides when the client speaks HTTP/1.1: re-framing each
event (parse the upstream's framing, frame the piece again) is work for nothing when the framing
that arrived is already what the client should get. So once the relay starts piping
(`UpstreamResponse.pipe` with a raw sink), each piece read from the socket goes to the client
as it is, after a check of its framing here, and only the terminating chunk (with any trailer
fields) is left for the edge to write. Until then, and for any reader that wants the body
itself, the chunk data are cut out of the framing, as a parser would.

Nothing an upstream sends reaches the client before its framing is checked, and raw, nothing
but whole chunks (size line, data, CRLF) reaches it: a chunk that a read ends inside is held
back until the rest of it came (up to HOLD_MAX), so what was passed on is always a well-framed
prefix that ends between chunks, and the edge can end it with an error event when the upstream
dies at any byte. A chunk larger than HOLD_MAX is passed on as it arrives, as the only exception:
an upstream that dies inside one leaves the client holding part of a chunk, and the relay can
only cut the client's connection.
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
# Raw: the largest chunk (size line, data and CRLF) held back whole when a read ends inside it.
# An SSE event is far smaller (a token's delta is a few hundred bytes), so every stream of events
# reaches the client in whole chunks; a larger chunk goes on as it arrives instead of being
# buffered. A chunk dribbled in k reads is copied k times (at most this much each time).
HOLD_MAX: Final = 65536


class BadChunk(ValueError):
    """The chunked framing is broken (RFC 9112 7.1): the body cannot be read past `good`."""

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
        # Neither handed on nor (but for a held chunk's size line) checked: the start of a line
        # or CRLF not whole yet, or, raw, the start of a chunk not whole yet. `state` is where
        # its first byte is: a held chunk is read again from its size line with what follows.
        self.held = b""
        self.framing = 0  # bytes of framing handed on raw (the body is the rest of them)
        self.trailer = 0  # bytes of trailer fields so far
        self.extra = False  # bytes came after the body ended: the connection is not reusable

    @property
    def at_boundary(self) -> bool:
        """Between chunks (or past the last): raw passing may start or stop here. Raw, what was
        handed on ends here too (a chunk not whole yet is held back), unless a chunk over
        HOLD_MAX is going on as it arrives."""
        return self.state == SIZE or self.state >= TRAILER

    @property
    def done(self) -> bool:
        return self.state == DONE

    def feed(self, data: bytes, raw: bool) -> bytes:
        """What of `data` to hand on: `raw`, the bytes as they came (framing and all) in whole
        chunks, up to the last chunk; else the chunk data alone. Raises BadChunk, with the
        good part before the bad framing in `good`; nothing of the bad part is ever returned."""
        if len(self.held):
            data = self.held + data
            self.held = b""
        n = len(data)
        i = 0
        line_at = -1  # raw: where the last size line read in this piece began
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
                        raise BadChunk("no CRLF after a chunk's data")
                    i += 2
                    if raw:
                        self.framing += 2
                    self.state = SIZE
                elif state == SIZE:
                    eol, size = _size_line(data, i)
                    if eol < 0:
                        if n - i > _MAX_LINE:
                            raise BadChunk("chunk size line too long")
                        break
                    line_at = i
                    if size == 0:
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
                            raise BadChunk("trailer field too long")
                        break
                    if eol == i:  # the empty line: the body is over
                        self.state = DONE
                        self.extra = i + 2 < n
                        if raw:
                            return self._raw(data, i, line_at)
                        return first if more is None else b"".join(more)
                    self.trailer += eol + 2 - i
                    bad = eol - i > _MAX_LINE or b":" not in data[i:eol]
                    if self.trailer > _MAX_TRAILER or bad:
                        raise BadChunk("bad trailer section")
                    i = eol + 2
                else:  # DONE
                    self.extra = True
                    return b""
        except BadChunk as exc:
            if raw:
                exc.good = self._raw(data, i, line_at)
            else:
                exc.good = first if more is None else b"".join(more)
            raise
        if i < n:
            self.held = data[i:]
        if raw:
            if self.state == SIZE:  # the usual piece: whole chunks, handed on as they came
                return data if i == n else data[:i]
            return self._raw(data, i, line_at)
        return first if more is None else b"".join(more)

    def _raw(self, data: bytes, i: int, line_at: int) -> bytes:
        """What `feed` hands on raw when `data`, read up to `i`, does not end between chunks:
        one slice from the piece's start, without the last chunk (from its size line on) nor
        a chunk not whole yet, which is held back (read again when the rest of it came)."""
        state = self.state
        if state >= TRAILER:
            return data[:line_at] if line_at >= 0 else b""
        if state == SIZE:  # a bad size line
            return data[:i]
        if line_at < 0:  # inside a chunk over HOLD_MAX, going on as it arrives
            return data[:i]
        if i - line_at + self.left + 2 > HOLD_MAX:
            return data[:i]  # a chunk over HOLD_MAX starts here: passed on as it arrives
        self.held = data[line_at:]
        self.framing -= data.find(b"\r\n", line_at) + 2 - line_at  # counted again when read
        self.state = SIZE
        self.left = 0
        return data[:line_at]


def _size_line(data: bytes, start: int) -> tuple[int, int]:
    """(where the CRLF ending the size line at `start` is, the size), or (-1, 0) while the line
    is not whole. Hex digits, then optional extensions; raises BadChunk."""
    n = len(data)
    size, i = 0, start
    while i < n:
        digit = _hex(data[i])
        if digit < 0:
            break
        size = size * 16 + digit
        i += 1
    if i - start > 16:
        raise BadChunk("bad chunk size")
    if i >= n:
        return -1, 0
    if i == start:
        raise BadChunk("bad chunk size")
    if data[i] == 13:  # the usual line: just the size
        if i + 1 >= n:
            return -1, 0
        if data[i + 1] != 10:
            raise BadChunk("bad chunk size")
        return i, size
    eol = data.find(b"\r\n", i)
    if eol < 0:
        return -1, 0
    if eol - start > _MAX_LINE:  # refused whole as it is in pieces (`feed`)
        raise BadChunk("chunk size line too long")
    # chunk-ext: BWS ";" ...; nothing a lenient client could read as a line end
    while i < eol and (data[i] == 32 or data[i] == 9):
        i += 1
    if i == eol or data[i] != 59:  # ';'
        raise BadChunk("bad chunk size")
    for k in range(i, eol):
        c = data[k]
        if (c < 32 and c != 9) or c > 126:
            raise BadChunk("bad chunk extension")
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
