"""One observation per attempt -> host statistics and Prometheus.

Theory of operation. Each attempt on a host is observed once (`Metrics.observe`); the same call
feeds the host's routing statistics and the Prometheus families. The hot path pays one dict
lookup per request: everything about the requests that share (model, route, server, status
class) accumulates in one `_Requests` bundle of plain numbers, updated without locks because
everything of one worker runs on one event loop; each family, with its own labels, is projected
from the bundles at scrape time. prometheus-client's metric objects take a lock per
`inc`/`observe` and cost several times more (loadtests/metrics_cost.py measures both), so they
are used only at scrape time, for the text format. Label names are in alphabetical order, as
Prometheus stores them, and every label value is bounded: models and servers the fleet names,
or the fixed sets below; a model name the edge does not serve is never a label.

Gauges that mirror live state (in-flight, health, routing score, servers known) are read from
the fleet at scrape time and cost nothing per request.

With `--workers N` each worker writes all of its samples (its own and any family another module
registered in `registry`) to `shared_dir` every `share_interval_s`, and again each time it answers
a scrape, and `/metrics` on any worker merges them (edge/observe/metricshare.py). Writing before
answering keeps every total monotonic whichever worker the next scrape reaches. Routing statistics
stay per worker: nothing read back from these files ever reaches the balancer.
"""

from __future__ import annotations

import asyncio
import sys
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from edge.config import MetricsSettings
from edge.observe.metricshare import Shared
from edge.routing.fleet import Fleet, Host

# Not Final, though read per request: compiled, a Final tuple of floats read inside a
# method raised "value for final name was not set" (mypyc 2.0).
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
)  # fmt: skip
# The edge's own time per request is sub-millisecond when all is well.
OVERHEAD_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
RATE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 200.0, 500.0)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNKNOWN_MODEL = "(unknown)"  # a request that named no model the edge serves
NO_SERVER: Final = "(none)"  # a request answered by the edge itself (no host answered)
AFFINITY_RESULTS: Final = frozenset({"cookie_hit", "key_hit", "moved", "none"})
# Without a health module wired in, a host counts as down after this many failed attempts in a
# row (the host's own routing statistics count them) and up again after one success.
DOWN_AFTER = 3
_CODES: Final = tuple(f"{i}xx" for i in range(10))


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


# Not frozen: a frozen dataclass sets each field through object.__setattr__, which with this many
# fields costs ~4 us per request instead of ~1 us; nobody mutates an observation after building it.
@dataclass(slots=True)
class Observation:
    """The outcome of one attempt on one host (or of a request no host was tried for).

    Non-final observations are failed attempts, built by the forwarder; the final one is built
    by the handler when the request is answered and carries the request-wide fields.
    """

    model: str  # "" when the request never named a known model
    host: Host | None  # None when no host was tried
    route: str
    status: int
    outcome: str  # ok | connect_error | timeout | http_5xx | http_429 | stream_error | malformed
    #               | edge_error | client_disconnect | pool_full
    duration_s: float  # final: request start to last byte; else the attempt's own time
    ttfb_s: float | None = None  # the attempt's time to first body byte (routing uses it)
    bytes_out: int = 0
    usage: Usage | None = None
    final: bool = True  # the attempt whose answer reached the client
    attempt: int = 1  # final: attempts the request made (0 when none); unused on the others
    bytes_in: int = 0  # request body bytes
    stream: bool = False  # the client asked for a stream
    first_byte_s: float | None = None  # request start to first body byte sent to the client
    stream_s: float | None = None  # the upstream's first body byte to its last
    upstream_s: float = 0.0  # time spent waiting on upstreams (attempts and relayed body)
    affinity: str = "none"  # cookie_hit | key_hit | moved | none


class _Counter:
    """A counter family: label tuple -> value."""

    __slots__ = ("name", "doc", "labels", "values")

    def __init__(self, name: str, doc: str, labels: tuple[str, ...]) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, key: tuple[str, ...], amount: float = 1.0) -> None:
        values = self.values
        values[key] = values.get(key, 0.0) + amount

    def family(self, zeros: Iterable[tuple[str, ...]] = ()) -> Metric:
        """The family, with a zero sample for each key in `zeros` not yet counted: a series that
        exists from the start makes `rate()` see its first increase."""
        fam = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for key in zeros:
            if key not in self.values:
                fam.add_metric(key, 0.0)
        for key, value in self.values.items():
            fam.add_metric(key, value)
        return fam

    def __repr__(self) -> str:
        return f"<Counter {self.name} series={len(self.values)}>"


class _Histogram:
    """A histogram family: label tuple -> [count per bucket..., count above the last, sum]."""

    __slots__ = ("name", "doc", "labels", "bounds", "_les", "values")

    def __init__(
        self, name: str, doc: str, labels: tuple[str, ...], bounds: tuple[float, ...]
    ) -> None:
        self.name, self.doc, self.labels, self.bounds = name, doc, labels, bounds
        self._les = [_le(b) for b in bounds] + ["+Inf"]
        self.values: dict[tuple[str, ...], list[float]] = {}

    def observe(self, key: tuple[str, ...], value: float) -> None:
        cells = self.values.get(key)
        if cells is None:
            cells = self.values[key] = _cells(self.bounds)
        _put(cells, self.bounds, value)

    def add(self, key: tuple[str, ...], cells: list[float]) -> None:
        """Add the counts of another series (scrape time); a series that counted nothing is
        left out rather than exported as an all-zero histogram."""
        if not any(cells[:-1]):
            return
        mine = self.values.get(key)
        if mine is None:
            self.values[key] = list(cells)
        else:
            self.values[key] = [a + b for a, b in zip(mine, cells, strict=True)]

    def family(self) -> Metric:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for key, cells in self.values.items():
            running = 0.0
            buckets = []
            for le, count in zip(self._les, cells, strict=False):
                running += count
                buckets.append((le, running))
            fam.add_metric(key, buckets, cells[-1])
        return fam

    def __repr__(self) -> str:
        return f"<Histogram {self.name} series={len(self.values)}>"


def _cells(bounds: tuple[float, ...]) -> list[float]:
    """[count per bucket..., count above the last bound, sum]."""
    return [0.0] * (len(bounds) + 2)


def _put(cells: list[float], bounds: tuple[float, ...], value: float) -> None:
    cells[bisect_left(bounds, value)] += 1.0  # the first bucket whose bound >= value
    cells[-1] += value


class _Requests:
    """Everything counted for the requests sharing one (model, route, server, status class).

    The hot path pays one dict lookup per request for all of it, instead of one per family;
    the families, each with its own labels, are projected from these at scrape time.
    """

    __slots__ = (
        "count", "bytes_in", "bytes_out", "prompt", "completion", "retries", "failovers",
        "disconnects", "affinity", "duration", "overhead", "ttfb", "stream", "decode",
    )  # fmt: skip

    def __init__(self) -> None:
        self.count = self.bytes_in = self.bytes_out = self.prompt = self.completion = 0
        self.retries = self.failovers = self.disconnects = 0
        self.affinity: dict[str, int] = {}
        self.duration = _cells(LATENCY_BUCKETS)
        self.overhead = _cells(OVERHEAD_BUCKETS)
        self.ttfb = _cells(LATENCY_BUCKETS)
        self.stream = _cells(LATENCY_BUCKETS)
        self.decode = _cells(RATE_BUCKETS)

    def __repr__(self) -> str:
        return f"<Requests count={self.count}>"


class _Families:
    """Every family the edge exports from its own observations. Those about requests are
    projected from the `_Requests` bundles at scrape time (`project`); the others (attempts and
    events from other modules) count as they happen."""

    def __init__(self) -> None:
        c, h = _Counter, _Histogram
        self.requests = c(
            "edge_requests", "Requests answered, by model, serving server, route and status class.",
            ("code", "model", "route", "server"),
        )  # fmt: skip
        self.duration = h(
            "edge_request_duration_seconds", "Time from request arrival to its last byte sent.",
            ("model", "route", "server"), LATENCY_BUCKETS,
        )  # fmt: skip
        self.ttfb = h(
            "edge_time_to_first_byte_seconds",
            "Time from request arrival to the first body byte sent (an SSE stream's first event), "
            "retries included: the time to first token a streaming client sees.",
            ("model", "server"), LATENCY_BUCKETS,
        )  # fmt: skip
        self.stream = h(
            "edge_stream_duration_seconds", "Time from the upstream's first body byte to its last.",
            ("model", "server"), LATENCY_BUCKETS,
        )  # fmt: skip
        self.overhead = h(
            "edge_overhead_seconds",
            "Time each request spent in the edge itself: total minus time waiting on upstreams.",
            ("route",), OVERHEAD_BUCKETS,
        )  # fmt: skip
        self.bytes_in = c("edge_request_bytes", "Request body bytes received.", ("model", "route"))
        self.bytes_out = c(
            "edge_response_bytes", "Response body bytes relayed from upstreams.", ("model", "route")
        )
        self.tokens = c(
            "edge_tokens", "Tokens from upstream usage, by type (prompt, completion).",
            ("model", "type"),
        )  # fmt: skip
        self.decode = h(
            "edge_decode_rate_tokens_per_second",
            "Completion tokens per second after the first byte, per streamed request.",
            ("model", "server"), RATE_BUCKETS,
        )  # fmt: skip
        self.attempts = c(
            "edge_upstream_attempts", "Attempts on upstream servers, by outcome.",
            ("model", "outcome", "server"),
        )  # fmt: skip
        self._init_routing()

    def _init_routing(self) -> None:
        c = _Counter
        self.retries = c("edge_retries", "Attempts after a request's first.", ("model",))
        self.failovers = c(
            "edge_failovers", "Requests answered by a server other than the first tried.",
            ("model",),
        )  # fmt: skip
        self.budget = c(
            "edge_retry_budget_exhausted", "Retries refused because the retry budget was spent.",
            ("model",),
        )  # fmt: skip
        self.disconnects = c(
            "edge_client_disconnects", "Requests the client abandoned before the end.", ("model",)
        )
        self.ejections = c(
            "edge_ejections", "Times a server was taken out of rotation.", ("server",)
        )
        self.affinity = c(
            "edge_affinity",
            "Routed requests by affinity result (cookie_hit, key_hit, moved, none).",
            ("model", "result"),
        )  # fmt: skip
        self.discovery = c(
            "edge_discovery_refreshes", "Discovery source reads, by outcome (ok, error).",
            ("outcome",),
        )  # fmt: skip

    def by_model(self) -> tuple[_Counter, ...]:
        """Counters with one zero series per known model until they count something."""
        return (self.retries, self.failovers, self.budget, self.disconnects)

    def counters(self) -> tuple[_Counter, ...]:
        return (
            self.requests, self.attempts, self.tokens, self.bytes_in, self.bytes_out,
            self.ejections, self.affinity, self.discovery, *self.by_model(),
        )  # fmt: skip

    def histograms(self) -> tuple[_Histogram, ...]:
        return (self.duration, self.ttfb, self.stream, self.overhead, self.decode)

    def project(self, requests: dict[tuple[str, str, str, str], _Requests]) -> None:
        counters = (
            self.requests, self.bytes_in, self.bytes_out, self.tokens, self.retries,
            self.failovers, self.disconnects, self.affinity,
        )  # fmt: skip
        for counter in counters:
            counter.values.clear()
        for histogram in self.histograms():
            histogram.values.clear()
        for (model, route, server, code), r in requests.items():
            self.requests.inc((code, model, route, server), r.count)
            self.bytes_in.inc((model, route), r.bytes_in)
            self.bytes_out.inc((model, route), r.bytes_out)
            for kind, tokens in (("prompt", r.prompt), ("completion", r.completion)):
                if tokens:
                    self.tokens.inc((model, kind), tokens)
            for counter, value in (
                (self.retries, r.retries), (self.failovers, r.failovers),
                (self.disconnects, r.disconnects),
            ):  # fmt: skip
                if value:
                    counter.inc((model,), value)
            for result, count in r.affinity.items():
                self.affinity.inc((model, result), count)
            self.duration.add((model, route, server), r.duration)
            self.overhead.add((route,), r.overhead)
            self.ttfb.add((model, server), r.ttfb)
            self.stream.add((model, server), r.stream)
            self.decode.add((model, server), r.decode)


class Metrics(Collector):
    """Prometheus families for one worker, fed by `observe`; also the worker's registry."""

    def __init__(
        self,
        fleet: Callable[[], Fleet],
        settings: MetricsSettings | None = None,
        *,
        is_up: Callable[[Host], bool] | None = None,
        version: str = "0.1.0",
    ) -> None:
        self.settings = settings or MetricsSettings()
        self.enabled = self.settings.enabled
        self._fleet = fleet
        # A health module passes its own view; until then hosts are judged by recent failures.
        self._passive = is_up is None
        self._is_up = is_up or _failing_less_than(DOWN_AFTER)
        self._version = version
        self.f = _Families()
        self._requests: dict[tuple[str, str, str, str], _Requests] = {}
        self.observations = 0
        # Other modules may register their own collectors here; they are rendered (and shared
        # over workers) with these.
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._shared = Shared(self.settings.shared_dir) if self.settings.shared_dir else None

    # --- the hot path -------------------------------------------------------------------

    def observe(self, obs: Observation) -> None:
        host = obs.host
        if host is not None:
            failed = obs.outcome != "ok"
            if obs.final and obs.stream_s is not None and obs.ttfb_s is not None:
                # Decode rate for routing: usage over the time from first byte to last.
                host.stats.record(
                    obs.ttfb_s, failed, time.monotonic(), obs.usage, obs.ttfb_s + obs.stream_s
                )
            else:
                host.stats.record(obs.ttfb_s, failed, time.monotonic())
        if not self.enabled:
            return
        self.observations += 1
        model = obs.model or UNKNOWN_MODEL
        server = NO_SERVER
        if host is not None:
            server = host.url
            self._attempted(model, server, host, obs)
        if obs.final:
            self._finished(model, server, obs)

    def _attempted(self, model: str, server: str, host: Host, obs: Observation) -> None:
        f = self.f
        f.attempts.inc((model, obs.outcome, server))
        if self._passive and obs.outcome != "ok" and host.stats.fails == DOWN_AFTER:
            f.ejections.inc((server,))

    def _finished(self, model: str, server: str, obs: Observation) -> None:
        key = (model, obs.route, server, _CODES[obs.status // 100 % 10])
        r = self._requests.get(key)
        if r is None:
            r = self._requests[key] = _Requests()
        r.count += 1
        r.bytes_in += obs.bytes_in
        # Histograms updated inline (as in _put): a function call per family costs as much as
        # the update itself, and this runs for every request.
        duration = obs.duration_s
        cells = r.duration
        cells[bisect_left(LATENCY_BUCKETS, duration)] += 1.0
        cells[-1] += duration
        overhead = duration - obs.upstream_s
        if overhead < 0.0:  # clocks read in a different order on an error path
            overhead = 0.0
        cells = r.overhead
        cells[bisect_left(OVERHEAD_BUCKETS, overhead)] += 1.0
        cells[-1] += overhead
        if obs.attempt > 1:
            r.retries += obs.attempt - 1
        if obs.first_byte_s is not None:
            _answered(r, obs, obs.first_byte_s)
        elif obs.outcome == "client_disconnect":
            r.disconnects += 1

    # --- events from other modules ------------------------------------------------------

    def ejected(self, host: Host) -> None:
        """The health module took `host` out of rotation."""
        self.f.ejections.inc((host.url,))

    def retry_denied(self, model: str) -> None:
        """A retry was refused because the retry budget is spent."""
        self.f.budget.inc((model,))

    def discovery_refreshed(self, ok: bool) -> None:
        """One source was read (ok) or failed (error)."""
        self.f.discovery.inc(("ok" if ok else "error",))

    # --- scrape time --------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        yield _build_info(self._version)
        if not self.enabled:
            return
        fleet = self._fleet()
        models = [(m,) for m in fleet.models]
        servers = list(dict.fromkeys((h.url,) for hosts in fleet.models.values() for h in hosts))
        f = self.f
        f.project(self._requests)
        zeros: dict[str, Iterable[tuple[str, ...]]] = {c.name: models for c in f.by_model()}
        zeros[f.ejections.name] = servers
        zeros[f.discovery.name] = [("ok",), ("error",)]
        zeros[f.affinity.name] = [(m, r) for (m,) in models for r in sorted(AFFINITY_RESULTS)]
        for counter in f.counters():
            yield counter.family(zeros.get(counter.name, ()))
        for histogram in f.histograms():
            yield histogram.family()
        yield from self._live(fleet)

    def _live(self, fleet: Fleet) -> Iterator[Metric]:
        inflight = GaugeMetricFamily(
            "edge_inflight_requests", "Attempts in flight per server.", labels=["server"]
        )
        up = GaugeMetricFamily(
            "edge_server_up", "1 when the server takes traffic for the model, 0 when it is out "
            "(with N workers: the share of workers that consider it up).",
            labels=["model", "server"],
        )  # fmt: skip
        score = GaugeMetricFamily(
            "edge_server_score_seconds",
            "The server's routing score: Peak-EWMA of time to first byte (mean over workers).",
            labels=["server"],
        )
        known = GaugeMetricFamily(
            "edge_servers_known", "Servers known per model.", labels=["model"]
        )
        seen: set[str] = set()
        for model, hosts in fleet.models.items():
            known.add_metric([model], len(hosts))
            for host in hosts:
                up.add_metric([model, host.url], 1.0 if self._is_up(host) else 0.0)
                if host.url in seen:
                    continue
                seen.add(host.url)
                inflight.add_metric([host.url], host.inflight)
                if host.stats.samples:
                    score.add_metric([host.url], host.stats.ttfb_ewma)
        return iter((inflight, up, score, known))

    def render(self) -> bytes:
        """The text format: this worker's samples, summed with the other workers' when shared."""
        if self._shared is None:
            return generate_latest(self.registry)
        return generate_latest(self._shared.merged(self.registry.collect()))

    def share(self) -> None:
        """Write this worker's samples for the other workers (a no-op with one worker)."""
        if self._shared is not None:
            self._shared.write(self.registry.collect())

    async def share_forever(self) -> None:
        while self._shared is not None:
            await asyncio.sleep(self.settings.share_interval_s)
            self.share()

    def __repr__(self) -> str:
        series = len(self._requests) + len(self.f.attempts.values)
        shared = " shared" if self._shared is not None else ""
        return f"<Metrics observations={self.observations} series={series}{shared}>"


def _answered(r: _Requests, obs: Observation, first_byte_s: float) -> None:
    cells = r.ttfb
    cells[bisect_left(LATENCY_BUCKETS, first_byte_s)] += 1.0
    cells[-1] += first_byte_s
    r.bytes_out += obs.bytes_out
    affinity = obs.affinity if obs.affinity in AFFINITY_RESULTS else "none"
    r.affinity[affinity] = r.affinity.get(affinity, 0) + 1
    if obs.attempt > 1:
        r.failovers += 1
    stream_s = obs.stream_s
    if stream_s is not None:
        cells = r.stream
        cells[bisect_left(LATENCY_BUCKETS, stream_s)] += 1.0
        cells[-1] += stream_s
    usage = obs.usage
    if usage is None:
        return
    r.prompt += usage.prompt_tokens
    r.completion += usage.completion_tokens
    if obs.stream and stream_s is not None and stream_s >= 0.001 and usage.completion_tokens:
        _put(r.decode, RATE_BUCKETS, usage.completion_tokens / stream_s)


def _le(bound: float) -> str:
    text: str = floatToGoString(bound)  # type: ignore[no-untyped-call]
    return text


def _failing_less_than(limit: int) -> Callable[[Host], bool]:
    def is_up(host: Host) -> bool:
        return host.stats.fails < limit

    return is_up


def _build_info(version: str) -> Metric:
    info = GaugeMetricFamily(
        "edge_build_info", "Always 1; labels name the running build.", labels=["python", "version"]
    )
    info.add_metric([sys.version.split()[0], version], 1.0)
    return info
