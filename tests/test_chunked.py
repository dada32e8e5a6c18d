"""edge/chunked.py: a chunked body read decoded or passed on raw, fed in every possible split,
and a hostile body refused before any of its bad framing is handed on."""

from __future__ import annotations

import re

import pytest

from edge.chunked import Chunks, Malformed, unframe

EVENTS = [b'data: {"n":1}\n\n', b"x" * 300, b'data: {"usage":{"prompt_tokens":3}}\n\n', b"!"]


def framed(pieces: list[bytes], end: bytes = b"0\r\n\r\n") -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + end


def read(body: bytes, raw: bool, cuts: list[int]) -> tuple[list[bytes], Chunks]:
    """What `Chunks.feed` handed on for `body` fed in pieces cut at `cuts`."""
    chunks = Chunks()
    out, at = [], 0
    for cut in [*cuts, len(body)]:
        if cut > at:
            assert not chunks.done
            if piece := chunks.feed(body[at:cut], raw):
                out.append(piece)
            at = cut
    return out, chunks


BODY = framed(EVENTS)
SPLITS = [[], *[[i] for i in range(1, len(BODY))], list(range(1, len(BODY)))]


@pytest.mark.parametrize("cuts", SPLITS, ids=lambda c: f"cut{c[:1]}x{len(c)}")
def test_decoded_in_any_split(cuts):
    out, chunks = read(BODY, raw=False, cuts=cuts)
    assert b"".join(out) == b"".join(EVENTS)
    assert chunks.done and not chunks.extra and chunks.framing == 0


@pytest.mark.parametrize("cuts", SPLITS, ids=lambda c: f"cut{c[:1]}x{len(c)}")
def test_raw_in_any_split_is_the_body_up_to_the_last_chunk(cuts):
    out, chunks = read(BODY, raw=True, cuts=cuts)
    passed = b"".join(out)
    assert passed == BODY[: -len(b"0\r\n\r\n")]  # the edge writes its own last chunk
    assert len(passed) - chunks.framing == len(b"".join(EVENTS))
    assert chunks.done


def test_a_whole_piece_is_handed_on_as_it_came():
    piece = framed([b"data: {}\n\n"], end=b"")
    assert Chunks().feed(piece, raw=True) is piece  # no copy for the usual piece: one chunk


def test_extensions_and_trailers_are_read_and_not_passed_on():
    body = b"5;name=value; x\r\nhello\r\n6 ;y\r\n world\r\n0\r\nX-Checksum: 1\r\nX-B: 2\r\n\r\n"
    out, chunks = read(body, raw=False, cuts=[])
    assert b"".join(out) == b"hello world" and chunks.done
    for cut in range(1, len(body)):
        out, chunks = read(body, raw=True, cuts=[cut])
        assert b"".join(out) == body[: body.index(b"0\r\n")] and chunks.done


def test_bytes_after_the_end_make_the_connection_unusable():
    _, chunks = read(BODY + b"HTTP/1.1 200 OK\r\n", raw=True, cuts=[])
    assert chunks.extra
    _, chunks = read(BODY, raw=True, cuts=[])
    assert chunks.feed(b"x", raw=True) == b"" and chunks.extra


BAD = [
    b"zz\r\nhello\r\n",  # not hex
    b"\r\nhello\r\n",  # no size
    b"5\nhello\r\n0\r\n\r\n",  # bare LF
    b"5\r\nhelloXX0\r\n\r\n",  # no CRLF after the data
    b"5 5\r\nhello\r\n",  # junk after the size
    b"5;a\x00b\r\nhello\r\n",  # a control byte in an extension
    b"5;a\nb\r\nhello\r\n",  # a bare LF in an extension
    b"1" * 17 + b"\r\n",  # more hex digits than 64 bits
    b"-5\r\nhello\r\n",
    b"0\r\nno colon\r\n\r\n",  # a trailer line that is no field
]


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("raw", [True, False])
def test_malformed_framing_is_refused_after_a_good_prefix(bad, raw):
    good = framed([b"data: ok\n\n"], end=b"")
    body = good + bad
    for cut in range(len(good), len(body)):
        chunks, passed = Chunks(), b""
        with pytest.raises(Malformed) as refused:
            passed += chunks.feed(body[:cut], raw)
            passed += chunks.feed(body[cut:], raw)
        passed += refused.value.good
        assert not chunks.done
        if not raw:
            assert passed.startswith(b"data: ok\n\n")
            continue
        # Raw: whole good chunks, then at most a checked size line and data it announced;
        # never a byte of bad framing.
        assert passed.startswith(good)
        if rest := passed[len(good) :]:
            line = re.match(rb"([0-9a-f]+)\r\n", rest)
            assert line and len(rest) - line.end() <= int(line[1], 16), rest


def test_endless_size_line_is_refused():
    chunks = Chunks()
    with pytest.raises(Malformed):
        for _ in range(10):
            chunks.feed(b"a;" + b"x" * 1000, raw=True)


def test_at_boundary_only_between_chunks():
    chunks = Chunks()
    assert chunks.at_boundary
    assert chunks.feed(b"5\r\nhel", raw=False) == b"hel"
    assert not chunks.at_boundary
    assert chunks.feed(b"lo\r", raw=False) == b"lo"
    assert not chunks.at_boundary  # the CR is held back until its LF
    assert chunks.feed(b"\n3", raw=False) == b""
    assert chunks.at_boundary  # a size line under way is not yet handed on


def test_unframe_joins_an_event_split_across_chunks():
    event = b'data: {"usage":{"prompt_tokens":3,"completion_tokens":5}}\n\n'
    raw = framed([event[:20], event[20:31], event[31:]], end=b"")
    assert unframe(raw).endswith(event + b"\r\n")
    assert b"\r\n" not in unframe(raw)[len(b"14\r\n") : -2]
    # Events with CRLF line endings keep them; only size lines go.
    crlf = framed([b"data: 1\r\n\r\n", b"data: 2\r\n\r\n"], end=b"")
    assert unframe(crlf) == b"b\r\ndata: 1\r\n\r\ndata: 2\r\n\r\n\r\n"
