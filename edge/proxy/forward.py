"""The upstream call: one connection pool per worker (edge/http/client.py), hop-by-hop headers,
and attempts on other hosts until one answers with a first body byte.

Theory of operation: an attempt is "open" once the upstream sent a non-retryable status and the
first body byte (an SSE stream's first event). Only then is anything sent to the client, so every
failure before that point (refused, reset, timeout, 5xx, 429, a host that sends headers and then
hangs during prefill) can still move to another host. After it, the status is committed and the
relay owns the outcome.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import ssl
import time
from collections.abc import Callable, Sequence

import aiohttp

from edge.config import HealthSettings, ModelTimeouts, OutlierSettings, UpstreamSettings
from edge.errors import Unavailable, UpstreamFailure
from edge.http.client import (
    PoolFull,
    TimedOut,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    render_headers,
)
from edge.http.heads import HOP_BY_HOP
from edge.http.server import Request
from edge.observe.metrics import Metrics, Observation
from edge.proxy.route import ProxyRequest
from edge.routing.balance import Balancer, Decision
from edge.routing.fleet import UP, Host
from edge.routing.health import Health, RetryBudget, candidates, fallback, why

# Set by the edge itself on the upstream request (the body may have been decoded by the server).
_REQUEST_OWNED = frozenset(
    {"host", "content-length", "content-encoding", "x-forwarded-for", "x-forwarded-proto",
     "x-request-id"}
)  # fmt: skip
# Where clients put API keys; not sent upstream when the edge checks keys itself.
_CLIENT_KEYS = frozenset({"authorization", "x-api-key", "x-goog-api-key"})
_DROP_UP = frozenset(n.encode() for n in HOP_BY_HOP | _REQUEST_OWNED)
_DROP_UP_KEYED = _DROP_UP | frozenset(n.encode() for n in _CLIENT_KEYS)

OK_OUTCOME = "ok"


def make_pool(settings: UpstreamSettings) -> UpstreamPool:
    """The worker's proxied-traffic pool: keep-alive per server, DNS through aiodns, cached."""
    context = _ssl_context(settings)
    return UpstreamPool(
        connect_timeout_s=settings.connect_timeout_s,
        keepalive_s=settings.keepalive_s,
        limit_per_origin=settings.max_connections_per_server,
        ssl_context=context if isinstance(context, ssl.SSLContext) else _unverified(),
        resolver=aiohttp.AsyncResolver(),
        pool_timeout_s=settings.pool_timeout_s,
        max_head_bytes=settings.max_head_bytes,
    )


def _unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def make_session(settings: UpstreamSettings) -> aiohttp.ClientSession:
    """The worker's session for the edge's own calls (probes, registries, engine metrics):
    pooled keep-alive per host, DNS cached via aiodns. Proxied requests use `make_pool`."""
    connector = aiohttp.TCPConnector(
        limit=0,
        limit_per_host=settings.max_connections_per_server,
        keepalive_timeout=settings.keepalive_s,
        ttl_dns_cache=60,
        resolver=aiohttp.AsyncResolver(),
        ssl=_ssl_context(settings),
    )
    return aiohttp.ClientSession(
        connector=connector,
        # No total: a generation may stream for minutes. Reads are bounded per gap instead.
        timeout=aiohttp.ClientTimeout(
            total=None,
            connect=settings.connect_timeout_s,
            sock_read=settings.first_byte_timeout_s,
        ),
        auto_decompress=False,  # bytes pass through as the upstream encoded them
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),
        read_bufsize=2**16,
    )


def _ssl_context(settings: UpstreamSettings) -> ssl.SSLContext | bool:
    if not settings.verify_tls:
        return False
    return ssl.create_default_context(cafile=settings.ca_bundle or None)


def upstream_headers(
    request: Request, request_id: str, credentials: list[tuple[str, str]] | None = None
) -> bytes:
    """The header block sent upstream (llhttp refused any CR, LF or line fold in the client's).
    `credentials` None passes the client's key on (passthrough); a list (maybe empty) replaces
    every client key header with it (the edge checked the key itself)."""
    memo = request.fields.memo  # shared by the requests that sent the same fields
    mode = "upstream" if credentials is None else "upstream-keyed"
    kept = memo.get(mode)
    if kept is None:
        kept = memo[mode] = _end_to_end(request, credentials is not None)
    prior = request.headers.get("X-Forwarded-For")
    peer = request.remote
    forwarded = f"{prior}, {peer}" if prior else peer
    # request_id is printable (checked) and the peer an address: nothing here breaks a line.
    block = kept + (
        b"X-Forwarded-For: %b\r\nX-Request-ID: %b\r\n"
        % (forwarded.encode("utf-8", "surrogateescape"), request_id.encode("utf-8", "replace"))
    )
    if credentials:
        block += render_headers(credentials)
    return block


def _end_to_end(request: Request, keyed: bool) -> bytes:
    """The client's fields that go upstream as they came: not hop-by-hop, not the edge's own."""
    drop = _DROP_UP_KEYED if keyed else _DROP_UP
    listed = request.headers.get("Connection")
    if listed:
        drop = drop | {t.strip().lower().encode() for t in listed.split(",")}
    kept = [n + b": " + v + b"\r\n" for n, v in request.raw_headers if n.lower() not in drop]
    kept.append(b"X-Forwarded-Proto: %b\r\n" % request.fields.proto.encode())
    return b"".join(kept)


class RequestIds:
    """A request's id: the client's X-Request-ID when sane, else a fresh one made of a random
    per-process prefix and a counter (os.urandom per request is a system call)."""

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._next = itertools.count(1)

    def __call__(self, request: Request) -> str:
        rid = request.headers.get("X-Request-ID")
        if rid and len(rid) <= 128 and rid.isprintable():
            return rid
        return f"{self._prefix}{next(self._next):012x}"

    def __repr__(self) -> str:
        return f"<RequestIds {self._prefix}>"


class Upstream:
    """An open attempt: the upstream response with its first body chunk already read."""

    __slots__ = ("host", "response", "first", "started", "ttfb_s", "attempt", "leases")

    def __init__(
        self, host: Host, response: UpstreamResponse, first: bytes, started: float
    ) -> None:
        self.host = host
        self.response = response
        self.first = first
        self.started = started
        self.ttfb_s = time.monotonic() - started
        self.attempt = 1  # attempts the request made, this one included (set by `open`)
        self.leases: _Leases | None = None  # released by `Forwarder.done`

    def __repr__(self) -> str:
        return f"<Upstream {self.host.url} status={self.response.status} ttfb={self.ttfb_s:.3f}>"


def _outcome(exc: BaseException) -> tuple[str, str, bool]:
    """(outcome label, client-safe reason, counts against the host) for an upstream error."""
    if isinstance(exc, UpstreamError):
        return exc.outcome, exc.reason, exc.counts
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "connect_error", "connection closed before a response", True
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "connect_error", "TLS certificate not trusted (upstream.ca_bundle?)", True
    if isinstance(exc, aiohttp.ClientSSLError):
        return "connect_error", "TLS handshake failed", True
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect_error", f"connect failed ({exc.os_error.strerror or 'error'})", True
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "timeout", "connect timed out", True
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout", "timed out before the first byte", True
    if isinstance(exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
        return "malformed", "malformed response", True
    return "connect_error", "connection error", True


class Forwarder:
    """Runs attempts for one worker: pick a host, open it, move on when it fails."""

    def __init__(
        self,
        pool: UpstreamPool,
        balancer: Balancer,
        metrics: Metrics,
        settings: UpstreamSettings,
        health: Health | None = None,
    ) -> None:
        self.pool = pool
        # keys/none auth modes: the key each server gets, added per attempt (edge/access/auth.py).
        self.credentials: Callable[[ProxyRequest, Host], list[tuple[str, str]]] | None = None
        self.balancer = balancer
        self.metrics = metrics
        self.settings = settings
        # Failover: the hosts' health (ejection, trials), the retry budget, per-model timeouts.
        self.health = health or Health(HealthSettings(), OutlierSettings())
        s = settings
        self.budget = RetryBudget(s.retry_ratio, s.retry_window_s, s.retry_min_per_s)
        self._tuned: UpstreamSettings | None = None
        self._timeouts: dict[str, _Timeouts] = {}

    async def open(
        self,
        preq: ProxyRequest,
        hosts: Sequence[Host],
        headers: bytes,
        decision: Decision | None = None,
    ) -> Upstream:
        """The first attempt that opens; Unavailable when none does. The caller hands the
        result to `done` in a `finally` (a plain call: a context manager per request costs
        more than everything this method does on the happy path)."""
        tried: list[Host] = []
        reasons: list[str] = []
        # Routing: `decision` sends the first attempt to the pinned or affine host (a pinned
        # request gets no other). An attempt may race a hedge on a second host (`_race`), so
        # leases are held per host: a failed or losing attempt's lease is released at once, the
        # winner's in `done`, and every one on any other path out of here.
        if self.settings is not self._tuned:
            self._tune()
        self.budget.deposit()
        note, trialled = "not tried", None
        spared = False  # the last attempt sent nothing (a full pool): the next is no retry
        leases = _Leases()
        try:
            for _ in range(self.settings.max_attempts):
                # Health: routing sees only routable hosts of the best probe rank; when none is
                # left, one host out of rotation gets an early half-open trial (never past a pin).
                pool = candidates(preq.model, hosts, tried)
                host = self.balancer.pick(pool, tried, decision)
                if host is None and not trialled and not (decision and decision.pinned):
                    host = trialled = fallback(hosts, tried)  # one per request, at most
                if host is None:
                    break
                if tried and not spared and not self.budget.withdraw():
                    note = "not tried: the retry budget is spent"
                    self.metrics.retry_denied(preq.model)
                    break
                tried.append(host)
                leases.take(host)
                hedge = self.balancer.hedge_delay(host, hosts, decision)
                try:
                    if hedge is None or decision is None:
                        up = await self._open(host, preq, headers)
                    else:
                        up = await self._race(
                            host, preq, headers, hosts, tried, decision, leases, hedge
                        )
                except UpstreamFailure as failure:
                    leases.release(host)
                    reasons.append(f"{host.url}: {failure.reason}")
                    # The budget keeps a failing fleet from multiplying its load; an attempt
                    # that found the pool full put no load on anyone, so moving on is free.
                    spared = isinstance(failure.__cause__, PoolFull)
                    continue
                up.attempt = len(tried)
                up.leases = leases
                return up
        except BaseException:
            leases.release_all()
            raise
        leases.release_all()
        failed = _all_failed(preq.model, reasons, [h for h in hosts if h not in tried], note)
        failed.attempts = len(tried)
        raise failed

    @staticmethod
    def done(up: Upstream) -> None:
        """The exchange is over: the connection goes back to the pool (or closes), the leases
        are released."""
        up.response.close()
        if up.leases is not None:
            up.leases.release_all()
            up.leases = None

    async def _race(
        self, host: Host, preq: ProxyRequest, headers: bytes, hosts: Sequence[Host],
        tried: list[Host], decision: Decision, leases: _Leases, delay: float,
    ) -> Upstream:  # fmt: skip
        """Open `host`, hedged (balance.hedge_delay: off by default): when no first byte came
        within `delay` (the host's recent p95), open a second host too: the first to send a
        byte wins and the other is cancelled at once. A failure of `host` itself is raised; a
        failed hedge only adds its reason to the primary's."""
        attempts = {asyncio.create_task(self._open(host, preq, headers)): host}
        winner: Upstream | None = None
        try:
            done, _ = await asyncio.wait(attempts, timeout=delay)
            second = None if done else self.balancer.hedge_host(hosts, tried, decision)
            if second is not None:
                tried.append(second)
                leases.take(second)
                opening = self._open(second, preq, headers)
                attempts[asyncio.create_task(opening)] = second
            winner = await _first_open(attempts, host, leases)
            return winner
        finally:
            for task in attempts:
                if not task.done():
                    task.cancel()  # its _open closes the response; nothing is observed
                elif not task.cancelled() and not task.exception() and task.result() is not winner:
                    task.result().response.close()  # opened too, but lost by a hair
                task.add_done_callback(_retrieve)

    async def _open(self, host: Host, preq: ProxyRequest, headers: bytes) -> Upstream:
        """One attempt on `host`, up to its first body byte; UpstreamFailure when it fails."""
        started = time.monotonic()
        self.health.started(host)  # on a host that is not up, this attempt is its trial
        # Routing sees how long this host keeps an attempt waiting for a first byte
        # (stats.waited): a stalling host is avoided while it stalls, not only after it answered.
        token = host.stats.waiting(started)
        t = self._timeouts.get(preq.model) or self._timeouts[""]
        if self.credentials is not None:
            headers = headers + render_headers(self.credentials(preq, host))
        response: UpstreamResponse | None = None
        try:
            response = await self.pool.post(
                host.url, preq.target, headers, preq.body, t.first_byte_s, t.connect_s
            )
            if t.total_s:
                response.set_deadline(max(0.0, t.total_s - (time.monotonic() - started)))
            status = response.status
            if status >= 500 or status == 429:
                # 502/503/504 say the host is broken; 429 (busy) and 500 (maybe this request)
                # move the request on without counting against the host.
                raise UpstreamFailure(f"HTTP {status}", counts=status in (502, 503, 504))
            if response.buffered:
                first = response.take()  # the body came with the head: no wait
            else:
                response.read_timeout = t.first_byte_s
                try:
                    first = await response.readany()
                except TimedOut:
                    raise TimedOut("timed out before the first byte") from None
            # Past the first byte, a stall is judged by the idle timeout instead.
            response.read_timeout = t.idle_s
        except UpstreamFailure as failure:
            if response is not None:
                response.close()
            self._failed(host, preq, failure.reason, "http_5xx", started, failure.counts)
            raise
        except (UpstreamError, TimeoutError, OSError) as exc:
            if response is not None:
                response.close()
            outcome, reason, counts = _outcome(exc)
            self._failed(host, preq, reason, outcome, started, counts)
            failed = UpstreamFailure(reason, counts=counts)
            if isinstance(exc, PoolFull):
                # Read by `open` (a move off a full pool is no retry). Set by hand as well:
                # mypyc compiles `raise ... from` without its cause.
                failed.__cause__ = exc
                raise failed from exc
            raise failed from None
        except BaseException:
            if response is not None:
                response.close()
            self.health.released(host)  # cancelled (client gone, hedge lost): no verdict
            raise
        finally:
            host.stats.answered(token)
        self.health.succeeded(host)
        return Upstream(host, response, first, started)

    @property
    def stale_retries(self) -> int:
        """Sends on a pooled connection the host had closed, redone on a fresh one."""
        return self.pool.stale_retries

    def _tune(self) -> None:
        """Per-model timeouts and the budget follow `settings`, which SIGHUP replaces whole."""
        s = self.settings
        if s is self._tuned:
            return
        self.budget.configure(s.retry_ratio, s.retry_window_s, s.retry_min_per_s)
        self.pool.pool_timeout_s = s.pool_timeout_s
        self.pool.max_head_bytes = s.max_head_bytes
        self._timeouts = {"": _Timeouts(s, ModelTimeouts())}
        self._timeouts.update((m, _Timeouts(s, t)) for m, t in s.models.items())
        self._tuned = s

    def _failed(
        self, host: Host, preq: ProxyRequest, reason: str, outcome: str, started: float,
        counts: bool,
    ) -> None:  # fmt: skip
        if counts:
            host.failures += 1
            self.health.failed(host)
        else:
            self.health.released(host)
        if reason == "HTTP 429":
            outcome = "http_429"
        self.metrics.observe(
            Observation(
                preq.model, host, preq.route, 0, outcome, time.monotonic() - started,
                final=False,
            )
        )  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"<Forwarder attempts<={self.settings.max_attempts} stale_retries={self.stale_retries}"
            f" {self.budget!r} {self.balancer!r}>"
        )


class _Leases:
    """The in-flight leases of one request's attempts (see `Forwarder.open`). Counted
    directly on the host: a generator context manager per attempt costs more than the count."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: list[Host] = []

    def take(self, host: Host) -> None:
        host.inflight += 1
        host.requests += 1
        self._held.append(host)

    def release(self, host: Host) -> None:
        if host in self._held:
            self._held.remove(host)
            host.inflight -= 1

    def release_all(self) -> None:
        while self._held:
            self._held.pop().inflight -= 1

    def __repr__(self) -> str:
        return f"<Leases held={len(self._held)}>"


async def _first_open(
    attempts: dict[asyncio.Task[Upstream], Host], primary: Host, leases: _Leases
) -> Upstream:
    """The first of racing attempts to open; losers' leases are released. When all fail, the
    primary's failure is raised, naming the hedge's too."""
    pending = set(attempts)
    reasons: dict[Host, str] = {}
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            failure = task.exception()
            if failure is None:
                for other, other_host in attempts.items():
                    if other is not task:
                        leases.release(other_host)  # cancelled or closed by the caller
                return task.result()
            if not isinstance(failure, UpstreamFailure):
                raise failure
            leases.release(attempts[task])
            reasons[attempts[task]] = failure.reason
    hedges = "".join(f"; hedge {h.url}: {r}" for h, r in reasons.items() if h is not primary)
    raise UpstreamFailure(reasons.get(primary, "no answer") + hedges)


def _retrieve(task: asyncio.Task[Upstream]) -> None:
    """Mark a racing attempt's outcome as seen (a loser's failure is not worth a log line)."""
    if not task.cancelled():
        task.exception()


class _Timeouts:
    __slots__ = ("connect_s", "first_byte_s", "idle_s", "total_s")

    def __init__(self, s: UpstreamSettings, m: ModelTimeouts) -> None:
        """0 in the model's settings inherits [upstream]'s."""
        self.connect_s = m.connect_timeout_s or s.connect_timeout_s
        self.first_byte_s = m.first_byte_timeout_s or s.first_byte_timeout_s
        self.idle_s = m.idle_timeout_s or s.idle_timeout_s
        self.total_s = m.total_timeout_s or s.total_timeout_s
        if self.total_s:
            self.first_byte_s = min(self.first_byte_s, self.total_s)

    def __repr__(self) -> str:
        return f"<Timeouts first_byte={self.first_byte_s} idle={self.idle_s}>"


def _all_failed(model: str, reasons: list[str], untried: list[Host], note: str) -> Unavailable:
    """503 naming every server: why each tried one failed, why the others were not tried."""
    lines = reasons + [f"{h.url}: {note if h.state == UP else why(h)}" for h in untried]
    if not lines:
        return Unavailable(f"No server is available for model '{model}'.")
    text = "\n".join(f"- {line}" for line in lines)
    return Unavailable(f"All servers failed for this model '{model}':\n{text}")
