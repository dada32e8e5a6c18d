"""httpx2 transports that send each request straight to a host of its model, routed as the edge
routes it (edge/direct/router.py), for the official SDKs' clients:

    client = OpenAI(base_url="http://direct/v1", api_key=KEY,
                    http_client=httpx2.Client(transport=edge.direct.transport(sources=[...])))

The base URL's host is ignored: the path, query, body and headers (the key included) go to the
host routing names. Attempts move on before the first byte, as through the edge: a connect
error, a timeout, a 5xx or a 429 (its Retry-After holds the host) fails the attempt and the plan
names the next host, paid from the retry budget. From the first byte the response is the host's;
its stream's end (whole or broken) is the attempt's outcome, read into health and statistics.
When every host failed, the answer is a 503 in the request's dialect naming each server and why,
with `x-should-retry: false` (the SDKs would retry it otherwise: the hosts were all tried).

First-byte deadline: while another host could take the request, an attempt waits for its host's
recent form (stats.first_byte_deadline), else upstream.first_byte_timeout_s, for the head and the
first body byte together, as the async transport. httpcore reads a body with one read timeout
fixed at its first read (upstream.idle_timeout_s; upstream.stall_timeout_s for a stream that can
be continued: edge/direct/resume.py), so the first body byte is read in the caller's thread
under a watchdog (`_Watchdog`: one thread per transport) that shuts the socket at the deadline.

Hedging (`hedging=True`): when the balancer gives a hedge delay for the host (its p95, with
enough samples), the attempt runs in a worker thread (a pool owned by the transport) while the
caller waits up to the delay; then a second host's attempt (Plan.hedge, paid from the hedge
budget) races it in another thread. The first first byte wins; the loser's socket is shut (its
read wakes at once) and its attempt cancelled, as the async transport's lost task. Without a
hedge delay no worker thread is used.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import socket
import ssl
import threading
import time
from collections.abc import Generator, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, cast
from urllib.parse import urlsplit

import httpx2

from edge.dialects import dialect_of
from edge.dialects.errors import error_body
from edge.direct.resume import Resumable, ending
from edge.direct.router import SERVED_HEADER, Call, Router, forward_headers
from edge.direct.settings import DirectSettings, settings_from
from edge.errors import EdgeError, Unavailable
from edge.proxy.splice import Splice
from edge.routing.attempt import (
    CONNECT_ERROR,
    HTTP_5XX,
    HTTP_429,
    OK,
    STREAM_ERROR,
    TIMEOUT,
    Attempt,
)
from edge.routing.fleet import Host


def transport(**settings: Any) -> DirectTransport:
    """A sync transport for httpx2.Client (OpenAI, Anthropic): see edge/direct/settings.py."""
    return DirectTransport(settings_from(**settings))


def _verify(settings: DirectSettings) -> ssl.SSLContext | bool:
    u = settings.config.upstream
    if u.ca_bundle:
        return ssl.create_default_context(cafile=u.ca_bundle)
    return u.verify_tls


def _limits(settings: DirectSettings) -> httpx2.Limits:
    u = settings.config.upstream
    return httpx2.Limits(
        max_connections=u.max_connections_per_server, keepalive_expiry=u.keepalive_s
    )


def error_response(err: EdgeError, dialect: str) -> httpx2.Response:
    """An EdgeError in the dialect's error shape; `x-should-retry: false`: routing has retried
    what it could (the SDKs read the field). A stream, so that a client may stream it too."""
    body = error_body(err, dialect)
    headers = {
        "content-type": "application/json", "content-length": str(len(body)),
        "x-should-retry": "false", **err.headers,
    }  # fmt: skip
    return httpx2.Response(err.status, headers=headers, stream=httpx2.ByteStream(body))


def _timeouts(call: Call, limit: float) -> dict[str, float | None]:
    u = call.router.config.upstream
    connect = min(u.connect_timeout_s, limit)
    return {"connect": connect, "read": limit, "write": limit, "pool": u.pool_timeout_s}


def _failure(exc: httpx2.TransportError) -> tuple[str, str]:
    """(outcome, client-safe reason) for a transport error before the first byte."""
    if isinstance(exc, httpx2.ConnectTimeout):
        return TIMEOUT, "connect timed out"
    if isinstance(exc, httpx2.TimeoutException):
        return TIMEOUT, "timed out before the first byte"
    if isinstance(exc, httpx2.ConnectError):
        return CONNECT_ERROR, "connect failed"
    if isinstance(exc, httpx2.RemoteProtocolError):
        return CONNECT_ERROR, "connection closed before a response"
    return CONNECT_ERROR, "connection error"


def _refused(call: Call, attempt: Attempt, response: httpx2.Response) -> bool:
    """A 5xx or 429 fails the attempt (the request moves on); True when it did."""
    status = response.status_code
    if status < 500 and status != 429:
        return False
    outcome = HTTP_429 if status == 429 else HTTP_5XX
    blame = status in (502, 503, 504)  # broken; 429 is busy, 500 maybe this request
    call.failed(attempt, outcome, f"HTTP {status}", blame, response.headers.get("retry-after"))
    return True


def _served(response: httpx2.Response, host: Host, stream: Any) -> httpx2.Response:
    """The host's response, its body read through `stream`, naming the host (as the edge)."""
    response.headers[SERVED_HEADER] = host.url
    response.stream = stream
    return response


@functools.lru_cache(maxsize=4096)
def _netloc(url: str) -> str:
    return urlsplit(url).netloc


@functools.lru_cache(maxsize=4096)
def _url(host: str, target: str) -> httpx2.URL:
    """A host's URL for a target, parsed once (targets repeat: a parse costs ~15 us)."""
    return httpx2.URL(host + target)


def _outbound(
    request: httpx2.Request, call: Call, host: Host, headers: list[tuple[str, str]],
    timeouts: dict[str, float | None],
) -> httpx2.Request:  # fmt: skip
    """The request for `host`: its URL, the client's fields (Content-Length included) and the
    body's stream as they are (read once, replayed on a retry), no re-encoding."""
    fields = [("Host", _netloc(host.url)), *headers]
    return httpx2.Request(
        request.method, _url(host.url, call.target), headers=fields, stream=request.stream,
        extensions={"timeout": timeouts},
    )  # fmt: skip


class DirectTransport(httpx2.BaseTransport):
    """Sync: routing runs in the calling thread (any number of them), under the router's lock."""

    def __init__(self, settings: DirectSettings, inner: httpx2.BaseTransport | None = None):
        self.router = Router(settings)
        self.inner = inner or httpx2.HTTPTransport(
            verify=_verify(settings), limits=_limits(settings), trust_env=False
        )
        u = settings.config.upstream
        routing = settings.config.routing
        # Off ([routing] hedging and every model's): no hedge look-up per request.
        self.hedging = routing.hedging or any(m.hedging for m in routing.models.values())
        # An attempt whose first-byte deadline is shorter than this has its first body byte
        # watched (httpcore would wait for it as long as for any later one).
        self.body_timeout = min(u.idle_timeout_s, u.first_byte_timeout_s)
        self._watchdog = _Watchdog()
        # One thread per attempt in flight there, each holding at most one connection: more
        # threads than the pool's connections would only wait for one. Threads start on use.
        self._pool = ThreadPoolExecutor(
            max_workers=u.max_connections_per_server, thread_name_prefix="edge-direct-attempt"
        )

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.raw_path.decode("ascii")
        dialect = dialect_of(path)
        body = request.read()
        try:
            call = self.router.call(path, request.headers, body)
        except EdgeError as err:
            return error_response(err, dialect)
        headers = forward_headers(request.headers.multi_items())
        found = self.open(call, request, headers)
        return found if isinstance(found, httpx2.Response) else error_response(found, dialect)

    def open(
        self, call: Call, request: httpx2.Request, headers: list[tuple[str, str]]
    ) -> httpx2.Response | Unavailable:
        """The first attempt of `call` that answers; the 503 when none does."""
        while True:
            host = call.next()
            if host is None:
                wait = call.wait()
                if wait is None:
                    return call.unavailable()
                time.sleep(wait)
                continue
            delay = call.hedge_delay(host) if self.hedging else None
            started = call.start(host)
            if delay is None:
                found = self._attempt(call, host, request, headers, started)
            else:
                found = self._race(call, host, request, headers, started, delay)
            if found is not None:
                return found

    def _attempt(
        self, call: Call, host: Host, request: httpx2.Request, headers: list[tuple[str, str]],
        started: tuple[Attempt, float], slot: _Slot | None = None,
    ) -> httpx2.Response | None:  # fmt: skip
        """`host`'s attempt up to its first body byte: its response, or None when it failed
        (the plan has its reason). In a worker thread (`slot`), the caller may give up on it
        first: whoever claims the slot first ends the attempt."""
        attempt, limit = started
        timeouts = _timeouts(call, limit)
        out = _outbound(request, call, host, headers, timeouts)
        until = time.monotonic() + limit if limit < self.body_timeout else None
        response: httpx2.Response | None = None
        watch: _Watch | None = None
        try:
            response = self.inner.handle_request(out)
            if slot is not None:
                slot.opened(response)
            status = response.status_code
            if status >= 500 or status == 429:
                response.close()
                if _mine(slot):
                    _refused(call, attempt, response)
                return None
            resume = _resumable(call, response, timeouts)
            source = cast(httpx2.SyncByteStream, response.stream)
            rest = iter(source)
            if until is not None:
                watch = self._watchdog.watch(until, response)
            first = next(rest, b"")
            if watch is not None and self._watchdog.end(watch):
                raise httpx2.ReadTimeout("no first byte within the deadline")
        except httpx2.TransportError as exc:
            late = watch is not None and self._watchdog.end(watch)
            if response is not None:
                response.close()
            if _mine(slot):
                outcome, reason = _failure(exc)
                if late:
                    outcome, reason = TIMEOUT, f"no first byte within {limit:.1f} s"
                call.failed(attempt, outcome, reason, True, None)
            return None
        except BaseException:
            if watch is not None:
                self._watchdog.end(watch)
            if response is not None:
                response.close()
            if _mine(slot):
                call.cancel(attempt)
            raise
        if not _mine(slot):
            response.close()  # the caller gave up on it (and ended the attempt)
            return None
        call.answered(attempt)
        body = _Body(call, attempt, first, rest, source)
        if resume is not None:
            body.resume, body.again = resume, (self, request, headers)
        return _served(response, host, body)

    def _race(
        self, call: Call, host: Host, request: httpx2.Request, headers: list[tuple[str, str]],
        started: tuple[Attempt, float], delay: float,
    ) -> httpx2.Response | None:  # fmt: skip
        """`host`'s attempt hedged as the edge hedges ([routing] hedging), in a worker thread:
        no first byte within `delay` (its recent p95), a second host (the plan's, paid from the
        hedge budget) races it in another thread. The first to open wins; the other is
        cancelled (no verdict), its connection shut. Each waits up to its own deadline."""
        racing = [self._start(call, host, request, headers, started)]
        winner: httpx2.Response | None = None
        try:
            if not wait([racing[0].future], timeout=delay).done:
                second = call.hedge()
                if second is not None:
                    again = call.start(second)
                    racing.append(self._start(call, second, request, headers, again))
            winner = _first(call, racing)
            return winner
        finally:
            for running in racing:
                running.lost(call, winner)

    def _start(
        self, call: Call, host: Host, request: httpx2.Request, headers: list[tuple[str, str]],
        started: tuple[Attempt, float],
    ) -> _Running:  # fmt: skip
        slot = _Slot(started[0], started[1])
        future = self._pool.submit(self._attempt, call, host, request, headers, started, slot)
        return _Running(slot, future)

    def close(self) -> None:
        self.router.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._watchdog.close()
        self.inner.close()

    def __repr__(self) -> str:
        return f"<DirectTransport {self.router!r}>"


class _Slot:
    """An attempt run in a worker thread: the worker (done) or the caller (giving up: a lost
    race, a deadline passed) claims it, once; the one that does ends the attempt."""

    __slots__ = ("attempt", "until", "limit", "claimed", "response", "lock")

    def __init__(self, attempt: Attempt, limit: float) -> None:
        self.attempt, self.limit = attempt, limit
        self.until = time.monotonic() + limit
        self.claimed = False
        self.response: httpx2.Response | None = None
        self.lock = threading.Lock()

    def claim(self) -> bool:
        with self.lock:
            if self.claimed:
                return False
            self.claimed = True
            return True

    def opened(self, response: httpx2.Response) -> None:
        """The head came: a caller giving up from now shuts its socket (waking the read)."""
        with self.lock:
            self.response = response
            gone = self.claimed
        if gone:
            _shut(response)

    def give_up(self) -> bool:
        """Claim it for the caller and wake the worker's read; False: the worker was first."""
        if not self.claim():
            return False
        with self.lock:
            response = self.response
        if response is not None:
            _shut(response)
        return True


def _mine(slot: _Slot | None) -> bool:
    return slot is None or slot.claim()


def _shut(response: httpx2.Response) -> None:
    """Shut a response's socket down from another thread: its blocked read returns at once
    (closing the socket would not wake it); the worker then closes the response itself."""
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class _Watch:
    """One attempt's first body byte, watched: `fired` when its deadline passed first."""

    __slots__ = ("response", "done", "fired")

    def __init__(self, response: httpx2.Response) -> None:
        self.response: httpx2.Response | None = response  # dropped at the end: the heap keeps
        self.done = self.fired = False  # an ended watch until its deadline


class _Watchdog:
    """Bounds first body bytes read in the callers' own threads: one daemon thread, started on
    first use, shuts the socket of a read past its deadline (its read wakes at once, failing).
    A watch costs the caller a heap push and a pop-free end under one lock (~1 us); the thread
    sleeps until the earliest deadline. Ended watches leave the heap at their deadline."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Watch]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, until: float, response: httpx2.Response) -> _Watch:
        watch = _Watch(response)
        with self._cond:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._run, name="edge-direct-watchdog", daemon=True
                )
                self._thread.start()
            earliest = not self._heap or until < self._heap[0][0]
            heapq.heappush(self._heap, (until, next(self._seq), watch))
            if earliest:
                self._cond.notify()
        return watch

    def end(self, watch: _Watch) -> bool:
        """The first byte came (or the read failed): True when the deadline had passed first."""
        with self._cond:
            watch.done, watch.response = True, None
            return watch.fired

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    watch = heapq.heappop(self._heap)[2]
                    if not watch.done and watch.response is not None:
                        watch.fired = True
                        _shut(watch.response)
                self._cond.wait(self._heap[0][0] - now if self._heap else None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()


class _Running:
    """One attempt in a worker thread: its slot and its future."""

    __slots__ = ("slot", "future")

    def __init__(self, slot: _Slot, future: Future[httpx2.Response | None]) -> None:
        self.slot, self.future = slot, future

    def lost(self, call: Call, winner: httpx2.Response | None) -> None:
        """End this attempt if it did not win: cancelled (no verdict) or, opened by a hair
        after the winner, its response closed."""
        if self.slot.give_up():
            call.cancel(self.slot.attempt)
            return
        with contextlib.suppress(Exception):
            found = self.future.result()  # the worker claimed it: it is returning now
            if found is not None and found is not winner:
                found.close()


def _first(call: Call, racing: list[_Running]) -> httpx2.Response | None:
    """The first response among `racing`, each waited for up to its first-byte deadline (then
    failed: timeout, and its read woken); None when all failed. Raises what a worker raised
    (not a transport error: that failed its attempt) when none answered."""
    pending, raised = list(racing), None
    while pending:
        now = time.monotonic()
        for running in [r for r in pending if r.slot.until <= now and not r.future.done()]:
            slot = running.slot
            if slot.give_up():
                reason = f"no first byte within {slot.limit:.1f} s"
                call.failed(slot.attempt, TIMEOUT, reason, True, None)
                pending.remove(running)
            else:
                slot.until = float("inf")  # the worker ended it: its future is being set
        futures = [r.future for r in pending]
        timeout = max(0.0, min(r.slot.until for r in pending) - now) if pending else 0.0
        done = wait(futures, timeout=timeout, return_when=FIRST_COMPLETED).done
        for running in [r for r in pending if r.future in done]:
            pending.remove(running)
            exc = running.future.exception()
            if exc is not None:
                raised = raised or exc
                continue
            found = running.future.result()
            if found is not None:
                return found
    if raised is not None:
        raise raised
    return None


class _Body(httpx2.SyncByteStream):
    """The host's body: the first chunk read already, then the rest; its end ends the attempt.
    A continuable stream (`resume`) goes on from another host when it breaks."""

    def __init__(
        self, call: Call, attempt: Attempt, first: bytes, rest: Iterator[bytes],
        source: httpx2.SyncByteStream,
    ) -> None:  # fmt: skip
        self.call, self.attempt, self.first, self.rest = call, attempt, first, rest
        # The host's own stream: closing it returns the connection to the pool (the response
        # it came in now reads through this object, so closing that would come back here).
        self.source = source
        self.resume: Resumable | None = None
        # A continuable stream's way to continue: the transport, the request, its fields.
        self.again: tuple[DirectTransport, httpx2.Request, list[tuple[str, str]]] | None = None

    def __iter__(self) -> Iterator[bytes]:
        if self.resume is not None:
            yield from self._resumable(self.resume)
            return
        if self.first:
            yield self.first
        try:
            yield from self.rest
        except httpx2.TransportError:
            self.call.finish(self.attempt, STREAM_ERROR)
            raise
        self.call.finish(self.attempt, OK)

    def _resumable(self, resume: Resumable) -> Iterator[bytes]:
        failure = None
        try:
            for piece in itertools.chain((self.first,), self.rest):
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
        self.source.close()
        resume.tried.append(self.attempt.host)
        held = resume.held()  # a half event (never passed on), or the error event
        assert self.again is not None
        if (yield from _continue_sync(*self.again, self.call, resume)):
            return
        if failure is not None:
            raise failure
        yield held  # the host's own error event, as it came: the stream ends with it

    def close(self) -> None:
        try:
            self.source.close()
        finally:
            self.call.cancel(self.attempt)  # the client left before the end: no verdict


def _resumable(
    call: Call, response: httpx2.Response, timeouts: dict[str, float | None]
) -> Resumable | None:
    """A 200 stream that can be continued (`call.resumable`) and its read timeout: a silence
    past upstream.stall_timeout_s is a break there, else upstream.idle_timeout_s. Set before the
    body's first read: httpcore reads a body with the timeout it finds then."""
    u = call.router.config.upstream
    resume = call.resumable(response.headers) if response.status_code == 200 else None
    timeouts["read"] = u.stall_timeout_s if resume is not None else u.idle_timeout_s
    return resume


def _again(
    request: httpx2.Request, headers: list[tuple[str, str]], body: bytes
) -> tuple[httpx2.Request, list[tuple[str, str]]]:
    """The continuation's request (its new body) and its header fields."""
    fields = [(k, v) for k, v in headers if k.lower() != "content-length"]
    fields.append(("Content-Length", str(len(body))))
    return httpx2.Request("POST", request.url, headers=fields, content=body), fields


def _continue_sync(
    transport: DirectTransport, request: httpx2.Request, headers: list[tuple[str, str]],
    call: Call, resume: Resumable,
) -> Generator[bytes, None, bool]:  # fmt: skip
    """Continue a broken stream on other hosts (edge/direct/resume.py): yields the spliced
    events; True when the stream ended whole."""
    while (found := resume.next()) is not None:
        if isinstance(found, bytes):
            yield found  # the token limit ran out at the break: the stream's end
            return True
        had, body = found
        again = call.again(resume.tried)
        response = transport.open(again, *_again(request, headers, body))
        if not isinstance(response, httpx2.Response):
            return False
        splice = Splice(had, resume.chat)
        inner = cast(_Body, response.stream)
        try:
            if response.status_code != 200:
                return False  # the host refused the continuation itself: none would do better
            for piece in inner:
                out = splice.feed(piece)
                resume.kept(out)
                if out:
                    yield out
                if splice.failed:  # the host's error event
                    inner.call.finish(inner.attempt, STREAM_ERROR)
                    break
            else:
                out, whole = ending(splice, resume)
                if out:
                    yield out
                if whole:
                    return True
        except httpx2.TransportError:
            pass  # the continuation broke too: its attempt ended (stream_error); again?
        finally:
            response.close()
        resume.tried.append(inner.attempt.host)
    return False
