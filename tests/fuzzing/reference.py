"""Reference HTTP/1.1 readers (RFC 9112) that the fuzz tests hold the edge to (see __init__)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from tests.fuzzing.wire import Wire

TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_MAX_U64 = 2**64 - 1


class Bad(Exception):
    """The bytes break RFC 9112 here: the message and all that follows are refused."""


def line_at(data: bytes, at: int) -> tuple[bytes, int] | None:
    """(the line starting at `at`, where the next one starts); None while it is not whole.
    Lines end in CRLF; a bare CR or LF anywhere is Bad."""
    end = data.find(b"\r\n", at)
    line = data[at:] if end < 0 else data[at:end]
    if b"\n" in line or b"\r" in line[:-1] or (end >= 0 and b"\r" in line):
        raise Bad("bare CR or LF")
    return None if end < 0 else (line, end + 2)


def is_token(text: bytes) -> bool:
    return bool(text) and all(c in TCHAR for c in text)


def field_line(line: bytes) -> tuple[bytes, bytes]:
    """(name, value) of a field line: a token, a colon, OWS, then value characters (VCHAR, SP,
    HTAB, obs-text; no other control, no DEL). Leading OWS is not the value's; trailing OWS is
    kept, as llhttp keeps it (a recipient may strip it)."""
    name, colon, value = line.partition(b":")
    if not colon or not is_token(name):
        raise Bad(f"bad field line {line[:40]!r}")
    value = value.lstrip(b" \t")
    if any((c < 32 and c != 9) or c == 127 for c in value):
        raise Bad("control character in a field value")
    return name, value


def field_list(fields: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """The elements of the comma-separated list field `name` (empty elements dropped, lower)."""
    out = []
    for n, v in fields:
        if n.lower() == name:
            out += [e.strip(b" \t").lower() for e in v.split(b",") if e.strip(b" \t")]
    return out


@dataclass(frozen=True)
class Message:
    """One request as the reference reads it."""

    method: bytes
    target: bytes
    version: str
    fields: tuple[tuple[bytes, bytes], ...]  # as sent, Content-Length included
    length: int | None  # Content-Length
    chunked: bool
    body: bytes
    keep_alive: bool


@dataclass(frozen=True)
class Parsed:
    """Every complete request of a byte stream, and how the stream ends: "complete" (nothing
    left over), "closed" (a request that ends the connection came; what follows is never read),
    "partial" (a request is not whole yet), "error" (the request at `at` is malformed).
    `pending`: the request whose head was whole and valid when its body was cut or broke (its
    `body` is what came of it)."""

    messages: tuple[Message, ...]
    end: str
    at: int
    reason: str = ""
    pending: Message | None = None


def parse_requests(data: bytes) -> Parsed:
    messages: list[Message] = []
    at = 0
    while True:
        # RFC 9112 2.2: empty lines before a request line are ignored (llhttp skips any CR and
        # LF there: nothing is framed by them).
        while at < len(data) and data[at] in (13, 10):
            at += 1
        if at == len(data):
            return Parsed(tuple(messages), "complete", at)
        head: Message | None = None
        try:
            got = _head(data, at)
            if got is None:
                return Parsed(tuple(messages), "partial", at)
            head, body_at = got
            body, end = _body(data, body_at, head)
        except Bad as exc:
            return Parsed(tuple(messages), "error", at, str(exc), head)
        if end < 0:
            return Parsed(tuple(messages), "partial", at, "", replace(head, body=body))
        messages.append(replace(head, body=body))
        at = end
        if not head.keep_alive:
            return Parsed(tuple(messages), "closed", at)


def _head(data: bytes, at: int) -> tuple[Message, int] | None:
    got = _simple_line(data, at) or line_at(data, at)
    if got is None:
        return None
    line, at = got
    method, target, version = _request_line(line)
    fields: list[tuple[bytes, bytes]] = []
    while True:
        got = line_at(data, at)
        if got is None:
            return None
        line, at = got
        if not line:
            break
        fields.append(field_line(line))
    length, chunked, keep_alive = _framing(method, version, fields)
    return Message(method, target, version, tuple(fields), length, chunked, b"", keep_alive), at


def _body(data: bytes, at: int, head: Message) -> tuple[bytes, int]:
    if head.chunked:
        got = read_chunked(data, at)
        if got.error:
            raise Bad(got.error)
        return got.body, got.end
    size = head.length or 0
    if len(data) - at < size:
        return data[at:], -1
    return data[at : at + size], at + size


def _simple_line(data: bytes, at: int) -> tuple[bytes, int] | None:
    """HTTP/0.9's request line (method SP target, no version) may end in a bare LF, as it did
    then: llhttp takes it (CONNECT's even without a target), and the request is the
    connection's last (nothing framed by it)."""
    end = data.find(b"\n", at)
    line = data[at:end]
    method, sp, target = line.partition(b" ")
    if end < 0 or b"\r" in line or not sp or b" " in target.strip(b" "):
        return None
    return method + b" " + (target.strip(b" ") or b"*" if method == b"CONNECT" else target), end + 1


def _request_line(line: bytes) -> tuple[bytes, bytes, str]:
    # method SP+ target [SP HTTP/x.y]: llhttp takes more than one SP after the method and
    # HTTP/0.9's line without a version (the framing is the same), CONNECT's without a target.
    method, sp, rest = line.partition(b" ")
    target, sp2, proto = rest.lstrip(b" ").partition(b" ")
    proto = proto.lstrip(b" ")  # llhttp takes more than one SP before the version too
    if not is_token(method) or not sp or not (target or method == b"CONNECT"):
        raise Bad("bad request line")
    if any(c <= 32 or c >= 127 for c in target):
        raise Bad("bad request target")
    if not sp2:
        return method, target, "0.9"
    if proto not in (b"HTTP/1.1", b"HTTP/1.0", b"HTTP/0.9", b"HTTP/2.0"):
        raise Bad("bad version")
    return method, target, proto[5:].decode()


def _framing(
    method: bytes, version: str, fields: list[tuple[bytes, bytes]]
) -> tuple[int | None, bool, bool]:
    """(Content-Length, chunked, keep-alive) of a request head, or Bad (RFC 9112 6.1-6.3)."""
    lengths = [v.strip(b" \t") for n, v in fields if n.lower() == b"content-length"]
    codings = field_list(fields, b"transfer-encoding")
    has_te = any(n.lower() == b"transfer-encoding" for n, _ in fields)
    connection = field_list(fields, b"connection")
    if method == b"CONNECT" or (b"upgrade" in connection and _has(fields, b"upgrade")):
        raise Bad("protocol upgrade")  # the edge answers 400: no handler may see it
    if has_te and lengths:
        raise Bad("Content-Length and Transfer-Encoding")
    if has_te and (not codings or codings[-1] != b"chunked" or b"chunked" in codings[:-1]):
        raise Bad("Transfer-Encoding without chunked last")
    if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
        raise Bad("bad or repeated Content-Length")
    length = int(lengths[0]) if lengths else None
    if length is not None and length > _MAX_U64:
        raise Bad("Content-Length overflow")
    if version == "1.1":
        keep_alive = b"close" not in connection
    else:  # 1.0 keeps alive only when asked to, and never after a chunked body (RFC 9112 6.1)
        keep_alive = (
            version == "1.0"
            and b"keep-alive" in connection
            and b"close" not in (connection)
            and not has_te
        )
    return length, has_te, keep_alive


def _has(fields: list[tuple[bytes, bytes]], name: bytes) -> bool:
    return any(n.lower() == name for n, _ in fields)


@dataclass(frozen=True)
class ChunkRules:
    """What a chunked-body reader accepts beyond RFC 9112 7.1's grammar, or refuses within it."""

    max_digits: int = 0  # hex digits of a size (0: any, the value below 2**64)
    ext: str = "rfc"  # "rfc": RFC 9112 7.1.1; "visible": BWS ";" then VCHAR, SP, HTAB
    trailers: str = "fields"  # "fields": field lines; "colon": any line that holds a colon
    max_line: int = 0  # bytes of a size line or a trailer line (0: any)
    max_trailer: int = 0  # bytes of the trailer section (0: any)


REQUEST_CHUNKS = ChunkRules()  # the front door (llhttp, strict)
RELAY_CHUNKS = ChunkRules(16, "visible", "colon", 4096, 16384)  # edge/http/chunked.py, documented
LAX_CHUNKS = ChunkRules(ext="visible", trailers="colon")  # a body's end, and nothing more


@dataclass(frozen=True)
class Chunked:
    """A chunked body read from `data[at:]`: `body` (the chunk data so far), `end` (where the
    body ended; -1 while it has not), `last_at` (where the last chunk's size line began; -1
    before it), `error` (why the framing is malformed where reading stopped), `state` (where
    reading stopped: "boundary" before a size line, "data" within a chunk's data, "line" within
    a size line, "crlf" before the CRLF after data, "cr" between its CR and LF, "trailer",
    "done")."""

    body: bytes
    end: int
    last_at: int
    state: str
    error: str = ""
    size: int = 0  # of the chunk being read ("data", "crlf", "cr")


def read_chunked(data: bytes, at: int, rules: ChunkRules = REQUEST_CHUNKS) -> Chunked:
    out: list[bytes] = []
    last_at = size = -1

    def stop(state: str, error: str = "", end: int = -1) -> Chunked:
        return Chunked(b"".join(out), end, last_at, state, error, size)

    try:
        while True:
            got = line_at(data, at)
            if got is None:
                _check_partial_size(data[at:], rules)
                return stop("line" if at < len(data) else "boundary")
            line, next_at = got
            size = _size_line(line, rules)
            if size == 0:
                last_at, at = at, next_at
                break
            at = next_at
            out.append(data[at : at + size])
            if len(data) - at < size + 2:
                if len(data) - at > size and data[at + size] != 13:
                    return stop("crlf", "no CRLF after chunk data")
                return stop(
                    "data" if len(data) - at < size else "cr" if len(data) - at > size else "crlf"
                )
            if data[at + size : at + size + 2] != b"\r\n":
                return stop("crlf", "no CRLF after chunk data")
            at += size + 2
        trailer = 0
        while True:
            # "colon" trailers (never handed on) are only looked at for where they end
            got = line_at(data, at) if rules.trailers == "fields" else _crlf_line(data, at)
            if got is None:
                if rules.max_line and len(data) - at > rules.max_line:
                    return stop("trailer", "trailer line too long")
                return stop("trailer")
            line, at = got
            if not line:
                return stop("done", end=at)
            trailer += len(line) + 2
            if rules.max_trailer and trailer > rules.max_trailer:
                return stop("trailer", "trailer section too long")
            if rules.max_line and len(line) > rules.max_line:
                return stop("trailer", "trailer line too long")
            if rules.trailers == "fields":
                field_line(line)
            elif b":" not in line:
                return stop("trailer", "a trailer line without a colon")
    except Bad as exc:
        return stop("line", str(exc))


def _crlf_line(data: bytes, at: int) -> tuple[bytes, int] | None:
    end = data.find(b"\r\n", at)
    return None if end < 0 else (data[at:end], end + 2)


def _size_line(line: bytes, rules: ChunkRules) -> int:
    digits = len(line) - len(line.lstrip(b"0123456789abcdefABCDEF"))
    if digits == 0 or (rules.max_digits and digits > rules.max_digits):
        raise Bad("bad chunk size")
    if rules.max_line and len(line) > rules.max_line:
        raise Bad("chunk size line too long")
    size = int(line[:digits], 16)
    if size > _MAX_U64:
        raise Bad("chunk size overflow")
    ext = line[digits:]
    good = _good_ext if rules.ext == "rfc" else _visible_ext
    if ext and not good(ext):
        raise Bad("bad chunk extension")
    return size


def _check_partial_size(part: bytes, rules: ChunkRules) -> None:
    """A size line not whole yet, refused as soon as it cannot become a good one."""
    digits = len(part) - len(part.lstrip(b"0123456789abcdefABCDEF"))
    if part and not digits:
        raise Bad("bad chunk size")
    if rules.max_digits and digits > rules.max_digits:
        raise Bad("bad chunk size")
    if rules.max_line and len(part) > rules.max_line:
        raise Bad("chunk size line too long")


def _visible_ext(ext: bytes) -> bool:
    rest = ext.lstrip(b" \t")
    return rest[:1] == b";" and all(32 <= c <= 126 or c == 9 for c in rest)


def _good_ext(ext: bytes) -> bool:
    """chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ] ); an empty
    value after "=" is taken too (llhttp does)."""
    i, n = 0, len(ext)
    while i < n:
        i = _skip_ws(ext, i)
        if i >= n or ext[i] != 59:
            return False
        i = _skip_ws(ext, i + 1)
        start = i
        while i < n and ext[i] in TCHAR:
            i += 1
        if i == start:
            return False
        i = _skip_ws(ext, i)
        if i < n and ext[i] == 61:  # '='
            i = _skip_ws(ext, i + 1)
            if i < n and ext[i] == 34:  # '"'
                i = _quoted_end(ext, i + 1)
                if i < 0:
                    return False
            else:
                while i < n and ext[i] in TCHAR:
                    i += 1
    return True


def _skip_ws(text: bytes, i: int) -> int:
    while i < len(text) and text[i] in (32, 9):
        i += 1
    return i


def _quoted_end(text: bytes, i: int) -> int:
    while i < len(text):
        c = text[i]
        if c == 34:
            return i + 1
        if c == 92:  # quoted-pair
            i += 1
            if i >= len(text) or (text[i] < 32 and text[i] != 9) or text[i] == 127:
                return -1
        elif (c < 32 and c != 9) or c == 127:
            return -1
        i += 1
    return -1


@dataclass(frozen=True)
class Response:
    """A response as the reference reads it: `end` is "complete" (at `at`), "partial" (more is
    needed), or "error" (malformed, or cut by the close). `block`: the final head's field lines
    as they came (CRLF-ended)."""

    status: int
    fields: tuple[tuple[bytes, bytes], ...]
    body: bytes
    end: str
    at: int = -1
    reason: str = ""
    chunked: Chunked | None = None
    block: bytes = b""
    keep_alive: bool = False
    head_end: int = -1  # where the final head ended (interim heads before it included)

    def field(self, name: bytes) -> bytes | None:
        found = [v for n, v in self.fields if n.lower() == name]
        return found[-1] if found else None

    def __repr__(self) -> str:
        return (
            f"<Response {self.status} {self.end} {self.reason!r} at={self.at} "
            f"head_end={self.head_end} fields={len(self.fields)} body={Wire(self.body[:80])!r}"
            f"{'...' if len(self.body) > 80 else ''}>"
        )


def parse_response(data: bytes, closed: bool, rules: ChunkRules = LAX_CHUNKS) -> Response:
    """The final response at the start of `data` (interim 1xx heads skipped), as a client must
    read it (RFC 9112 6.3); `closed`: the server closed after `data`."""
    at, status = 0, 0
    fields: tuple[tuple[bytes, bytes], ...] = ()
    try:
        while True:
            while at < len(data) and data[at] in (13, 10):
                at += 1  # empty lines before a status line: llhttp skips them, harmlessly
            head = _response_head(data, at)
            if head is None:
                return Response(0, (), b"", "error" if closed else "partial", reason="no head")
            status, fields, block, version, at = head
            if status == 101:
                raise Bad("101 Switching Protocols")
            if status >= 200:
                break
        body = _response_body(data, at, closed, status, fields, rules)
        connection = field_list(list(fields), b"connection")
        keep_alive = (
            b"close" not in connection if version != b"HTTP/1.0" else b"keep-alive" in connection
        )
        return replace(body, block=block, keep_alive=keep_alive, head_end=at)
    except Bad as exc:
        return Response(status, fields, b"", "error", reason=str(exc))


def _response_head(
    data: bytes, at: int
) -> tuple[int, tuple[tuple[bytes, bytes], ...], bytes, bytes, int] | None:
    """(status, fields, their block, version, where the body starts) of the head at `at`."""
    got = line_at(data, at)
    if got is None:
        return None
    line, at = got
    version, _, rest = line.partition(b" ")
    code, _, _reason = rest.partition(b" ")
    # (llhttp takes "HTTP/2.0" too, and frames it as 1.1: harmless)
    if (
        version not in (b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0")
        or len(code) != 3
        or not code.isdigit()
    ):
        raise Bad(f"bad status line {line[:40]!r}")
    if int(code) < 100:
        raise Bad("status below 100")
    if any((c < 32 and c != 9) or c == 127 for c in _reason):
        raise Bad("control character in the reason")
    fields: list[tuple[bytes, bytes]] = []
    start = at
    while True:
        got = line_at(data, at)
        if got is None:
            return None
        line, at = got
        if not line:
            return int(code), tuple(fields), data[start : at - 2], version, at
        fields.append(field_line(line))


def _response_body(
    data: bytes, at: int, closed: bool, status: int, fields: tuple[tuple[bytes, bytes], ...],
    rules: ChunkRules,
) -> Response:  # fmt: skip
    codings = field_list(list(fields), b"transfer-encoding")
    lengths = [v.strip(b" \t") for n, v in fields if n.lower() == b"content-length"]
    if status in (204, 304):
        return Response(status, fields, b"", "complete", at)
    has_te = _has(list(fields), b"transfer-encoding")
    if has_te and lengths:
        raise Bad("Transfer-Encoding and Content-Length")
    if codings and codings[-1] == b"chunked":
        if b"chunked" in codings[:-1]:
            raise Bad("chunked twice")
        got = read_chunked(data, at, rules)
        if got.error:
            return Response(status, fields, got.body, "error", reason=got.error, chunked=got)
        if got.end < 0:
            state = "error" if closed else "partial"
            return Response(status, fields, got.body, state, reason="cut chunked", chunked=got)
        return Response(status, fields, got.body, "complete", got.end, chunked=got)
    if lengths:
        if len(lengths) > 1 or not lengths[0].isdigit():
            raise Bad("bad or repeated Content-Length")
        size = int(lengths[0])
        if len(data) - at < size:
            state = "error" if closed else "partial"
            return Response(status, fields, data[at:], state, reason="cut body")
        return Response(status, fields, data[at : at + size], "complete", at + size)
    # RFC 9112 6.3: no framing (or a Transfer-Encoding that does not end in chunked): the body
    # is all that comes until the server closes
    if not closed:
        return Response(status, fields, data[at:], "partial")
    return Response(status, fields, data[at:], "complete", len(data))


@dataclass(frozen=True)
class Reply:
    """One response the edge wrote, checked well-formed (`edge_responses`)."""

    status: int
    headers: dict[str, str]
    body: bytes
    interim: int  # 100 Continue heads before it
    cut: bool = False  # the last one, cut short (allowed by `cut_ok`): `body` is what came

    @property
    def closes(self) -> bool:
        return "close" in self.headers.get("connection", "").lower()


def edge_responses(
    out: bytes, head_request: Callable[[int], bool], cut_ok: bool = False
) -> list[Reply]:
    """The responses in the bytes the edge wrote to one client, which must be well-formed
    HTTP/1.1: a status line, unique well-formed fields, exactly one framing (none for a HEAD
    request's or a 204's), a close-delimited body only last and announced by Connection: close,
    and nothing after a response that said close. `head_request(i)`: the i-th response answers
    a HEAD. `cut_ok`: the client left early, so the last response may be cut short.
    AssertionError says what is wrong."""
    replies: list[Reply] = []
    at, interim = 0, 0
    while at < len(out):
        assert not (replies and replies[-1].closes), f"bytes after Connection: close: {out[at:]!r}"
        try:
            head = _response_head(out, at)
        except Bad as exc:
            raise AssertionError(
                f"malformed response head ({exc}): {out[at : at + 200]!r}"
            ) from None
        if head is None and cut_ok:
            break
        assert head is not None, f"cut response head: {out[at:]!r}"
        status, fields, _, _, body_at = head
        names = [n.lower() for n, _ in fields]
        assert out[at : at + 9] == b"HTTP/1.1 ", out[at : at + 40]
        if status == 100:
            assert not fields and interim == 0, f"bad interim response: {out[at:body_at]!r}"
            interim, at = interim + 1, body_at
            continue
        for name in (b"content-length", b"transfer-encoding", b"connection"):
            assert names.count(name) <= 1, f"repeated {name!r}: {out[at:body_at]!r}"
        headers = {n.decode().lower(): v.decode("latin-1") for n, v in fields}
        no_body = status in (204, 304) or head_request(len(replies))
        if no_body:
            assert "transfer-encoding" not in headers, out[at:body_at]
            body, at = b"", body_at
        else:
            reply = _response_body(out, body_at, not cut_ok, status, fields, REQUEST_CHUNKS)
            if reply.end == "partial":
                replies.append(Reply(status, headers, reply.body, interim, cut=True))
                break
            assert reply.end == "complete", f"cut or malformed body ({reply.reason}): {out[at:]!r}"
            if not ("content-length" in headers or reply.chunked is not None):
                assert "close" in headers.get("connection", ""), "close-delimited, no close"
            body, at = reply.body, reply.at
        replies.append(Reply(status, headers, body, interim))
        interim = 0
    assert interim == 0 or cut_ok, "a 100 Continue and no response after it"
    return replies
