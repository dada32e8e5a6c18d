"""The benchmark's upstream: a raw asyncio HTTP/1.1 server on uvloop, as cheap per request as
Python gets, so that the proxy in front of it is what a benchmark measures.

- `POST` (any path) whose body has `"stream": true`: an SSE stream of chunk events, each event
  its own HTTP chunk and its own write, `chunk_ms` apart, then `data: [DONE]`. The stream's shape
  comes from a `bench:CHUNKS:CHUNK_MS:HOLD` tag anywhere in the body (in a message's content, which
  every proxy forwards unchanged); HOLD=1 sends the first event, then waits for `GET /release`.
- any other `POST`: a fixed chat.completion JSON body with Content-Length.
- `GET /health`, `GET /v1/models`, `GET /release` (frees every held stream).

    python -m loadtests.bench.upstream --port 9000
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
from typing import cast

import uvloop

CHUNKS, CHUNK_MS = 200, 5.0
_TAG = re.compile(rb"bench:(\d+):(\d+(?:\.\d+)?):([01])")
_HOLD_LIMIT_S = 300.0  # a held stream is released after this even without /release

FIXED_BODY = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the bench '
    b'upstream."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":6,'
    b'"total_tokens":18}}'
)
_FIXED = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(FIXED_BODY),
    FIXED_BODY,
)
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
DONE_EVENT = b"data: [DONE]\n\n"


def chunk_event(i: int) -> bytes:
    """Event i of a stream: 180 bytes, distinct per index so a lost or reordered one shows."""
    return (
        b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","model":"bench",'
        b'"choices":[{"index":0,"delta":{"content":" tok%05dxxxxxxxxxxxxxxxxxxxxxxx"},'
        b'"finish_reason":null}]}\n\n' % i
    )


def stream_body(chunks: int) -> bytes:
    """The SSE payload a client must receive, byte for byte, for a stream of `chunks` events."""
    return b"".join(chunk_event(i) for i in range(chunks)) + DONE_EVENT


def stream_tag(chunks: int = CHUNKS, chunk_ms: float = CHUNK_MS, hold: bool = False) -> str:
    return f"bench:{chunks}:{chunk_ms:g}:{int(hold)}"


def _framed(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _simple(status: bytes, body: bytes) -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        status,
        len(body),
        body,
    )


class Shared:
    """State every connection sees: the event held streams wait on."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.held = 0

    def free(self) -> int:
        freed, self.held = self.held, 0
        self.release.set()
        self.release = asyncio.Event()
        return freed


class Http(asyncio.Protocol):
    """One client connection: parses requests as they arrive, answers them in order."""

    __slots__ = ("shared", "transport", "buf", "busy", "closing")

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False  # a stream is being written; later requests wait in buf
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._serve()

    def _serve(self) -> None:
        while not self.busy and (request := self._next_request()) is not None:
            self._answer(*request)

    def _next_request(self) -> tuple[bytes, bytes, bytes] | None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(self.buf[:end]).lower()
        length = 0
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : stop if stop > 0 else len(head)])
        elif b"\r\ntransfer-encoding: chunked" in head:
            return self._chunked_request(head, end)
        if len(self.buf) < end + 4 + length:
            return None
        body = bytes(self.buf[end + 4 : end + 4 + length])
        del self.buf[: end + 4 + length]
        return head, head.split(b" ", 2)[1], body

    def _chunked_request(self, head: bytes, end: int) -> tuple[bytes, bytes, bytes] | None:
        pos, body = end + 4, bytearray()
        while True:
            line_end = self.buf.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(bytes(self.buf[pos:line_end]).split(b";")[0], 16)
            if size == 0:
                if self.buf.find(b"\r\n\r\n", line_end - 2) < 0:
                    return None
                del self.buf[: self.buf.find(b"\r\n\r\n", line_end - 2) + 4]
                return head, head.split(b" ", 2)[1], bytes(body)
            if len(self.buf) < line_end + 2 + size + 2:
                return None
            body += self.buf[line_end + 2 : line_end + 2 + size]
            pos = line_end + 2 + size + 2

    def _answer(self, head: bytes, path: bytes, body: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if head.startswith(b"post"):
            if b'"stream":true' in body or b'"stream": true' in body:
                self.busy = True
                asyncio.ensure_future(self._stream(body))
                return
            transport.write(_FIXED)
        elif path == b"/release":
            transport.write(_simple(b"200 OK", b'{"released":%d}' % self.shared.free()))
        elif path == b"/health" or path.startswith(b"/health/"):
            transport.write(_simple(b"200 OK", b'{"status":"ok"}'))
        elif path == b"/v1/models":
            transport.write(_simple(b"200 OK", b'{"object":"list","data":[{"id":"bench"}]}'))
        else:
            transport.write(_simple(b"404 Not Found", b'{"error":"not found"}'))
        if b"\r\nconnection: close" in head:
            transport.close()

    async def _stream(self, body: bytes) -> None:
        tag = _TAG.search(body)
        chunks, delay, hold = (
            (int(tag[1]), float(tag[2]) / 1000.0, tag[3] == b"1") if tag else (CHUNKS, CHUNK_MS, 0)
        )
        transport = self.transport
        assert transport is not None
        transport.write(_SSE_HEAD)
        for i in range(chunks):
            if self.closing:
                return
            transport.write(_framed(chunk_event(i)))
            if i == 0 and hold:
                await self._hold()
            elif delay:
                await asyncio.sleep(delay)
        transport.write(_framed(DONE_EVENT) + b"0\r\n\r\n")
        self.busy = False
        if self.buf:
            self._serve()

    async def _hold(self) -> None:
        self.shared.held += 1
        try:
            await asyncio.wait_for(self.shared.release.wait(), _HOLD_LIMIT_S)
        except TimeoutError:
            pass


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    shared = Shared()
    server = await loop.create_server(lambda: Http(shared), host, port, backlog=4096)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"bench upstream on http://{host}:{port}", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
