"""edge/http/chunked.py: a chunked body read decoded or passed on raw, fed in every possible split,
and a hostile body refused before any of its bad framing is handed on."""

from __future__ import annotations

import pytest

from edge.http.chunked import HOLD_MAX, BadChunk, Chunks, unframe

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
        with pytest.raises(BadChunk) as refused:
            passed += chunks.feed(body[:cut], raw)
            passed += chunks.feed(body[cut:], raw)
        passed += refused.value.good
        assert not chunks.done
        if not raw:
            assert passed.startswith(b"data: ok\n\n")
            continue
        # Raw: the whole good chunks alone (a chunk is held until its CRLF was checked), never
        # a byte of bad framing; the client is between chunks, so an error event can follow.
        assert passed == good and chunks.at_boundary


def test_endless_size_line_is_refused():
    chunks = Chunks()
    with pytest.raises(BadChunk):
        for _ in range(10):
            chunks.feed(b"a;" + b"x" * 1000, raw=True)


@pytest.mark.parametrize(
    "body",
    [b"1;" + b"e" * 5000 + b"\r\na\r\n0\r\n\r\n", b"0\r\nX: " + b"v" * 5000 + b"\r\n\r\n"],
    ids=["size line", "trailer line"],
)
@pytest.mark.parametrize("raw", [True, False])
def test_a_line_over_the_bound_is_refused_whole_as_in_pieces(body, raw):
    for cuts in ([], [100], list(range(1000, len(body), 1000))):
        with pytest.raises(BadChunk, match="too long|bad trailer"):
            read(body, raw, cuts)


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


# --- raw: whole chunks only, so an upstream that dies at any byte leaves the client between chunks

ENDS = [len(framed(EVENTS[: k + 1], end=b"")) for k in range(len(EVENTS))]


def whole_chunks(k: int) -> bytes:
    """The whole chunks at the start of BODY[:k] (the last, terminating chunk never goes on)."""
    return BODY[: max([e for e in ENDS if e <= k], default=0)]


@pytest.mark.parametrize("k", range(len(BODY)))
def test_raw_body_cut_at_any_byte_in_any_split_hands_on_whole_chunks(k):
    """The upstream died after k bytes, read in any split: what went on is the whole chunks
    before the cut, the client is between chunks, and the framing count matches what went on."""
    for cuts in [[], *[[j] for j in range(1, k)], list(range(1, k))]:
        out, chunks = read(BODY[:k], raw=True, cuts=cuts)
        passed = b"".join(out)
        assert passed == whole_chunks(k), cuts
        assert chunks.at_boundary, cuts
        whole = sum(1 for e in ENDS if e <= k)
        assert len(passed) - chunks.framing == len(b"".join(EVENTS[:whole])), cuts


def test_a_chunk_split_across_reads_is_held_then_handed_on_whole():
    chunks = Chunks()
    one, two = framed([b"data: 1\n\n"], end=b""), framed([b"data: 22\n\n"], end=b"")
    assert chunks.feed(one + two[:4], raw=True) == one  # the whole chunk goes on, no more
    assert chunks.at_boundary and chunks.framing == 5
    assert chunks.feed(two[4:-1], raw=True) == b""
    assert chunks.feed(two[-1:], raw=True) == two
    assert chunks.at_boundary and chunks.framing == 10


def test_a_chunk_up_to_the_hold_bound_is_held_a_larger_one_goes_on_as_it_arrives():
    largest = framed([b"x" * (HOLD_MAX - 8)], end=b"")  # "fff8\r\n", the data, CRLF
    assert len(largest) == HOLD_MAX
    chunks = Chunks()
    assert chunks.feed(largest[:-1], raw=True) == b""  # held whole, up to its last byte
    assert chunks.at_boundary
    assert chunks.feed(largest[-1:], raw=True) == largest
    # One byte more: passed on as it arrives, so the client holds part of a chunk until its
    # end came (an upstream that dies inside it gets the client's connection cut).
    giant = framed([b"y" * (HOLD_MAX - 7)], end=b"")
    assert len(giant) == HOLD_MAX + 1
    small = framed([b"data: 1\n\n"], end=b"")
    chunks = Chunks()
    assert chunks.feed(small + giant[:1000], raw=True) == small + giant[:1000]
    assert not chunks.at_boundary
    assert chunks.feed(giant[1000:-1], raw=True) == giant[1000:-2]  # the CR waits for its LF
    assert not chunks.at_boundary
    # The giant's end, then a small chunk that a read ends inside: held again.
    assert chunks.feed(giant[-1:] + small[:5], raw=True) == b"\r\n"
    assert chunks.at_boundary
    assert chunks.feed(small[5:] + b"0\r\n\r\n", raw=True) == small and chunks.done
