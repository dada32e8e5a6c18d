"""The whole edge on loopback, for fuzz tests that go through it (see __init__)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass
from typing import Any

from tests.fuzzing.reference import Message, Parsed, Response, parse_requests, parse_response
from tests.fuzzing.wire import cut


@dataclass
class Script:
    """What a host answers one request with: `data` cut at `points`, then its `end`: "close"
    (a FIN), "reset" (the connection dropped with an error), or "hold" (silence, left open)."""

    data: bytes
    points: list[int]
    end: str

    @property
    def reference(self) -> Response:
        return parse_response(self.data, closed=self.end == "close")


OK_ANSWER = Script(
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}", [], "hold"
)


class ModelHost:
    """A model server on loopback for tests through the whole edge: every request gets
    `answer`; each request it got is kept as the reference parses it (`requests`), and bytes the
    reference refuses are kept apart (`refused`): nothing the edge sends a host may land there."""

    def __init__(self, answer: Script = OK_ANSWER) -> None:
        self.answer = answer
        self.requests: list[Message] = []
        self.refused: list[Parsed] = []
        self._server: asyncio.Server | None = None
        self._serving: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._serving):
            task.cancel()
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        got, answered = b"", 0
        try:
            while data := await reader.read(65536):
                got += data
                parsed = parse_requests(got)
                if parsed.end == "error":
                    self.refused.append(parsed)
                    return
                for message in parsed.messages[answered:]:
                    self.requests.append(message)
                    answered += 1
                    if not await self._play(writer):
                        return
        except ConnectionError:
            pass
        finally:
            writer.close()
            self._serving.discard(task)

    async def _play(self, writer: asyncio.StreamWriter) -> bool:
        script = self.answer
        for piece in cut(script.data, script.points[:32]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0)
        if script.end == "reset":
            reset(writer)
        return script.end == "hold"


def reset(writer: asyncio.StreamWriter) -> None:
    """Drop the connection with a reset (RST), not the FIN that a plain abort sends when
    nothing is left unread."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def start_worker(url: str, **overrides: Any) -> tuple[Any, int]:
    """A whole edge worker (edge/app.py) on loopback for model "m" at `url`: (worker, port).
    Health probes, affinity, outlier ejection and the discovery cache are off: every request
    of a test reaches the host, whatever the one before did."""
    from edge.app import Worker, bind
    from edge.config import from_mapping

    settings: dict[str, Any] = {
        "health__enabled": False, "routing__affinity": False, "discovery__cache_file": "",
        "outlier__consecutive_failures": 10**9,
    }  # fmt: skip
    config = from_mapping({"models": {"m": {"servers": [url]}}}, **(settings | overrides))
    worker = Worker(config)
    sock = bind("127.0.0.1", 0, reuse_port=False)
    await worker.start(sock)
    return worker, sock.getsockname()[1]


async def talk(port: int, pieces: list[bytes], quiet_s: float = 0.15) -> tuple[bytes, bytes, bool]:
    """(bytes delivered, bytes received, whether the server ended the connection) of one
    client connection: `pieces` written one by one, then read until the server closes or has
    been quiet for `quiet_s`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    delivered, out = bytearray(), bytearray()
    try:
        try:
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
                delivered += piece
                await asyncio.sleep(0)
        except ConnectionError:
            pass  # the server closed while the client was still sending
        with contextlib.suppress(ConnectionError):
            while True:
                try:  # (no wait_for: its inner task's exception would go unretrieved)
                    async with asyncio.timeout(quiet_s):
                        data = await reader.read(65536)
                except TimeoutError:
                    return bytes(delivered), bytes(out), False
                if not data:
                    break
                out += data
        return bytes(delivered), bytes(out), True
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
