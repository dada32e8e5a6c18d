"""The worker's connections to the hosts: the pool proxied requests go through (edge/http/client.py)
and the aiohttp session of the edge's own calls (probes, registries, engine metrics)."""

from __future__ import annotations

import ssl

import aiohttp

from edge.config import UpstreamSettings
from edge.http.client import UpstreamPool


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
