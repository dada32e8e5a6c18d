"""Bytes for the fuzz tests: short reprs, cuts, mutations, soup (see __init__)."""

from __future__ import annotations

from hypothesis import strategies as st


class Wire(bytes):
    """Bytes whose repr stays short when they hold long runs (a 64 KB body, a 70 KB field):
    `b'POST ...' + b'x' * 65537 + b'...'` is still an expression that gives them back."""

    def __repr__(self) -> str:
        parts, at, n = [], 0, len(self)
        while at < n:
            end = at
            while end < n and self[end] == self[at]:
                end += 1
            if end - at >= 32:
                parts.append(f"{bytes(self[at : at + 1])!r} * {end - at}")
                at = end
                continue
            start = at
            while at < n and not (at + 32 <= n and self[at : at + 32] == self[at : at + 1] * 32):
                at += 1
            parts.append(repr(bytes(self[start:at])))
        return " + ".join(parts) or "b''"


# --- the same bytes in other pieces; valid bytes broken on purpose --------------------------------


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """`data` in pieces, cut at `points` (any ints, taken modulo the length)."""
    if not data:
        return []
    at = sorted({p % len(data) for p in points} - {0})
    return [data[i:j] for i, j in zip([0, *at], [*at, len(data)], strict=True)]


def cuts() -> st.SearchStrategy[list[int]]:
    """Cut points: none, a few anywhere, or every byte (a byte at a time is where parsers that
    assume whole lines break)."""
    return st.one_of(
        st.just([]),
        st.lists(st.integers(0, 1 << 20), max_size=6),
        st.just(_EveryByte(range(1, 4096))),
    )


class _EveryByte(list[int]):
    def __repr__(self) -> str:
        return "list(range(1, 4096))"


# Bytes that matter to HTTP/1.1 framing: where a random change is likeliest to confuse a parser.
NASTY = (
    b"\r\n", b"\n", b"\r", b"\x00", b" ", b"\t", b":", b";", b",", b"0", b"f", b"-", b"+",
    b"\r\n\r\n", b"\r\n ", b"\r\n\t", b"\xff", b"\x7f", b"\x01",
    b"Content-Length: 0\r\n", b"Content-Length: 5\r\n", b"Content-Length: 1\r\n",
    b"Content-Length: 18446744073709551616\r\n", b"Content-Length: 3 \r\n",
    b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: gzip\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n", b"Transfer-Encoding: chunked, gzip\r\n",
    b"Transfer-Encoding: Chunked\r\n", b"Transfer-Encoding : chunked\r\n",
    b"Expect: 100-continue\r\n", b"Connection: close\r\n", b"Connection: keep-alive\r\n",
    b"Upgrade: websocket\r\nConnection: upgrade\r\n", b"Host: a\r\n", b"X-Fold: a\r\n b\r\n",
    b"0\r\n\r\n", b"1\r\na\r\n", b"5;ext=1\r\nhello\r\n", b"0\r\nTrailer: t\r\n\r\n",
    b"ffffffffffffffffff\r\n", b"GET / HTTP/1.1\r\n\r\n", b"POST / HTTP/1.1\r\n",
    b"HTTP/1.0", b"HTTP/1.1", b"HTTP/2.0", b"HTTP/0.9", b"CONNECT ", b"HEAD ",
)  # fmt: skip


@st.composite
def mutate(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` with one to four random edits: insert a framing token, delete or repeat a span,
    change a byte, make every line end a bare LF, or grow a line or the field count past the
    edge's limits."""
    for _ in range(draw(st.integers(1, 4))):
        n = len(data)
        at = draw(st.integers(0, n))
        kind = draw(st.sampled_from(["insert", "insert", "delete", "repeat", "byte", "lf", "big"]))
        if kind == "insert":
            data = data[:at] + draw(st.sampled_from(NASTY)) + data[at:]
        elif kind == "delete":
            data = data[:at] + data[at + draw(st.integers(1, 8)) :]
        elif kind == "repeat":
            data = data[:at] + data[at : at + draw(st.integers(1, 40))] + data[at:]
        elif kind == "byte" and n:
            data = data[: at % n] + bytes([draw(st.integers(0, 255))]) + data[at % n + 1 :]
        elif kind == "lf":
            data = data.replace(b"\r\n", b"\n")
        elif kind == "big":
            big = draw(st.sampled_from([b"X-Big: " + b"a" * 70_000 + b"\r\n", b"X: y\r\n" * 120]))
            data = data[:at] + big + data[at:]
    return data


def soup() -> st.SearchStrategy[bytes]:
    """Random bytes, mostly made of pieces that mean something to HTTP/1.1."""
    word = st.one_of(st.sampled_from(NASTY), st.binary(max_size=6))
    return st.one_of(st.binary(max_size=200), st.lists(word, max_size=30).map(b"".join))
