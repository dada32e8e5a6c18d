"""What the fuzz tests (tests/test_fuzz_*.py) and their long run (loadtests/fuzz.py) share.

- harness.py: `fuzz(n)`, hypothesis settings for one target: `n` examples in `make test`,
  derandomized (the same examples every run, so a red suite points at a change, not at luck),
  or EDGE_FUZZ_EXAMPLES drawn at random (the long run: `python -m loadtests.fuzz --minutes N`);
  `Harness`, one event loop for all the examples of a test (a fresh loop per example costs more
  than most examples) that records what must never happen: an exception reaching the loop's
  exception handler, an error logged by the edge; `FakeTransport`, a socket as a protocol sees
  it, without the socket: the exact pieces a test delivers reach `data_received` one by one,
  which loopback TCP does not promise.
- reference.py: reference parsers written from RFC 9112, strict wherever framing is decided and
  taking llhttp's leniencies only where they frame nothing differently (each named where it is
  taken): `parse_requests` (what a client's bytes frame), `read_chunked` (a chunked body),
  `parse_response` (what an upstream's bytes frame), `edge_responses` (the edge's own output,
  which must be well-formed HTTP/1.1). A test compares what the edge did with them.
- wire.py: `cut`, `mutate`, `soup`: the same bytes delivered in other pieces; valid bytes broken
  on purpose; random bytes made of pieces that mean something to HTTP/1.1.
- edge.py: a whole edge worker on loopback, a model host whose answers a test scripts.
"""

from tests.fuzzing.edge import OK_ANSWER, ModelHost, Script, reset, start_worker, talk
from tests.fuzzing.harness import EXAMPLES_ENV, FakeTransport, Harness, fuzz, new_loop, settle
from tests.fuzzing.reference import (
    LAX_CHUNKS,
    RELAY_CHUNKS,
    REQUEST_CHUNKS,
    Bad,
    Chunked,
    ChunkRules,
    Message,
    Parsed,
    Reply,
    Response,
    edge_responses,
    field_line,
    field_list,
    line_at,
    parse_requests,
    parse_response,
    read_chunked,
)
from tests.fuzzing.wire import NASTY, Wire, cut, cuts, mutate, soup

__all__ = [
    "EXAMPLES_ENV", "LAX_CHUNKS", "NASTY", "OK_ANSWER", "RELAY_CHUNKS", "REQUEST_CHUNKS", "Bad",
    "ChunkRules", "Chunked", "FakeTransport", "Harness", "Message", "ModelHost", "Parsed",
    "Reply", "Response", "Script", "Wire", "cut", "cuts", "edge_responses", "field_line",
    "field_list", "fuzz", "line_at", "mutate", "new_loop", "parse_requests", "parse_response",
    "read_chunked", "reset", "settle", "soup", "start_worker", "talk",
]  # fmt: skip
