"""A raw asyncio HTTP/1.1 upstream whose every write a test controls.

aiohttp's server would coalesce or re-frame writes; this one sends exactly the bytes a test hands
it, when the test says so, and records when its connection was closed by the peer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence


class RawUpstream:
    """Answers each request with `head` then the pieces the test releases one by one."""

    def __init__(self, head: bytes) -> None:
        self.head = head
        self.pieces: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.requests: list[bytes] = []
        self.closed_at: float | None = None
        self.got_request = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = _content_length(head)
            body = await reader.readexactly(length) if length else b""
            self.requests.append(head + body)
            self.got_request.set()
            writer.write(self.head)
            watcher = asyncio.create_task(self._watch_eof(reader))
            while (piece := await self.pieces.get()) is not None:
                writer.write(piece)
                await writer.drain()
            watcher.cancel()  # None means: close now, as a dying upstream would
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed_at = self.closed_at or time.monotonic()
        finally:
            writer.close()

    async def _watch_eof(self, reader: asyncio.StreamReader) -> None:
        try:
            await reader.read()
        except ConnectionError:
            pass
        self.closed_at = time.monotonic()
        self.pieces.put_nowait(None)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def chunked(pieces: Sequence[bytes]) -> list[bytes]:
    """Each piece as one HTTP/1.1 chunk, then the terminating chunk."""
    return [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    b"Cache-Control: no-cache\r\n\r\n"
)


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]


class Scripted:
    """Runs `script(reader, writer, n)` for the n-th request on each connection; the script
    writes the answer (any bytes, in any pieces) and returns False to close the connection."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.lost = 0  # connections the peer closed (seen by a read or a write)
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = _content_length(head)
                self.requests.append(head + await reader.readexactly(length))
                n += 1
                if not await self.script(reader, writer, n):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            self.lost += 1
        finally:
            writer.close()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


def answer(payload: bytes, keep: bool = True) -> Script:
    """A script that writes `payload` in one piece."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(payload)
        await writer.drain()
        return keep

    return script
