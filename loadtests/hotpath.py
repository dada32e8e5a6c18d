"""The edge's own Python CPU per proxied request, with the sockets taken out.

    .venv/bin/python loadtests/hotpath.py [--requests 20000] [--rounds 5] [--stream]
        [--dialect anthropic|gemini [--translate]] [--spare [--no-continuation]]

A whole worker (edge/app.py's Worker, default config, one model on one server) answers requests
fed straight into its client-side protocol; its pooled upstream connection has a transport
whose write feeds a canned answer back into the connection's parser on the next loop turn.
Everything between the bytes of a request and the bytes of its answer runs (parsing, routing,
affinity, the attempt, the relay, metrics), and no system call does, so the figure is the
interpreter's work alone and moves little with other load on the machine: the number to
watch while making the hot path leaner. The median over rounds is printed, in microseconds per
request (or per relayed chunk with --stream, 50 chunks a request). With --dialect the client
speaks Anthropic's or Gemini's API; with --translate its server speaks only OpenAI's, so each
relayed event is translated (edge/proxy/translate.py) instead of passed through. A streamed
request can be continued on another host if its stream breaks (routing.continuation, on by
default, for a model with two servers or more: --spare adds one) keeps the relayed pieces, bounded;
--no-continuation measures the relay without.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.app import Worker, bind  # noqa: E402
from edge.config import from_mapping  # noqa: E402
from edge.http.client import _Conn, _Origin  # noqa: E402
from edge.http.server import Connection  # noqa: E402

UPSTREAM = "http://127.0.0.1:9"
SPARE = "http://127.0.0.1:10"
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\n"
    b"Content-Type: application/json\r\nContent-Length: 66\r\n\r\n"
    b'{"model":"m","messages":[{"role":"user","content":"hello there"}]}'
)
BODY = (
    b'{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant",'
    b'"content":"hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,'
    b'"completion_tokens":2,"total_tokens":7}}'
)
ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 22 Nov 2026 02:54:48 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n"
    % len(BODY)
) + BODY
STREAM_REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\n"
    b"Content-Type: application/json\r\nContent-Length: 80\r\n\r\n"
    b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hello there"}]}'
)
CHUNK = b'data: {"choices":[{"delta":{"content":"%s"}}]}\n\n' % (b"x" * 120)
# The same request in each dialect (--dialect), for the cost of translating its answer.
DIALECT_REQUESTS = {
    "anthropic": (
        b"/v1/messages",
        b'{"model":"m","max_tokens":64,"stream":true,'
        b'"messages":[{"role":"user","content":"hello there"}]}',
    ),
    "gemini": (
        b"/v1beta/models/m:streamGenerateContent?alt=sse",
        b'{"contents":[{"role":"user","parts":[{"text":"hello there"}]}]}',
    ),
}


def request_in(dialect: str) -> bytes:
    if dialect == "openai":
        return REQUEST
    path, body = DIALECT_REQUESTS[dialect]
    return (
        b"POST %b HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (path, len(body), body)
    )


class _Transport:
    """Enough of a transport for the protocols: writes go to `sink`."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink

    def write(self, data: bytes) -> None:
        self.sink(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def close(self) -> None:
        pass

    abort = pause_reading = resume_reading = close

    def is_closing(self) -> bool:
        return False


async def run(
    requests: int, rounds: int, stream: bool, dialect: str = "openai", translate: bool = False,
    continuation: bool = True, spare: bool = False,
) -> list[float]:  # fmt: skip
    raw: dict[str, Any] = {"models": {"m": {"servers": [UPSTREAM]}}, "health": {"enabled": False}}
    raw["routing"] = {"continuation": continuation}
    if spare:
        # A second server the price policy never picks: a stream of a model with two servers
        # can be continued, so its pieces are kept (one server: nowhere to continue, nothing kept).
        raw["models"]["m"]["servers"].append(SPARE)
        prices = {UPSTREAM: {"input": 0.1}, SPARE: {"input": 1.0}}
        raw["routing"]["models"] = {"m": {"policy": "price", "prices": prices}}
    if translate:
        raw["dialects"] = {UPSTREAM: ["openai"]}  # the answer is translated, event by event
    config = from_mapping(raw)
    request = STREAM_REQUEST if stream and dialect == "openai" else request_in(dialect)
    worker = Worker(config)
    await worker.start(bind("127.0.0.1", 0, False))
    loop = asyncio.get_running_loop()
    pool = worker.pool
    origin = pool._origins[UPSTREAM] = _Origin(UPSTREAM, None)
    upstream = _Conn(pool, origin)

    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n"
    piece = b"%x\r\n%b\r\n" % (len(CHUNK), CHUNK)
    pieces = [head] + [piece] * 50 + [b"0\r\n\r\n"]

    def answer(_data: bytes) -> None:
        if stream:
            loop.call_soon(feed, iter(pieces))  # a piece per loop turn, as a socket would
        else:
            loop.call_soon(upstream.data_received, ANSWER)

    def feed(rest: Any) -> None:
        data = next(rest, None)
        if data is not None:
            upstream.data_received(data)
            loop.call_soon(feed, rest)

    upstream.connection_made(_Transport(answer))  # type: ignore[arg-type]
    pool._conns.add(upstream)
    pool._open[origin.key] += 1
    pool.release(upstream)

    done: list[asyncio.Future[None]] = []

    def received(data: bytes) -> None:
        if data.endswith(b"0\r\n\r\n" if stream else BODY) and done and not done[-1].done():
            done[-1].set_result(None)

    client = Connection(worker.web)
    client.connection_made(_Transport(received))  # type: ignore[arg-type]
    gc.collect()
    per: list[float] = []
    for _ in range(rounds):
        began = time.process_time()
        for _ in range(requests):
            done.append(loop.create_future())
            client.data_received(request)
            await asyncio.wait_for(done[-1], 5)
            done.clear()
        spent = time.process_time() - began
        per.append(spent / requests / (50 if stream else 1) * 1e6)
    client.connection_lost(None)
    await worker.drain()
    return per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument(
        "--dialect", choices=["openai", "anthropic", "gemini"], default="openai",
        help="the client's API (the upstream answers OpenAI's stream either way)",
    )  # fmt: skip
    parser.add_argument(
        "--translate", action="store_true",
        help="the server speaks only OpenAI's API: the answer is translated to --dialect's",
    )  # fmt: skip
    parser.add_argument(
        "--no-continuation", action="store_true",
        help="routing.continuation off: a broken stream is not continued, nothing is kept",
    )  # fmt: skip
    parser.add_argument(
        "--spare", action="store_true",
        help="a second server the price policy never picks (a stream can then be continued)",
    )  # fmt: skip
    args = parser.parse_args()
    per = uvloop.run(
        run(
            args.requests,
            args.rounds,
            args.stream,
            args.dialect,
            args.translate,
            not args.no_continuation,
            args.spare,
        )  # fmt: skip
    )
    unit = "relayed chunk" if args.stream else "request"
    shown = " ".join(f"{v:.1f}" for v in per)
    median = statistics.median(per)
    print(f"{median:.1f} us of Python CPU per {unit} (min {min(per):.1f}; rounds: {shown})")


if __name__ == "__main__":
    main()
