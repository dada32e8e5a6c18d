"""The upstream call: one ClientSession per worker, hop-by-hop headers, and attempts on other
hosts until one answers with a first body byte.

Theory of operation: an attempt is "open" once the upstream sent a non-retryable status and the
first body byte (an SSE stream's first event). Only then is anything sent to the client, so every
failure before that point (refused, reset, timeout, 5xx, 429, a host that sends headers and then
hangs during prefill) can still move to another host. After it, the status is committed and the
relay owns the outcome.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from edge.balance import Balancer
from edge.config import UpstreamSettings
from edge.errors import Unavailable, UpstreamFailure
from edge.fleet import Host
from edge.metrics import Metrics, Observation
from edge.route import ProxyRequest

# RFC 9110 7.6.1 connection-specific fields, plus those that describe one hop's framing.
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
        "upgrade", "proxy-authorization", "proxy-authenticate",
    }
)  # fmt: skip
# Set by the edge itself on the upstream request (the body may have been decoded by the server).
_REQUEST_OWNED = frozenset(
    {"host", "content-length", "content-encoding", "x-forwarded-for", "x-forwarded-proto",
     "x-request-id"}
)  # fmt: skip
_RESPONSE_OWNED = frozenset({"content-length"})

OK_OUTCOME = "ok"


def make_session(settings: UpstreamSettings) -> aiohttp.ClientSession:
    """The worker's one upstream session: pooled keep-alive per host, DNS cached via aiodns."""
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


def connection_tokens(headers: Any) -> frozenset[str]:
    """Header names the Connection field lists: hop-by-hop for this message only."""
    value = headers.get("Connection")
    if not value:
        return HOP_BY_HOP
    return HOP_BY_HOP | {t.strip().lower() for t in value.split(",")}


def upstream_headers(request: web.BaseRequest, request_id: str) -> list[tuple[str, str]]:
    headers = request.headers
    drop = connection_tokens(headers)
    out = [
        (k, v) for k, v in headers.items() if (lk := k.lower()) not in drop
        and lk not in _REQUEST_OWNED
    ]  # fmt: skip
    peer = request.remote or ""
    prior = headers.get("X-Forwarded-For")
    out.append(("X-Forwarded-For", f"{prior}, {peer}" if prior else peer))
    out.append(("X-Forwarded-Proto", request.scheme))
    out.append(("X-Request-ID", request_id))
    return out


def client_headers(upstream: aiohttp.ClientResponse) -> CIMultiDict[str]:
    headers = upstream.headers
    drop = connection_tokens(headers)
    return CIMultiDict(
        (k, v) for k, v in headers.items() if (lk := k.lower()) not in drop
        and lk not in _RESPONSE_OWNED
    )  # fmt: skip


def request_id(request: web.BaseRequest) -> str:
    rid = request.headers.get("X-Request-ID")
    if rid and len(rid) <= 128 and rid.isprintable():
        return rid
    return os.urandom(12).hex()


class Upstream:
    """An open attempt: the upstream response with its first body chunk already read."""

    __slots__ = ("host", "response", "first", "started", "ttfb_s")

    def __init__(
        self, host: Host, response: aiohttp.ClientResponse, first: bytes, started: float
    ) -> None:
        self.host = host
        self.response = response
        self.first = first
        self.started = started
        self.ttfb_s = time.monotonic() - started

    def __repr__(self) -> str:
        return f"<Upstream {self.host.url} status={self.response.status} ttfb={self.ttfb_s:.3f}>"


def _outcome(exc: BaseException) -> tuple[str, str, bool]:
    """(outcome label, client-safe reason, counts against the host) for an upstream error."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "connect_error", "connection closed before a response", True
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect_error", f"connect failed ({exc.os_error.strerror or 'error'})", True
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout", "timed out before the first byte", True
    if isinstance(exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
        return "malformed", "malformed response", True
    return "connect_error", "connection error", True


class Forwarder:
    """Runs attempts for one worker: pick a host, open it, move on when it fails."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        balancer: Balancer,
        metrics: Metrics,
        settings: UpstreamSettings,
    ) -> None:
        self.session = session
        self.balancer = balancer
        self.metrics = metrics
        self.settings = settings

    @asynccontextmanager
    async def exchange(
        self, preq: ProxyRequest, hosts: Sequence[Host], headers: list[tuple[str, str]]
    ) -> AsyncIterator[Upstream]:
        """Yield the first attempt that opens; raise Unavailable when none does."""
        tried: list[Host] = []
        reasons: list[str] = []
        for _ in range(self.settings.max_attempts):
            host = self.balancer.pick(hosts, tried)
            if host is None:
                break
            tried.append(host)
            with host.lease():
                try:
                    up = await self._open(host, preq, headers)
                except UpstreamFailure as failure:
                    reasons.append(f"{host.url}: {failure.reason}")
                    continue
                try:
                    yield up
                finally:
                    up.response.close()
                return
        raise _all_failed(preq.model, reasons)

    async def _open(
        self, host: Host, preq: ProxyRequest, headers: list[tuple[str, str]]
    ) -> Upstream:
        started = time.monotonic()
        try:
            return await self._attempt(host, preq, headers, started)
        except UpstreamFailure as failure:
            self._failed(host, preq, failure.reason, "http_5xx", started, failure.counts)
            raise
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            outcome, reason, counts = _outcome(exc)
            self._failed(host, preq, reason, outcome, started, counts)
            raise UpstreamFailure(reason, counts=counts) from None

    async def _attempt(
        self, host: Host, preq: ProxyRequest, headers: list[tuple[str, str]], started: float
    ) -> Upstream:
        url = URL(host.url + preq.target, encoded=True)
        response = await self.session.post(
            url, data=preq.body, headers=headers, allow_redirects=False
        )
        try:
            status = response.status
            if status >= 500 or status == 429:
                raise UpstreamFailure(f"HTTP {status}", counts=status != 429)
            first = await response.content.readany()
            connection = response.connection
            if connection is not None and connection.protocol is not None:
                # Past the first byte, a stall is judged by the idle timeout instead.
                connection.protocol.read_timeout = self.settings.idle_timeout_s
            return Upstream(host, response, first, started)
        except BaseException:
            response.close()
            raise

    def _failed(
        self, host: Host, preq: ProxyRequest, reason: str, outcome: str, started: float,
        counts: bool,
    ) -> None:  # fmt: skip
        if counts:
            host.failures += 1
        if reason == "HTTP 429":
            outcome = "http_429"
        self.metrics.observe(
            Observation(
                preq.model, host, preq.route, 0, outcome, time.monotonic() - started,
                final=False,
            )
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"<Forwarder attempts<={self.settings.max_attempts} {self.balancer!r}>"


def _all_failed(model: str, reasons: list[str]) -> Unavailable:
    if not reasons:
        return Unavailable(f"No server is available for model '{model}'.")
    lines = "\n".join(f"- {r}" for r in reasons)
    return Unavailable(f"All servers failed for this model '{model}':\n{lines}")
