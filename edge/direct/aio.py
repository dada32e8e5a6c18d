"""The async httpx2 transport (AsyncOpenAI, AsyncAnthropic): edge/direct/transports.py's sync
one on the caller's event loop, with the first-byte deadline over the head and the first body
byte both (anyio.fail_after), and hedging ([routing] hedging: a second host races a slow first
byte, as the edge's forwarder does) when the loop is asyncio's."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast

import anyio
import httpx2

from edge.dialects import dialect_of
from edge.direct.resume import Resumable, ending
from edge.direct.router import Call, Router, forward_headers
from edge.direct.settings import DirectSettings, settings_from
from edge.direct.transports import (
    _again,
    _failure,
    _limits,
    _outbound,
    _refused,
    _resumable,
    _served,
    _timeouts,
    _verify,
    error_response,
)
from edge.errors import EdgeError, Unavailable
from edge.proxy.splice import Splice
from edge.routing.attempt import OK, STREAM_ERROR, TIMEOUT, Attempt
from edge.routing.fleet import Host


def async_transport(**settings: Any) -> AsyncDirectTransport:
    """An async transport for httpx2.AsyncClient (AsyncOpenAI, AsyncAnthropic)."""
    return AsyncDirectTransport(settings_from(**settings))


class AsyncDirectTransport(httpx2.AsyncBaseTransport):
    """Async: routing runs on the caller's loop (under the router's lock, held for
    microseconds: never across an await)."""

    def __init__(
        self, settings: DirectSettings, inner: httpx2.AsyncBaseTransport | None = None
    ) -> None:
        self.router = Router(settings)
        self.inner = inner or httpx2.AsyncHTTPTransport(
            verify=_verify(settings), limits=_limits(settings), trust_env=False
        )

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.raw_path.decode("ascii")
        dialect = dialect_of(path)
        body = await request.aread()
        try:
            # The first request waits for the first view off the loop (a thread's wait).
            if not self.router.ready_now() and not await anyio.to_thread.run_sync(
                self.router.ready
            ):
                raise Unavailable("No view of the fleet yet: discovery has not answered.")
            call = self.router.call(path, request.headers, body)
        except EdgeError as err:
            return error_response(err, dialect)
        headers = forward_headers(request.headers.multi_items())
        found = await self.open(call, request, headers)
        return found if isinstance(found, httpx2.Response) else error_response(found, dialect)

    async def open(
        self, call: Call, request: httpx2.Request, headers: list[tuple[str, str]]
    ) -> httpx2.Response | Unavailable:
        """The first attempt of `call` that answers; the 503 when none does."""
        while True:
            host = call.next()
            if host is None:
                wait = call.wait()
                if wait is None:
                    return call.unavailable()
                await anyio.sleep(wait)
                continue
            delay = call.hedge_delay(host)
            if delay is None or not _on_asyncio():
                found = await self._attempt(call, host, request, headers)
            else:
                found = await self._race(call, host, request, headers, delay)
            if found is not None:
                return found

    async def _race(
        self, call: Call, host: Host, request: httpx2.Request, headers: list[tuple[str, str]],
        delay: float,
    ) -> httpx2.Response | None:  # fmt: skip
        """`host`'s attempt, hedged as the edge hedges ([routing] hedging): when no first byte
        came within `delay` (its recent p95), a second host races it (the plan's, paid from the
        hedge budget); the first to open wins, the other is cancelled (no verdict on it)."""
        racing = {asyncio.ensure_future(self._attempt(call, host, request, headers))}
        winner: httpx2.Response | None = None
        try:
            done, _ = await asyncio.wait(racing, timeout=delay)
            second = None if done else call.hedge()
            if second is not None:
                racing.add(asyncio.ensure_future(self._attempt(call, second, request, headers)))
            pending, raised = set(racing), None
            while pending and winner is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.exception() is not None:
                        raised = raised or task.exception()
                    elif winner is None:
                        winner = task.result()
            if winner is None and raised is not None:
                raise raised
            return winner
        finally:
            for task in racing:
                if not task.done():
                    task.cancel()  # its attempt ends cancelled: a lost race says nothing
            for task in racing:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    lost = await task
                    if lost is not None and lost is not winner:
                        await lost.aclose()  # opened too, but lost by a hair

    async def _attempt(
        self, call: Call, host: Host, request: httpx2.Request, headers: list[tuple[str, str]]
    ) -> httpx2.Response | None:
        attempt, limit = call.start(host)
        timeouts = _timeouts(call, limit)
        out = _outbound(request, call, host, headers, timeouts)
        response: httpx2.Response | None = None
        try:
            with anyio.fail_after(limit):  # the head and the first body byte
                response = await self.inner.handle_async_request(out)
                if _refused(call, attempt, response):
                    await response.aclose()
                    return None
                resume = _resumable(call, response, timeouts)
                source = cast(httpx2.AsyncByteStream, response.stream)
                rest = aiter(source)
                first = await anext(rest, b"")
        except (httpx2.TransportError, TimeoutError) as exc:
            if response is not None:
                await response.aclose()
            if isinstance(exc, httpx2.TransportError):
                outcome, reason = _failure(exc)
            else:
                outcome, reason = TIMEOUT, f"no first byte within {limit:.1f} s"
            call.failed(attempt, outcome, reason, True, None)
            return None
        except BaseException:
            call.cancel(attempt)
            if response is not None:
                await response.aclose()
            raise
        call.answered(attempt)
        body = _AsyncBody(call, attempt, first, rest, source)
        if resume is not None:
            body.resume, body.again = resume, (self, request, headers)
        return _served(response, host, body)

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self.router.close)
        await self.inner.aclose()

    def __repr__(self) -> str:
        return f"<AsyncDirectTransport {self.router!r}>"


def _on_asyncio() -> bool:
    """Hedges race as asyncio tasks; under another loop (trio) requests are not hedged."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _AsyncBody(httpx2.AsyncByteStream):
    """The host's body (transports._Body, async)."""

    def __init__(
        self, call: Call, attempt: Attempt, first: bytes, rest: AsyncIterator[bytes],
        source: httpx2.AsyncByteStream,
    ) -> None:  # fmt: skip
        self.call, self.attempt, self.first, self.rest = call, attempt, first, rest
        self.source = source
        self.resume: Resumable | None = None
        self.again: tuple[AsyncDirectTransport, httpx2.Request, list[tuple[str, str]]] | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.resume is not None:
            async for piece in self._resumable(self.resume):
                yield piece
            return
        if self.first:
            yield self.first
        try:
            async for chunk in self.rest:
                yield chunk
        except httpx2.TransportError:
            self.call.finish(self.attempt, STREAM_ERROR)
            raise
        self.call.finish(self.attempt, OK)

    async def _resumable(self, resume: Resumable) -> AsyncIterator[bytes]:
        failure = None
        try:
            out = resume.take(self.first)
            if out is not None:
                if out:
                    yield out
                async for piece in self.rest:
                    out = resume.take(piece)
                    if out is None:
                        break  # an error event: held back while it may be replaced
                    if out:
                        yield out
                else:
                    self.call.finish(self.attempt, OK)
                    if tail := resume.held():
                        yield tail
                    return
        except httpx2.TransportError as exc:
            failure = exc
        self.call.finish(self.attempt, STREAM_ERROR)
        await self.source.aclose()
        resume.tried.append(self.attempt.host)
        held = resume.held()  # a half event (never passed on), or the error event
        assert self.again is not None
        transport, request, headers = self.again
        whole = False
        async for spliced in _continue_async(transport, request, headers, self.call, resume):
            if spliced is None:
                whole = True
            else:
                yield spliced
        if whole:
            return
        if failure is not None:
            raise failure
        yield held  # the host's own error event, as it came: the stream ends with it

    async def aclose(self) -> None:
        try:
            await self.source.aclose()
        finally:
            self.call.cancel(self.attempt)


async def _continue_async(
    transport: AsyncDirectTransport, request: httpx2.Request, headers: list[tuple[str, str]],
    call: Call, resume: Resumable,
) -> AsyncIterator[bytes | None]:  # fmt: skip
    """transports._continue_sync, async: yields the spliced events, then None when the stream
    ended whole (an async generator returns no value)."""
    while (found := resume.next()) is not None:
        if isinstance(found, bytes):
            yield found  # the token limit ran out at the break: the stream's end
            yield None
            return
        had, body = found
        response = await transport.open(call.again(resume.tried), *_again(request, headers, body))
        if not isinstance(response, httpx2.Response):
            return
        splice = Splice(had, resume.chat)
        inner = cast(_AsyncBody, response.stream)
        try:
            if response.status_code != 200:
                return  # the host refused the continuation itself: none would do better
            broke = False
            async for piece in inner:
                out = splice.feed(piece)
                resume.kept(out)
                if out:
                    yield out
                if splice.failed:  # the host's error event
                    inner.call.finish(inner.attempt, STREAM_ERROR)
                    broke = True
                    break
            if not broke:
                out, whole = ending(splice, resume)
                if out:
                    yield out
                if whole:
                    yield None
                    return
        except httpx2.TransportError:
            pass  # the continuation broke too: its attempt ended (stream_error); again?
        finally:
            await response.aclose()
        resume.tried.append(inner.attempt.host)
