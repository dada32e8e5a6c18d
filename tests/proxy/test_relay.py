"""The relay: byte-exact and unbuffered, usage from the tail, mid-stream failure, disconnects."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest

from edge.dialects.errors import error_event
from edge.http.chunked import HOLD_MAX
from edge.observe.record import Usage
from edge.proxy.relay import read_usage
from tests.rawupstream import SSE_HEAD, RawUpstream, chunked

CHAT = orjson.dumps(
    {"model": "raw", "stream": True, "messages": [{"role": "user", "content": "x"}]}
)

# Awkward SSE: an event split across writes, several events in one write, CRLF line endings,
# comment lines, and a multi-byte UTF-8 character ("é" = c3 a9, "🙂" = 4 bytes) split across writes.
AWKWARD = [
    b'data: {"choices":[{"delta":{"content":"Hel',
    b'lo"}}]}\n\n',
    b': keep-alive comment\n\ndata: {"n":1}\n\ndata: {"n":2}\n\n',
    b'data: {"t":"caf\xc3',
    b"\xa9 \xf0\x9f",
    b'\x99\x82"}\r\n\r\n',
    b"event: ping\r\ndata: {}\r\n\r\n",
    b"data: [DONE]\n\n",
]


async def _read_at_least(resp: aiohttp.ClientResponse, got: bytearray, size: int) -> None:
    while len(got) < size:
        chunk = await asyncio.wait_for(resp.content.readany(), timeout=2)
        assert chunk, "stream ended early"
        got.extend(chunk)


async def test_sse_relayed_byte_for_byte_each_piece_before_the_next(start_edge):
    upstream = RawUpstream(SSE_HEAD)
    url = await upstream.start()
    edge = await start_edge({"raw": [url]})
    frames = chunked(AWKWARD)
    got = bytearray()
    expected = 0
    async with aiohttp.ClientSession() as client:
        # The edge waits for the first body byte before committing, so release it first.
        upstream.pieces.put_nowait(frames[0])
        async with client.post(f"{edge.url}/v1/chat/completions", data=CHAT) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream"
            for i, piece in enumerate(AWKWARD):
                if i:
                    upstream.pieces.put_nowait(frames[i])
                expected += len(piece)
                # The piece must reach the client before the upstream sends the next one.
                await _read_at_least(resp, got, expected)
                assert bytes(got) == b"".join(AWKWARD[: i + 1])
            upstream.pieces.put_nowait(frames[-1])
            upstream.pieces.put_nowait(None)
            rest = await asyncio.wait_for(resp.content.read(), timeout=2)
    assert bytes(got) + rest == b"".join(AWKWARD)
    await upstream.close()


async def test_request_body_forwarded_byte_for_byte(start_edge):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n"
    upstream = RawUpstream(head)
    url = await upstream.start()
    edge = await start_edge({"raw": [url]})
    # Odd spacing, key order and escapes that a parse-and-reserialise proxy would change.
    body = b'{ "model":"raw",  "z":1, "a":"\\u00e9\\n", "n": 1.50 }'
    upstream.pieces.put_nowait(b"{}")
    upstream.pieces.put_nowait(None)
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{edge.url}/v1/custom/thing?x=1&y=%20", data=body) as resp:
            assert resp.status == 200
            assert await resp.read() == b"{}"
    sent = upstream.requests[0]
    assert sent.endswith(b"\r\n\r\n" + body)
    assert sent.startswith(b"POST /v1/custom/thing?x=1&y=%20 HTTP/1.1\r\n")
    await upstream.close()


async def test_client_disconnect_closes_upstream_within_a_second(start_edge):
    upstream = RawUpstream(SSE_HEAD)
    url = await upstream.start()
    edge = await start_edge({"raw": [url]})
    upstream.pieces.put_nowait(chunked([b"data: {}\n\n"])[0])
    async with aiohttp.ClientSession() as client:
        resp = await client.post(f"{edge.url}/v1/chat/completions", data=CHAT)
        assert await asyncio.wait_for(resp.content.readany(), timeout=2) == b"data: {}\n\n"
        resp.close()  # drop the connection mid-stream
        gone = time.monotonic()
    deadline = gone + 1.0
    while upstream.closed_at is None and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert upstream.closed_at is not None, "upstream connection still open 1 s after disconnect"
    assert upstream.closed_at - gone < 1.0
    await asyncio.sleep(0.05)
    assert all(h.inflight == 0 for h in edge.view.fleet.models["raw"])
    await upstream.close()


@pytest.mark.parametrize(
    ("dialect_path", "marker"),
    [("/v1/chat/completions", b'data: {"error"'), ("/v1/messages", b"event: error\ndata: ")],
)
async def test_upstream_death_mid_stream_ends_with_error_event(start_edge, dialect_path, marker):
    upstream = RawUpstream(SSE_HEAD)
    url = await upstream.start()
    edge = await start_edge({"raw": [url]})
    upstream.pieces.put_nowait(chunked([b'data: {"partial'])[0])
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{edge.url}{dialect_path}", data=CHAT) as resp:
            first = await asyncio.wait_for(resp.content.readany(), timeout=2)
            upstream.pieces.put_nowait(None)  # the upstream closes without a final chunk
            rest = await asyncio.wait_for(resp.content.read(), timeout=5)
    body = first + rest
    assert body.startswith(b'data: {"partial\n\n')  # the torn event is terminated first
    assert marker in body and body.endswith(b"\n\n")
    await upstream.close()


async def test_hop_by_hop_response_headers_dropped(start_edge):
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
        b"Connection: keep-alive, X-Up-Hop\r\nX-Up-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
        b"Proxy-Authenticate: Basic\r\nX-End-To-End: yes\r\n\r\n"
    )
    upstream = RawUpstream(head)
    url = await upstream.start()
    edge = await start_edge({"raw": [url]})
    upstream.pieces.put_nowait(b"{}")
    upstream.pieces.put_nowait(None)
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{edge.url}/v1/chat/completions", data=CHAT) as resp:
            assert await resp.read() == b"{}"
            headers = resp.headers
    assert headers["X-End-To-End"] == "yes"
    for name in ("X-Up-Hop", "Keep-Alive", "Proxy-Authenticate"):
        assert name not in headers
    assert headers.get("Connection", "keep-alive").lower() == "keep-alive"
    await upstream.close()


def test_usage_from_openai_include_usage_tail():
    tail = (
        b'data: {"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":34,'
        b'"prompt_tokens_details":{"cached_tokens":5}}}\n\ndata: [DONE]\n\n'
    )
    assert read_usage(b"data: {}\n\n", tail) == Usage(12, 34)


def test_usage_from_anthropic_head_and_tail():
    head = b'event: message_start\ndata: {"message":{"usage":{"input_tokens":7,"output_tokens":1}}}'
    tail = b'event: message_delta\ndata: {"usage":{"output_tokens":9}}\n\nevent: message_stop\n'
    assert read_usage(head, tail) == Usage(7, 9)


def test_usage_from_gemini_and_absent():
    tail = b'{"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":4,"totalTokenCount":7}}'
    assert read_usage(tail, tail) == Usage(3, 4)
    assert read_usage(b"", b'{"choices":[]}') is None
    assert read_usage(b"", b'{"usage": {"prompt_tokens": "x"}}') is None


def test_error_event_shapes():
    assert orjson.loads(error_event("openai")[6:])["error"]["type"] == "server_error"
    anthropic = error_event("anthropic")
    assert anthropic.startswith(b"event: error\n")
    assert orjson.loads(anthropic.split(b"data: ")[1])["error"]["type"] == "api_error"
    assert orjson.loads(error_event("gemini")[6:])["error"]["status"] == "UNAVAILABLE"


async def test_clients_hanging_up_mid_stream_leave_no_error_log(start_mock, start_edge, caplog):
    mock = await start_mock(models=("m",), tokens=200, chunk_ms=2)
    edge = await start_edge({"m": [mock]})
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession() as client:
        for _ in range(20):
            resp = await client.post(f"{edge.url}/v1/chat/completions", json=body)
            await resp.content.readany()
            resp.close()
    await asyncio.sleep(0.3)
    errors = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert errors == []
    assert all(h.inflight == 0 for h in edge.view.fleet.models["m"])


def test_usage_skips_null_usage_and_keys_that_are_not_objects():
    tail = (
        b'data: {"choices":[{"delta":{"content":"\\"usage\\": soon"}}],"usage":null}\n\n'
        b'data: {"choices":[],"usage" :\n {"prompt_tokens":2,"completion_tokens":3,'
        b'"details":{"a":{"b":1}}}}\n\n'
        b'data: {"choices":[{"delta":{}}],"usage": null}\n\ndata: [DONE]\n\n'
    )
    assert read_usage(tail, tail) == Usage(2, 3)
    # An object cut off at the end of the window, or one that is not JSON, gives no usage.
    assert read_usage(b"", b'data: {"usage":{"prompt_tokens":2,"completion_tokens":') is None
    assert read_usage(b"", b'{"usage":{"prompt_tokens":2,}}') is None


# --- chunked passthrough (edge/http/chunked.py): the upstream's framing goes to an HTTP/1.1 client


async def _raw_exchange(url: str, request: bytes, pieces: list[bytes], upstream: RawUpstream):
    """Send `request` on a plain socket and read until the edge closes; the upstream sends the
    first of `pieces`, and the rest once the answer began (so the body is streamed)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        upstream.pieces.put_nowait(pieces[0])
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        for piece in pieces[1:]:
            upstream.pieces.put_nowait(piece)
        upstream.pieces.put_nowait(None)
        return head + await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()
        await writer.wait_closed()


def _request(version: bytes) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/" + version + b"\r\nHost: edge\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(CHAT), CHAT)
    )


USAGE_EVENT = b'data: {"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":22}}\n\n'
# The usage event split across three chunks (one with an extension), then [DONE] and a trailer.
SPLIT_STREAM = [
    b'f\r\ndata: {"n":1}\n\n\r\n',
    b"%x\r\n%b\r\n%x;ext=1\r\n%b\r\n" % (20, USAGE_EVENT[:20], 25, USAGE_EVENT[20:45]),
    b"%x\r\n%b\r\ne\r\ndata: [DONE]\n\n\r\n" % (len(USAGE_EVENT) - 45, USAGE_EVENT[45:]),
    b"0\r\nX-Trailer: up\r\n\r\n",
]
DECODED = b'data: {"n":1}\n\n' + USAGE_EVENT + b"data: [DONE]\n\n"


# The first piece is framed by the edge (it was read before the answer began); the rest goes
# out as the upstream framed it, and the edge ends the body itself, without the trailer.
PASSED = b'f\r\ndata: {"n":1}\n\n\r\n' + b"".join(SPLIT_STREAM[1:3]) + b"0\r\n\r\n"


@pytest.mark.parametrize(("version", "expected"), [(b"1.1", PASSED), (b"1.0", DECODED)])
async def test_chunked_stream_keeps_its_framing_for_http11_and_is_decoded_for_http10(
    start_edge, version, expected
):
    from tests.observe.test_metrics import scrape, total

    upstream = RawUpstream(SSE_HEAD)
    url = await upstream.start()
    edge = await start_edge({"raw": [url]})
    wire = await _raw_exchange(edge.url, _request(version), SPLIT_STREAM, upstream)
    head, _, body = wire.partition(b"\r\n\r\n")
    assert (b"Transfer-Encoding: chunked" in head) == (version == b"1.1")
    assert body == expected
    async with aiohttp.ClientSession() as client:
        s = await scrape(client, edge.url)
    # Usage read across the chunks the event was split into, and the body counted, not framing.
    assert total(s, "edge_tokens_total", type="prompt") == 11
    assert total(s, "edge_tokens_total", type="completion") == 22
    assert total(s, "edge_response_bytes_total") == len(DECODED)
    await upstream.close()


async def test_bad_chunk_framing_mid_stream_ends_with_an_error_event(start_edge):
    upstream = RawUpstream(SSE_HEAD)
    url = await upstream.start()
    edge = await start_edge({"raw": [url]})
    first, second = chunked([b'data: {"n":1}\n\n', b'data: {"n":2}\n\n'])[:2]
    async with aiohttp.ClientSession() as client:
        upstream.pieces.put_nowait(first)
        async with client.post(f"{edge.url}/v1/chat/completions", data=CHAT) as resp:
            assert await asyncio.wait_for(resp.content.readany(), timeout=2)
            # A good chunk and then a size line no parser could read, in one write.
            upstream.pieces.put_nowait(second + b"zz\r\ndata: evil\n\n\r\n")
            body = await asyncio.wait_for(resp.content.read(), timeout=5)
    assert body.startswith(b'data: {"n":2}\n\n')  # the good chunk before the bad one went on
    assert b"evil" not in body and b'data: {"error"' in body and body.endswith(b"\n\n")
    await upstream.close()


@pytest.mark.parametrize(
    ("dialect_path", "dialect"), [("/v1/chat/completions", "openai"), ("/v1/messages", "anthropic")]
)
async def test_upstream_dying_inside_a_chunk_ends_with_an_error_event(
    start_edge, dialect_path, dialect
):
    upstream = RawUpstream(SSE_HEAD)
    url = await upstream.start()
    edge = await start_edge({"raw": [url]})
    async with aiohttp.ClientSession() as client:
        upstream.pieces.put_nowait(chunked([b'data: {"n":1}\n\n'])[0])
        async with client.post(f"{edge.url}{dialect_path}", data=CHAT) as resp:
            assert await asyncio.wait_for(resp.content.readany(), timeout=2)
            # A whole chunk, then 0x64 = 100 bytes announced and 11 sent: the part of a chunk
            # is held back, so the client is between chunks when the upstream dies.
            upstream.pieces.put_nowait(chunked([b'data: {"n":2}\n\n'])[0] + b'64\r\ndata: {"z"')
            upstream.pieces.put_nowait(None)
            # A clean end (the last chunk came, or aiohttp would raise ClientPayloadError).
            rest = await asyncio.wait_for(resp.content.read(), timeout=5)
    assert rest == b'data: {"n":2}\n\n' + error_event(dialect)
    await upstream.close()


async def test_upstream_dying_inside_a_chunk_over_the_hold_bound_cuts_the_client_off(start_edge):
    """The one exception: a chunk over chunked.HOLD_MAX goes on as it arrives (never an SSE
    event in practice), so the client holds part of it, no event can follow, and it is cut."""
    upstream = RawUpstream(SSE_HEAD)
    url = await upstream.start()
    edge = await start_edge({"raw": [url]})
    async with aiohttp.ClientSession() as client:
        upstream.pieces.put_nowait(chunked([b'data: {"n":1}\n\n'])[0])
        async with client.post(f"{edge.url}/v1/chat/completions", data=CHAT) as resp:
            assert await asyncio.wait_for(resp.content.readany(), timeout=2)
            upstream.pieces.put_nowait(b"%x\r\n" % HOLD_MAX + b"x" * 1000)
            got = bytearray()
            await _read_at_least(resp, got, 1000)  # passed on before the rest of the chunk came
            upstream.pieces.put_nowait(None)
            with pytest.raises(aiohttp.ClientPayloadError):
                await asyncio.wait_for(resp.content.read(), timeout=5)
    await upstream.close()


async def test_a_chunk_held_until_whole_keeps_the_idle_clock_running(start_edge):
    """A chunk that trickles in over more than the idle timeout, a part well within it each
    time: held until whole, yet the server is not idle, so the stream is not failed."""
    upstream = RawUpstream(SSE_HEAD)
    url = await upstream.start()
    edge = await start_edge({"raw": [url]}, upstream__idle_timeout_s=0.5)
    event = b'data: {"n":2,"text":"' + b"x" * 50 + b'"}\n\n'
    second = chunked([event])[0]
    async with aiohttp.ClientSession() as client:
        upstream.pieces.put_nowait(chunked([b'data: {"n":1}\n\n'])[0])
        async with client.post(f"{edge.url}/v1/chat/completions", data=CHAT) as resp:
            assert await asyncio.wait_for(resp.content.readany(), timeout=2)
            for at in range(0, len(second), 8):  # 1.1 s for the chunk, 0.1 s a part
                upstream.pieces.put_nowait(second[at : at + 8])
                await asyncio.sleep(0.1)
            upstream.pieces.put_nowait(b"0\r\n\r\n")
            upstream.pieces.put_nowait(None)
            rest = await asyncio.wait_for(resp.content.read(), timeout=5)
    assert rest == event  # whole, and no error event after it
    await upstream.close()


# A stream cut at every byte after its first chunk: a whole event per chunk, an event split
# across two chunks (with a UTF-8 character split too), the terminating chunk.
FIRST = b'data: {"n":1}\n\n'
REST = [b'data: {"n":2}\n\n', b'data: {"t":"caf\xc3', b'\xa9"}\n\n']
REST_WIRE = b"".join(chunked(REST))
REST_ENDS = [len(b"".join(chunked(REST)[: k + 1])) for k in range(len(REST))]


def _strict_chunked(body: bytes) -> bytes:
    """The data of a chunked body that must be well-framed and end with the last chunk."""
    data, at = b"", 0
    while True:
        eol = body.index(b"\r\n", at)
        size = int(body[at:eol], 16)
        assert body[at:eol] == b"%x" % size, body
        if size == 0:
            assert body[eol:] == b"\r\n\r\n", body  # the last chunk, no trailer, nothing after
            return data
        data += body[eol + 2 : eol + 2 + size]
        assert body[eol + 2 + size : eol + 4 + size] == b"\r\n", body
        at = eol + 4 + size


def _ended(data: bytes) -> bytes:
    """`data`, then the error event, after a blank line when `data` stopped inside an event."""
    lead = b"" if data.endswith(b"\n\n") else b"\n\n"
    return data + lead + error_event("openai")


async def test_upstream_cut_at_any_byte_ends_with_whole_chunks_and_an_error_event(start_edge):
    """HTTP/1.1: the client gets the whole chunks that came before the cut, as they came (the
    chunk the cut fell in never reaches it), then the error event and the last chunk."""
    upstream = RawUpstream(SSE_HEAD)
    url = await upstream.start()
    edge = await start_edge({"raw": [url]})
    first = chunked([FIRST])[0]
    for k in range(len(REST_WIRE)):
        pieces = [first, REST_WIRE[:k]] if k else [first]
        wire = await _raw_exchange(edge.url, _request(b"1.1"), pieces, upstream)
        head, _, body = wire.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head, k
        whole = REST_WIRE[: max([e for e in REST_ENDS if e <= k], default=0)]
        assert body.startswith(first + whole), k  # passed on as it came: never a partial chunk
        data = FIRST + b"".join(REST[: sum(1 for e in REST_ENDS if e <= k)])
        assert _strict_chunked(body) == _ended(data), k
    await upstream.close()


async def test_upstream_cut_at_any_byte_ends_an_http10_stream_with_an_error_event(start_edge):
    """HTTP/1.0: the body is decoded and close-delimited, so the client gets every data byte
    that came (the event the cut fell in, torn, ended by a blank line), then the error event,
    then the close."""
    upstream = RawUpstream(SSE_HEAD)
    url = await upstream.start()
    edge = await start_edge({"raw": [url]})
    first = chunked([FIRST])[0]
    for k in range(len(REST_WIRE)):
        pieces = [first, REST_WIRE[:k]] if k else [first]
        wire = await _raw_exchange(edge.url, _request(b"1.0"), pieces, upstream)
        head, _, body = wire.partition(b"\r\n\r\n")
        assert b"Transfer-Encoding" not in head and b"Content-Length" not in head, k
        data, at = FIRST, 0  # every data byte in REST_WIRE[:k]
        for piece in REST:
            start = at + len(b"%x\r\n" % len(piece))
            data += piece[: max(0, min(len(piece), k - start))]
            at = start + len(piece) + 2
        assert body == _ended(data), k
    await upstream.close()
