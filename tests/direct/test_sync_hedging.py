"""The sync transport's worker-thread attempts: hedging a slow first byte (the sync OpenAI SDK),
the first-byte deadline over the first body byte, and no thread when neither is due. The slow
host is a raw HTTP/1.1 server on loopback that sends a head at once and its body's first byte
only after 20 s, and records when the client shut the connection."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import orjson
import pytest

import edge.direct
from tests.procs import Procs, free_port
from tests.proxy.faults import prices

MODEL = "m"
HI: Any = [{"role": "user", "content": "Hello"}]
SILENCE_S = 20.0
ANSWER = orjson.dumps(
    {
        "id": "raw-1", "object": "chat.completion", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "raw"},
                     "finish_reason": "stop"}],
    }
)  # fmt: skip


class SlowBody:
    """Answers its first `fast` requests at once, then sends each a head and no body for
    SILENCE_S; `left` holds, per slow request, the seconds from its head to the client's shut."""

    def __init__(self, fast: int = 0) -> None:
        self.fast = fast
        self.left: list[float] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            buffer = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = _content_length(head)
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                buffer = buffer[length:]
                with self.lock:
                    fast = self.fast > 0
                    self.fast -= 1
                if fast:
                    conn.sendall(_head(len(ANSWER)) + ANSWER)
                    continue
                self._silent(conn)
                return

    def _silent(self, conn: socket.socket) -> None:
        conn.sendall(_head(len(ANSWER)))
        sent = time.monotonic()
        conn.settimeout(SILENCE_S)
        try:
            gone = conn.recv(1) == b""
        except TimeoutError:
            gone = False
        except OSError:
            gone = True
        if gone:
            self.left.append(time.monotonic() - sent)
        else:
            conn.sendall(ANSWER)

    def close(self) -> None:
        self.listener.close()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def _head(length: int) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(length).encode() + b"\r\n\r\n"
    )


@pytest.fixture
def mocks() -> Iterator[Procs]:
    procs = Procs()
    try:
        yield procs
    finally:
        procs.stop_all()


def sync_openai(transport: httpx2.BaseTransport) -> openai.OpenAI:
    client = httpx2.Client(transport=transport)
    return openai.OpenAI(base_url="http://direct/v1", api_key="k", http_client=client)


def attempt_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("edge-direct-attempt")]


def test_sync_openai_hedges_a_slow_first_byte_and_shuts_the_loser(mocks: Procs) -> None:
    """The price policy sends every request to h0; once h0 has a p95, its silent body races
    h1 (hedging on): h1's answer comes long before h0's first body byte, and h0's connection is
    shut at once (its attempt cancelled, no verdict)."""
    slow = SlowBody(fast=6)
    urls = [slow.url, mocks.mock(free_port(), MODEL, name="h1")]
    transport = edge.direct.transport(
        models={MODEL: urls}, hedging=True, hedge_budget=1.0, hedge_min_delay_s=0.05,
        routing__models=prices(urls),
    )  # fmt: skip
    try:
        with sync_openai(transport) as client:
            for _ in range(6):  # samples for h0's p95
                raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HI)
                assert raw.headers["x-edge-server"] == slow.url
            started = time.monotonic()
            raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HI)
            elapsed = time.monotonic() - started
            reply = raw.parse()
    finally:
        transport.close()
        slow.close()
    assert raw.headers["x-mock-server"] == "h1" and reply.choices[0].message.content
    assert elapsed < 1.5, elapsed
    assert transport.router.balancer.hedges == 1
    assert transport.router.attempts.started == 8
    _wait_for(lambda: len(slow.left) == 1)
    assert slow.left[0] < 1.5, slow.left  # shut when the race was lost, not after 20 s
    assert all(h.inflight == 0 for h in transport.router.view.fleet.models[MODEL])


def test_sync_first_byte_deadline_covers_the_first_body_byte(mocks: Procs) -> None:
    """A head at once, the body's first byte after 20 s: the attempt fails at its first-byte
    deadline (2 x first_token_floor_s for an unsampled host), not at upstream.idle_timeout_s,
    and the whole answer comes from the other host."""
    slow = SlowBody()
    urls = [slow.url, mocks.mock(free_port(), MODEL, name="b1")]
    transport = edge.direct.transport(
        models={MODEL: urls}, routing__models=prices(urls), first_token_floor_s=0.5
    )
    try:
        with sync_openai(transport) as client:
            started = time.monotonic()
            raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HI)
            elapsed = time.monotonic() - started
            reply = raw.parse()
            stream = client.chat.completions.create(model=MODEL, messages=HI, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    finally:
        transport.close()
        slow.close()
    assert raw.headers["x-mock-server"] == "b1" and reply.choices[0].message.content
    assert text.startswith("tok1")
    assert 0.9 < elapsed < 3.0, elapsed  # the 1 s deadline, then b1's answer
    _wait_for(lambda: len(slow.left) >= 1)
    assert slow.left[0] < 2.0, slow.left  # shut at the deadline: the worker's read woken
    dead = transport.router.view.fleet.models[MODEL][0]
    assert dead.url == slow.url and dead.fails_in_row >= 1


def test_no_attempt_thread_without_hedging(mocks: Procs) -> None:
    """Hedging off: every attempt runs in the caller's thread, its first body byte watched by
    the transport's one watchdog thread, none handed to a worker."""
    before = attempt_threads()
    urls = [mocks.mock(free_port(), MODEL, name=f"n{i}") for i in range(2)]
    transport = edge.direct.transport(models={MODEL: urls})
    try:
        with sync_openai(transport) as client:
            for i in range(4):
                reply = client.chat.completions.create(model=MODEL, messages=HI, stream=i % 2 == 0)
                assert reply
            watchdogs = [t for t in threading.enumerate() if t.name == "edge-direct-watchdog"]
    finally:
        transport.close()
    assert not transport.hedging
    assert attempt_threads() == before
    assert len(watchdogs) >= 1  # two hosts: each attempt's deadline is the adaptive one
    assert transport.router.attempts.started == 4


def _wait_for(ready: Any, timeout: float = 5.0) -> None:
    until = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < until, "timed out waiting"
        time.sleep(0.02)
