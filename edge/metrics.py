"""One observation per attempt -> host statistics and Prometheus.

The registry is built per app (never prometheus-client's global one) and labelled children are
cached by label tuple: `labels()` takes a lock and builds a key on every call, which the hot path
should not pay per request. Gauges that mirror live state (in-flight, servers known) are read
from the fleet at scrape time by a collector, so they cost nothing per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.fleet import Fleet, Host

LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
)  # fmt: skip

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Observation:
    """The outcome of one attempt on one host (or of a request no host was tried for)."""

    model: str  # "" when the request never named a known model
    host: Host | None  # None when no host was tried
    route: str
    status: int
    outcome: str  # ok | connect_error | timeout | http_5xx | http_429 | stream_error | edge_error
    duration_s: float
    ttfb_s: float | None = None
    bytes_out: int = 0
    usage: Usage | None = None
    final: bool = True  # the attempt whose answer reached the client


def _code_class(status: int) -> str:
    return f"{status // 100}xx"


class _FleetCollector(Collector):
    """Reads live gauges off the current fleet at scrape time."""

    def __init__(self, fleet: Callable[[], Fleet]) -> None:
        self._fleet = fleet

    def collect(self) -> Iterable[Metric]:
        fleet = self._fleet()
        inflight = GaugeMetricFamily(
            "edge_inflight_requests", "Attempts in flight per server.", labels=["server"]
        )
        known = GaugeMetricFamily(
            "edge_servers_known", "Servers known per model.", labels=["model"]
        )
        seen: set[str] = set()
        for model, hosts in fleet.models.items():
            known.add_metric([model], len(hosts))
            for host in hosts:
                if host.url not in seen:
                    seen.add(host.url)
                    inflight.add_metric([host.url], host.inflight)
        return [inflight, known]


class Metrics:
    """Prometheus families for one worker, fed by `observe`."""

    def __init__(self, fleet: Callable[[], Fleet], version: str = "0.1.0") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "edge_requests", "Requests answered, by model, server, route and status class.",
            ["model", "server", "route", "code"], registry=r,
        )  # fmt: skip
        self.attempts = Counter(
            "edge_upstream_attempts", "Attempts on upstream servers, by outcome.",
            ["model", "server", "outcome"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "edge_request_duration_seconds", "Time from request to last byte sent.",
            ["model", "route"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttfb = Histogram(
            "edge_time_to_first_byte_seconds",
            "Time from request to the upstream's first body byte (first SSE event).",
            ["model", "server"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "edge_tokens", "Tokens read from upstream usage, by model and type.",
            ["model", "type"], registry=r,
        )  # fmt: skip
        Info("edge_build", "Build of the running edge.", registry=r).info({"version": version})
        r.register(_FleetCollector(fleet))
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, family: Any, *labels: str) -> Any:
        key = (id(family), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*labels)
        return child

    def observe(self, obs: Observation) -> None:
        server = ""
        if obs.host is not None:
            server = obs.host.url
            obs.host.stats.record(obs.ttfb_s, obs.outcome != "ok", time.monotonic())
            self._child(self.attempts, obs.model, server, obs.outcome).inc()
        if obs.ttfb_s is not None:
            self._child(self.ttfb, obs.model, server).observe(obs.ttfb_s)
        if not obs.final:
            return
        code = _code_class(obs.status)
        self._child(self.requests, obs.model, server, obs.route, code).inc()
        self._child(self.duration, obs.model, obs.route).observe(obs.duration_s)
        if obs.usage is not None:
            self._child(self.tokens, obs.model, "prompt").inc(obs.usage.prompt_tokens)
            self._child(self.tokens, obs.model, "completion").inc(obs.usage.completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def __repr__(self) -> str:
        return f"<Metrics children={len(self._children)}>"
